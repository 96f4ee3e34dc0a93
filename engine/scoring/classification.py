"""Classification metrics from predicted probabilities, as scikit-learn defines them.

- ROC AUC: the probability that a random positive scores above a random negative,
  ties counting one half (Mann-Whitney U / (n_pos × n_neg)).
- Average precision: Σ (R_n − R_{n−1}) P_n over decreasing thresholds (no
  interpolation), scikit-learn's definition.
- Accuracy, balanced accuracy (mean per-class recall), sensitivity and
  specificity at a threshold (positive when p ≥ threshold).
- Brier score: mean squared difference between probability and outcome.

Multi-class: AUC and AP one-vs-rest per class, then macro (mean over classes)
and micro (all one-vs-rest decisions pooled) averages. Accuracy and balanced
accuracy judge the argmax class; per-class sensitivity and specificity are
one-vs-rest at the threshold.
With a single class present in the reference, AUC and AP are undefined: they
are reported as None rather than an invented number.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)  # average ranks: ties count one half
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float | None:
    labels = np.asarray(labels, dtype=bool)
    n_pos = int(labels.sum())
    if n_pos == 0:
        return None
    order = np.argsort(-np.asarray(scores, float), kind="mergesort")
    sorted_scores, sorted_labels = np.asarray(scores, float)[order], labels[order]
    # one point per distinct threshold, as scikit-learn
    last_of_threshold = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(sorted_scores) - 1]
    true_positives = np.cumsum(sorted_labels)[last_of_threshold]
    predicted = last_of_threshold + 1
    precision = true_positives / predicted
    recall = true_positives / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def binary_metrics(labels: np.ndarray, probabilities: np.ndarray,
                   threshold: float = 0.5) -> dict[str, float | None]:
    labels = np.asarray(labels, dtype=bool)
    probabilities = np.asarray(probabilities, dtype=float)
    predicted = probabilities >= threshold
    tp = int(np.sum(predicted & labels))
    tn = int(np.sum(~predicted & ~labels))
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    sensitivity = tp / n_pos if n_pos else None
    specificity = tn / n_neg if n_neg else None
    recalls = [r for r in (sensitivity, specificity) if r is not None]
    return {
        "roc_auc": roc_auc(labels, probabilities),
        "average_precision": average_precision(labels, probabilities),
        "accuracy": (tp + tn) / len(labels),
        "balanced_accuracy": float(np.mean(recalls)),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "brier": float(np.mean((probabilities - labels) ** 2)),
    }


def multiclass_metrics(labels: list[str], probabilities: np.ndarray,
                       classes: list[str]) -> dict[str, float | None]:
    """labels: the true class per case; probabilities: cases × classes."""
    probabilities = np.asarray(probabilities, dtype=float)
    truth = np.array([[label == c for c in classes] for label in labels])
    per_class = {c: binary_metrics(truth[:, i], probabilities[:, i])
                 for i, c in enumerate(classes)}
    predicted = np.asarray(classes)[np.argmax(probabilities, axis=1)]
    truth_labels = np.asarray(labels)
    # balanced accuracy: the recall of the argmax decision, per class present, averaged
    recalls = [float(np.mean(predicted[truth_labels == c] == c)) for c in classes
               if np.any(truth_labels == c)]
    result: dict[str, float | None] = {
        "accuracy": float(np.mean(predicted == np.asarray(labels))),
        "balanced_accuracy": float(np.mean(recalls)),
        "brier": float(np.mean(np.sum((probabilities - truth) ** 2, axis=1))),
    }
    for metric in ("roc_auc", "average_precision"):
        values = [per_class[c][metric] for c in classes if per_class[c][metric] is not None]
        result[f"{metric}_macro"] = float(np.mean(values)) if values else None
    result["roc_auc_micro"] = roc_auc(truth.ravel(), probabilities.ravel())
    result["average_precision_micro"] = average_precision(truth.ravel(), probabilities.ravel())
    for c in classes:
        for metric in ("roc_auc", "average_precision", "sensitivity", "specificity"):
            result[f"{metric}[{c}]"] = per_class[c][metric]
    return result
