"""Per-case results and per-submission aggregates, failures included.

Metric keys are flat: `dice[1]` is Dice of label 1. A case without a valid
output has every metric at its worst value (conventions.py); a case that has
no result at all (its job was lost to the platform) gets the same when the
aggregates are computed. Classification metrics are computed over all cases at
once: a failed case counts as a maximally wrong prediction.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from engine.challenges import Challenge, challenge_definition, metric_keys
from engine.datasets import SealedDataset, load
from engine.db.models import AggregateRow, CaseResultRow, SubmissionRow
from engine.evaluation import worst_metrics
from engine.scoring.aggregation import bootstrap_ci, summarise
from engine.scoring.classification import binary_metrics, multiclass_metrics


def results_by_case(session: Session, submission: SubmissionRow) -> dict[str, CaseResultRow]:
    return {r.case_id: r for r in session.scalars(select(CaseResultRow).where(
        CaseResultRow.submission_id == submission.id))}


class CaseMetrics(NamedTuple):
    """What ranking reads of a case result (valid, metrics): no ORM object to build."""

    valid: bool
    metrics: dict


def case_metrics_by_submission(session: Session, submission_ids: list[int]
                               ) -> dict[int, dict[str, CaseMetrics]]:
    """{submission id: {case id: CaseMetrics}} for all of them in one column query
    (a leaderboard reads tens of thousands of rows: ORM objects cost most of its time)."""
    found: dict[int, dict[str, CaseMetrics]] = {i: {} for i in submission_ids}
    for case_id, submission_id, valid, metrics in session.execute(select(
            CaseResultRow.case_id, CaseResultRow.submission_id, CaseResultRow.valid,
            CaseResultRow.metrics).where(CaseResultRow.submission_id.in_(submission_ids))):
        found[submission_id][case_id] = CaseMetrics(valid, metrics)
    return found


def case_values(session: Session, challenge: Challenge, dataset: SealedDataset,
                submission: SubmissionRow, key: str,
                rows: dict[str, CaseResultRow] | dict[str, CaseMetrics] | None = None,
                case_ids: list[str] | None = None) -> list[float]:
    """The metric for every case of the submission's own case set (fixed when it was
    submitted, whatever the phase's dataset holds now), or of `case_ids`, in that order;
    failures at their worst."""
    rows = results_by_case(session, submission) if rows is None else rows
    values = []
    for case_id in submission.case_ids if case_ids is None else case_ids:
        row = rows.get(case_id)
        if row is not None and key in row.metrics:
            values.append(float(row.metrics[key]))
        else:
            values.append(worst_metrics(challenge, dataset, case_id)[key])
    return values


def compute_aggregates(session: Session, submission: SubmissionRow) -> None:
    challenge = challenge_definition(submission.phase.challenge)
    dataset = load(submission.phase.dataset_path)
    session.execute(delete(AggregateRow).where(AggregateRow.submission_id == submission.id))
    rows = results_by_case(session, submission)
    failed = [c for c in submission.case_ids if c not in rows or not rows[c].valid]
    if challenge.task == "classification":
        for key, summary in classification_summaries(challenge, dataset, rows,
                                                      submission.case_ids).items():
            session.add(AggregateRow(submission_id=submission.id, metric=key, summary=summary))
        return
    for key in metric_keys(challenge):
        values = case_values(session, challenge, dataset, submission, key, rows)
        summary = summarise(values, worst=values, seed=submission.id).to_dict()
        summary["n_failed"] = len(failed)
        session.add(AggregateRow(submission_id=submission.id, metric=key, summary=summary))
    runtimes = [r.runtime_seconds for r in rows.values() if r.runtime_seconds is not None]
    if runtimes:
        session.add(AggregateRow(submission_id=submission.id, metric="runtime_seconds",
                                 summary=summarise(runtimes, worst=0.0, bootstrap=0).to_dict()))


def classification_summaries(challenge: Challenge, dataset: SealedDataset,
                             rows: dict[str, CaseResultRow],
                             case_ids: list[str]) -> dict[str, dict]:
    classes = challenge.output.classes
    labels = dataset.labels()
    truth, probabilities, n_failed = [], [], 0
    for case_id in case_ids:
        label = labels[case_id]
        row = rows.get(case_id)
        if row is not None and row.valid:
            probabilities.append([row.metrics["probabilities"][c] for c in classes])
        else:
            n_failed += 1
            probabilities.append(_maximally_wrong(label, classes))
        truth.append(label)
    probabilities = np.asarray(probabilities)
    if len(classes) == 1:  # binary: one column, the probability of the positive class
        positives = np.array([label == "1" for label in truth])
        metrics = binary_metrics(positives, probabilities[:, 0], challenge.metrics.threshold)
        correct = (probabilities[:, 0] >= challenge.metrics.threshold) == positives
    else:
        metrics = multiclass_metrics(truth, probabilities, classes)
        correct = np.asarray(classes)[probabilities.argmax(axis=1)] == np.asarray(truth)
    low, high = bootstrap_ci(correct.astype(float), seed=0)
    return {key: {"value": value, "n": len(truth), "n_failed": n_failed,
                  **({"ci_low": low, "ci_high": high} if key == "accuracy" else {})}
            for key, value in metrics.items() if value is not None}


def _maximally_wrong(label: str, classes: list[str]) -> list[float]:
    if len(classes) == 1:
        return [0.0 if label == "1" else 1.0]
    return [0.0 if c == label else 1.0 / (len(classes) - 1) for c in classes]
