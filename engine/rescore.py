"""`epreuve rescore`: bring results computed on an older dataset version up to the current
one from the outputs already stored, without running a container again.

A case is re-scored only where a container would have been given the same bytes under
the current version: its input digest (engine/dataset_versions.py) is the same in the
submission's version and in the current one, and its stored output is still the one
first scored (same sha256). Any other case (new, inputs changed, output gone or changed)
needs a re-run, and a submission with even one such case is left as it is, still marked
stale, with the cases listed: rescoring it would otherwise score those cases at their
worst value without saying so. All or nothing, per submission.

A rescored submission gets new case results (the same validation and scoring as the
worker's), new aggregates over the current version's cases, the current version, and an
event in its history. Only evaluated (succeeded) submissions are rescored.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from engine import queue
from engine.challenges import Challenge, challenge_definition
from engine.config import Settings
from engine.dataset_versions import case_inputs, unchanged_cases
from engine.datasets import SealedDataset, case_input_digests
from engine.db.models import CaseResultRow, JobRow, SubmissionRow
from engine.errors import Conflict, NotFound
from engine.evaluation import score_outputs as evaluate
from engine.evaluation import verified_dataset
from engine.frozen import refuse_if_frozen
from engine.results import compute_aggregates, results_by_case
from engine.statuses import SubmissionStatus
from engine.submissions import find_phase
from runners.base import FailureReason, Runner, RunResult, RunStatus


class RescoreRefused(Conflict, ValueError):
    """This submission cannot be rescored (not evaluated, not in this phase)."""


@dataclass
class RescoreOutcome:
    submission_id: int
    team: str
    old_version: str
    new_version: str
    rescored: list[str] = field(default_factory=list)  # cases scored again from their outputs
    needs_rerun: dict[str, str] = field(default_factory=dict)  # case -> why

    @property
    def done(self) -> bool:
        return not self.needs_rerun


def rescore(session: Session, settings: Settings, challenge_id: str, phase_slug: str, *,
            submission_id: int | None = None, actor: str = "cli",
            runner: Callable[[], Runner] | None = None) -> list[RescoreOutcome]:
    """Rescore one submission, or every evaluated submission of the phase computed on an
    older version. Flushes; the caller commits. `runner` makes the runner the organisers'
    evaluation image needs (only called for a challenge that has one)."""
    phase_row, _ = find_phase(session, challenge_id, phase_slug)
    refuse_if_frozen(phase_row, "rescore")
    dataset = verified_dataset(phase_row.dataset_path, phase_row.dataset_version,
                               what=f"phase {phase_row.slug}")
    challenge = challenge_definition(phase_row.challenge)
    outcomes = []
    for submission in _chosen(session, phase_row.id, phase_row.dataset_version, submission_id):
        outcome = _rescore_one(session, settings, challenge, dataset, submission, actor, runner)
        outcomes.append(outcome)
    session.flush()
    return outcomes


def _chosen(session: Session, phase_id: int, current: str,
            submission_id: int | None) -> list[SubmissionRow]:
    if submission_id is None:
        return list(session.scalars(select(SubmissionRow).where(
            SubmissionRow.phase_id == phase_id,
            SubmissionRow.status == SubmissionStatus.SUCCEEDED,
            SubmissionRow.dataset_version != current).order_by(SubmissionRow.id)))
    submission = session.get(SubmissionRow, submission_id)
    if submission is None or submission.phase_id != phase_id:
        raise NotFound(f"no submission {submission_id} in this phase")
    if submission.status != SubmissionStatus.SUCCEEDED:
        raise RescoreRefused(f"submission {submission_id} was not evaluated "
                             f"({submission.status}): only its re-run gives it results")
    return [submission]


def _rescore_one(session: Session, settings: Settings, challenge: Challenge,
                 dataset: SealedDataset, submission: SubmissionRow, actor: str,
                 runner: Callable[[], Runner] | None) -> RescoreOutcome:
    outcome = RescoreOutcome(submission.id, submission.team.name, submission.dataset_version,
                             dataset.version)
    rows = results_by_case(session, submission)
    current = case_input_digests(dataset.manifest)
    recorded = case_inputs(session, submission.dataset_version)
    same_inputs = set(unchanged_cases(recorded, current))
    for case_id in current:
        if case_id not in same_inputs:
            outcome.needs_rerun[case_id] = (
                "new in this version" if case_id not in submission.case_ids else
                "its inputs changed" if recorded is not None else
                f"the inputs of version {submission.dataset_version[:12]} are not on record")
        elif case_id not in rows:
            outcome.needs_rerun[case_id] = "no stored result"
        elif not _output_intact(settings, challenge, submission, rows[case_id]):
            outcome.needs_rerun[case_id] = "its stored output is gone or changed"
    if not outcome.done:
        queue.record(session, "submission", submission.id, submission.status, submission.status,
                     actor, f"not rescored on dataset version {dataset.version[:12]}: "
                     f"{len(outcome.needs_rerun)} case(s) need a re-run")
        return outcome
    scored = _score_stored(settings, challenge, dataset, submission, rows, list(current), runner)
    for case_id, case in scored.items():
        row = rows[case_id]
        row.valid, row.reason, row.message = case.valid, case.reason, case.message
        row.metrics, row.output_sha256 = case.metrics, case.output_sha256
    submission.dataset_version, submission.case_ids = dataset.version, list(current)
    compute_aggregates(session, submission)
    outcome.rescored = list(current)
    queue.record(session, "submission", submission.id, submission.status, submission.status,
                 actor, f"rescored: dataset version {outcome.old_version[:12]} -> "
                 f"{dataset.version[:12]}, {len(scored)} case(s) scored again from stored "
                 "outputs (no container run)")
    return outcome


def output_dir(settings: Settings, submission_id: int, job_id: int) -> Path:
    """Where the worker keeps a job's outputs."""
    return settings.outputs_dir / f"submission-{submission_id}" / f"job-{job_id}"


def _output_intact(settings: Settings, challenge: Challenge, submission: SubmissionRow,
                   row: CaseResultRow) -> bool:
    """The case's stored output files are the bytes first scored (a missing output, scored
    as such, stays missing)."""
    directory = output_dir(settings, submission.id, row.job_id)
    if not directory.is_dir():
        return False
    for name, digest in row.output_sha256.items():
        path = directory / (name if challenge.task == "classification" else
                            f"{row.case_id}/{name}")
        try:
            with open(path, "rb") as handle:
                if hashlib.file_digest(handle, "sha256").hexdigest() != digest:
                    return False
        except OSError:
            return False
    return True


def _score_stored(settings: Settings, challenge: Challenge, dataset: SealedDataset,
                  submission: SubmissionRow, rows: dict[str, CaseResultRow],
                  case_ids: list[str], runner: Callable[[], Runner] | None) -> dict:
    """Each case's stored output scored again, job by job (a job's output directory and its
    run's end decide how a missing output is reported, as the worker did)."""
    by_job: dict[int, list[str]] = defaultdict(list)
    for case_id in case_ids:
        by_job[rows[case_id].job_id].append(case_id)
    scored = {}
    for job_id, cases in by_job.items():
        job = session_job(submission, job_id)
        stored = output_dir(settings, submission.id, job_id)
        for case in score_outputs(settings, challenge, dataset, job, cases, stored, runner):
            scored[case.case_id] = case
    return scored


def session_job(submission: SubmissionRow, job_id: int) -> JobRow:
    return next(job for job in submission.jobs if job.id == job_id)


def run_as_recorded(job: JobRow) -> RunResult:
    """The job's run as the worker saw it: how it ended and what it refused to collect."""
    record = job.run_result or {}
    reason = FailureReason(job.reason) if job.reason else None
    return RunResult(status=RunStatus.FAILED if reason else RunStatus.SUCCEEDED, reason=reason,
                     message=job.message or "", wall_seconds=record.get("wall_seconds"),
                     skipped_outputs=list(record.get("skipped_outputs") or []))


def score_outputs(settings: Settings, challenge: Challenge, dataset: SealedDataset,
                  job: JobRow, case_ids: list[str], output_dir: Path,
                  runner: Callable[[], Runner] | None) -> list:
    """The one validate-then-score path (engine/evaluation.py) on outputs already on disk,
    with the job's run as it was recorded."""
    return evaluate(challenge, dataset, case_ids, run_as_recorded(job), output_dir,
                    runner=runner() if runner and challenge.metrics.evaluation_image else None,
                    work_dir=settings.work_dir)
