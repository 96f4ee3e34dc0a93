"""Segmentation metrics per label, each convention written down.

Definitions (P: predicted voxels of the label, R: reference voxels, |.|: count;
dPR: distances from each surface element of P to the surface of R, dRP the other way):

- Dice = 2|P∩R| / (|P|+|R|);  IoU = |P∩R| / |P∪R|
- sensitivity = |P∩R| / |R|;  precision = |P∩R| / |P|;  specificity = TN / (TN+FP)
- HD = max(max dPR, max dRP)
- HD95 = max(q95(dPR), q95(dRP)): the percentile of each direction with linear
  interpolation between order statistics (numpy's default, as MONAI), then the
  larger of the two
- ASSD = (Σ dPR + Σ dRP) / (n_P + n_R): the mean of both directions pooled, as MONAI's
  symmetric average surface distance
- MASD = (mean dPR + mean dRP) / 2: the mean of the two directed means
- NSD(τ) = (#{dPR ≤ τ} + #{dRP ≤ τ}) / (n_P + n_R)
- volume difference = (|P| - |R|) × voxel volume, in millilitres (signed; its absolute
  value is the rankable `abs_volume_difference_ml`)

In subvoxel mode the surface elements are area-weighted (counts become areas,
the percentile is area-weighted nearest rank), as DeepMind's surface-distance.
Empty masks follow `EmptyMaskPolicy` (conventions.py): never nan, never inf.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from engine.scoring.conventions import EmptyMaskPolicy, finite, image_diagonal_mm
from engine.scoring.surface import SurfaceDistances, bounding_box, edge_distances, edges

SurfaceMode = Literal["edge", "subvoxel"]


@dataclass(frozen=True)
class SegmentationSettings:
    labels: tuple[int, ...] = (1,)
    nsd_tolerance_mm: float = 1.0
    surface: SurfaceMode = "edge"
    hd_percentile: float = 95.0
    empty: EmptyMaskPolicy = field(default_factory=EmptyMaskPolicy)


def score_segmentation(prediction: np.ndarray, reference: np.ndarray,
                       spacing: tuple[float, ...],
                       settings: SegmentationSettings = SegmentationSettings(),
                       ) -> dict[int, dict[str, float]]:
    """Every metric for every label: {label: {metric: value}}."""
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction {prediction.shape} and reference {reference.shape} "
                         "differ in shape")
    return {label: score_label(prediction == label, reference == label, spacing, settings)
            for label in settings.labels}


def score_label(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...],
                settings: SegmentationSettings = SegmentationSettings()) -> dict[str, float]:
    spacing = tuple(float(s) for s in spacing)
    diagonal = image_diagonal_mm(pred.shape, spacing)
    box = bounding_box(pred, ref)
    total = int(np.prod(pred.shape))
    if box is None:
        return _both_empty(settings.empty, diagonal)
    pred, ref = pred[box], ref[box]
    n_pred, n_ref = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    overlap = int(np.count_nonzero(pred & ref))
    voxel_ml = float(np.prod(spacing)) / 1000.0
    metrics = _overlap_metrics(n_pred, n_ref, overlap, total)
    metrics["volume_difference_ml"] = (n_pred - n_ref) * voxel_ml
    metrics["abs_volume_difference_ml"] = abs(n_pred - n_ref) * voxel_ml
    if n_pred == 0 or n_ref == 0:
        policy = settings.empty
        metrics.update(dict.fromkeys(("dice", "iou"), policy.one_empty_overlap))
        metrics["nsd"] = policy.one_empty_nsd
        distance = policy.distance(policy.one_empty_distance, diagonal)
        metrics.update(dict.fromkeys(("hd", "hd95", "assd", "masd"), distance))
        return {k: finite(v) for k, v in metrics.items()}
    distances = surface_distances(pred, ref, spacing, settings.surface)
    metrics.update(distance_metrics(distances, settings.nsd_tolerance_mm,
                                    settings.hd_percentile))
    return {k: finite(v) for k, v in metrics.items()}


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...],
                      mode: SurfaceMode) -> SurfaceDistances:
    if mode == "edge":
        return edge_distances(edges(pred), edges(ref), spacing)
    from engine.scoring.subvoxel import subvoxel_distances

    return subvoxel_distances(pred, ref, spacing)


def distance_metrics(distances: SurfaceDistances, tolerance_mm: float,
                     percentile: float = 95.0) -> dict[str, float]:
    d_pr, d_rp = distances.pred_to_ref, distances.ref_to_pred
    if distances.pred_areas is None:
        w_pr, w_rp = np.ones_like(d_pr), np.ones_like(d_rp)
        hd95 = max(np.percentile(d_pr, percentile), np.percentile(d_rp, percentile))
    else:
        w_pr, w_rp = distances.pred_areas, distances.ref_areas
        hd95 = max(weighted_percentile(d_pr, w_pr, percentile),
                   weighted_percentile(d_rp, w_rp, percentile))
    total_pr, total_rp = w_pr.sum(), w_rp.sum()
    sum_pr, sum_rp = float(np.dot(d_pr, w_pr)), float(np.dot(d_rp, w_rp))
    within = w_pr[d_pr <= tolerance_mm].sum() + w_rp[d_rp <= tolerance_mm].sum()
    return {
        "hd": float(max(d_pr.max(), d_rp.max())),
        "hd95": float(hd95),
        "assd": (sum_pr + sum_rp) / (total_pr + total_rp),
        "masd": (sum_pr / total_pr + sum_rp / total_rp) / 2.0,
        "nsd": float(within / (total_pr + total_rp)),
    }


def weighted_percentile(values: np.ndarray, weights: np.ndarray, percentile: float) -> float:
    """Area-weighted nearest rank: the smallest value whose cumulative area reaches the share."""
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order]) / weights.sum()
    index = int(np.searchsorted(cumulative, percentile / 100.0, side="left"))
    return float(values[order][min(index, len(values) - 1)])


def _overlap_metrics(n_pred: int, n_ref: int, overlap: int, total: int) -> dict[str, float]:
    union = n_pred + n_ref - overlap
    negatives = total - n_ref
    false_positive = n_pred - overlap
    return {
        "dice": 2.0 * overlap / (n_pred + n_ref),
        "iou": overlap / union,
        # 0/0 ratios: nothing to find was missed (1), nothing claimed was wrong (1)
        "sensitivity": overlap / n_ref if n_ref else 1.0,
        "precision": overlap / n_pred if n_pred else 1.0,
        "specificity": (negatives - false_positive) / negatives if negatives else 1.0,
    }


def _both_empty(policy: EmptyMaskPolicy, diagonal_mm: float) -> dict[str, float]:
    return {
        "dice": policy.both_empty_overlap, "iou": policy.both_empty_overlap,
        "sensitivity": 1.0, "precision": 1.0, "specificity": 1.0,
        "volume_difference_ml": 0.0, "abs_volume_difference_ml": 0.0,
        "nsd": policy.both_empty_nsd,
        **dict.fromkeys(("hd", "hd95", "assd", "masd"),
                        policy.distance(policy.both_empty_distance, diagonal_mm)),
    }


def labels_present(*arrays: np.ndarray) -> tuple[int, ...]:
    found: set[int] = set()
    for array in arrays:
        found.update(int(v) for v in np.unique(array))
    return tuple(sorted(found - {0}))


def parse_labels(text: str | Iterable[int] | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    if isinstance(text, str):
        return tuple(int(part) for part in text.split(",") if part.strip())
    return tuple(int(v) for v in text)
