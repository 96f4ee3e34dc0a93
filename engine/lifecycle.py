"""A submission's life, after intake: smoke job -> main jobs -> aggregates -> the end;
and cancel.

It runs where a job is completed (the coordinator, in the same transaction that ends the
job) and where a submission is cancelled (the command line, later the API). Like every
domain module it only flushes: the caller commits.

    smoke job failed      -> the submission fails with its reason (the rest never run)
    smoke job succeeded   -> the remaining cases are queued in shards of `cases_per_run`
    last job ended        -> the aggregates, then succeeded; or failed when the platform
                             lost cases (INFRASTRUCTURE: it never counts against the quota)
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from engine import queue
from engine.challenges import challenge_definition
from engine.db.models import JobRow, SubmissionRow, utcnow
from engine.frozen import refuse_if_frozen
from engine.results import compute_aggregates
from engine.statuses import JobKind, JobStatus, SubmissionStatus
from engine.submissions import SubmissionRefused
from runners.base import FailureReason


def shards(case_ids: list[str], size: int) -> list[list[str]]:
    return [case_ids[i:i + size] for i in range(0, len(case_ids), size)]


def after_job(session: Session, job: JobRow, actor: str) -> None:
    """What follows a finished job: the main jobs after a smoke job, or the submission's end.
    The submission's row is locked first (PostgreSQL): two of its jobs ending at once would
    each see the other still pending, and neither would end the submission."""
    session.execute(select(SubmissionRow.id).where(SubmissionRow.id == job.submission_id)
                    .with_for_update())
    submission = job.submission
    phase = challenge_definition(submission.phase.challenge).phase(submission.phase.slug)
    if job.kind == JobKind.SMOKE and job.status == JobStatus.FAILED:
        _finish_submission(session, submission, SubmissionStatus.FAILED, actor, job.reason, (
            f"the smoke case failed, so the rest were not run: {job.message}"))
        return
    if job.kind == JobKind.SMOKE and job.status == JobStatus.SUCCEEDED:
        _set_status(session, submission, SubmissionStatus.RUNNING, actor, "smoke job passed")
        remaining = [c for c in submission.phase.case_ids if c not in job.case_ids]
        if remaining:
            queue.enqueue(session, submission, shards(remaining, phase.cases_per_run),
                          kind=JobKind.MAIN, actor=actor, gpus=phase.limits.gpus)
            return
    pending = session.scalar(select(func.count()).select_from(JobRow).where(
        JobRow.submission_id == submission.id, JobRow.status.not_in(queue.TERMINAL)))
    if pending == 0:
        lost = session.scalars(select(JobRow).where(
            JobRow.submission_id == submission.id, JobRow.status == JobStatus.FAILED,
            JobRow.reason == FailureReason.INFRASTRUCTURE.value).order_by(JobRow.id)).all()
        if lost:  # cases the platform never evaluated: not the team's failure, nor its quota
            _finish_submission(session, submission, SubmissionStatus.FAILED, actor,
                               lost[0].reason, (
                f"the platform could not evaluate {sum(len(j.case_ids) for j in lost)} of the "
                f"{len(submission.phase.case_ids)} cases: {lost[0].message}"))
            return
        compute_aggregates(session, submission)
        _finish_submission(session, submission, SubmissionStatus.SUCCEEDED, actor, None,
                           "evaluated: see the leaderboard")


def _set_status(session: Session, submission: SubmissionRow, status: str, actor: str,
                detail: str | None) -> None:
    if submission.status != status:
        queue.record(session, "submission", submission.id, submission.status, status, actor,
                     detail)
        submission.status = status


def _finish_submission(session: Session, submission: SubmissionRow, status: str, actor: str,
                       reason: str | None, message: str) -> None:
    _set_status(session, submission, status, actor, message)
    submission.reason, submission.message, submission.finished_at = reason, message, utcnow()
    if reason == FailureReason.INFRASTRUCTURE.value:
        submission.counts_against_quota = False  # not the team's fault


def cancel(session: Session, submission_id: int, actor: str, why: str = "") -> SubmissionRow:
    """Cancel a submission: queued jobs never run, a running one is stopped by its worker
    (its next heartbeat finds the job cancelled), and nothing more is written for it."""
    submission = session.get(SubmissionRow, submission_id)
    if submission is None:
        raise SubmissionRefused(f"no submission {submission_id}")
    refuse_if_frozen(submission.phase, f"cancel submission {submission_id}")
    if submission.status in queue.TERMINAL:
        raise SubmissionRefused(f"submission {submission_id} already ended ({submission.status})")
    message = f"cancelled by {actor}" + (f": {why}" if why else "")
    # the jobs' rows before the submission's, as a job's end locks them (after_job): the
    # same order everywhere, so a cancel and a scoring never wait on each other in a cycle
    session.execute(select(JobRow.id).where(JobRow.submission_id == submission_id)
                    .order_by(JobRow.id).with_for_update())
    for job in submission.jobs:
        if job.status not in queue.TERMINAL:
            queue.record(session, "job", job.id, job.status, JobStatus.CANCELLED, actor, message)
            job.status, job.reason = JobStatus.CANCELLED, FailureReason.CANCELLED.value
            job.message = message
            job.finished_at = utcnow()
    _finish_submission(session, submission, SubmissionStatus.CANCELLED, actor,
                       FailureReason.CANCELLED.value, message)
    return submission
