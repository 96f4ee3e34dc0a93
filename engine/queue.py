"""Jobs in the database, leased to workers, with honest locking.

A job moves through: queued -> leased -> running -> scoring -> succeeded | failed,
or to cancelled. Every transition is written with an event in the same
transaction.

Leasing takes the next queued job under the fair-share policy (engine/fair_share.py:
smoke jobs first, then the team with the least recent service, round-robin across its
submissions, then the oldest job) and marks it leased to one worker until
`lease_expires_at`. On PostgreSQL the candidate row
is selected `FOR UPDATE SKIP LOCKED`, so concurrent workers never wait on, or
take, the same job. On SQLite (one writer at a time) the lease is a single
conditional UPDATE (`... WHERE id = ? AND status = 'queued'`): a worker that
loses the race updates no row and tries the next job.

A running worker renews its lease with heartbeats. The sweeper re-queues every
job whose lease expired (its worker vanished), and at once those whose owner the
caller knows to be dead (a worker sees the processes of its own host); that counts
as an INFRASTRUCTURE attempt, and a job out of attempts fails.

A job whose run is over waits in SCORING with its outcome stored (engine/worker/scorer.py).
A scorer takes it with a scoring lease (`lease_scoring`, locked as `lease` is). The sweep
never runs such a job again on a node: when its scorer vanishes, the outcome is scored
again by the next scorer, and after MAX_SCORINGS vanished scorers the job fails
(INFRASTRUCTURE: never the team's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from engine import fair_share
from engine.db.models import EventRow, JobRow, SubmissionRow, utcnow
from engine.errors import LeaseLost
from engine.statuses import (
    ACTIVE_JOB_STATES,
    ON_A_NODE_JOB_STATES,
    TERMINAL_JOB_STATES,
    JobKind,
    JobStatus,
)
from runners.base import FailureReason

ACTIVE = ACTIVE_JOB_STATES
TERMINAL = TERMINAL_JOB_STATES
DEFAULT_LEASE = timedelta(seconds=60)
SMOKE_PRIORITY, MAIN_PRIORITY = 0, 10
MAX_SCORINGS = 3  # scorers that may vanish while scoring one outcome before the job fails


def record(session: Session, entity: str, entity_id: int, from_state: str | None,
           to_state: str, actor: str, detail: str | None = None) -> None:
    session.add(EventRow(entity=entity, entity_id=entity_id, from_state=from_state,
                         to_state=to_state, actor=actor, detail=detail))


def enqueue(session: Session, submission: SubmissionRow, shards: Iterable[list[str]], *,
            kind: str, actor: str, gpus: int = 0, max_attempts: int = 3) -> list[JobRow]:
    jobs = []
    for case_ids in shards:
        job = JobRow(submission=submission, kind=kind, case_ids=list(case_ids),
                     dataset_version=submission.dataset_version,
                     priority=SMOKE_PRIORITY if kind == JobKind.SMOKE else MAIN_PRIORITY,
                     gpus=gpus, max_attempts=max_attempts)
        session.add(job)
        jobs.append(job)
    session.flush()
    for job in jobs:
        record(session, "job", job.id, None, JobStatus.QUEUED, actor,
               f"{kind} job over {len(job.case_ids)} case(s)")
    return jobs


def lease(session: Session, owner: str, duration: timedelta = DEFAULT_LEASE, *,
          gpus_available: int = 0, gpus_at_least: int = 0) -> JobRow | None:
    """Lease the next queued job this node can run to `owner` (the fair-share order of
    engine/fair_share.py), or None (`gpus_at_least`: only a job needing that many GPUs or
    more, for a node's free GPU slot). Flushes; the caller commits (on PostgreSQL the row
    stays locked until then)."""
    for submissions in fair_share.lease_order(session, gpus_available, gpus_at_least):
        for submission_id in submissions:
            job = lease_from(session, submission_id, owner, duration, gpus_available,
                             gpus_at_least)
            if job is not None:
                return job
    return None


def lease_from(session: Session, submission_id: int, owner: str, duration: timedelta,
               gpus_available: int, gpus_at_least: int = 0) -> JobRow | None:
    """Lease this submission's oldest queued job at its lowest level."""
    return _take_first(
        session, (JobRow.submission_id == submission_id, JobRow.status == JobStatus.QUEUED,
                  JobRow.gpus <= gpus_available, JobRow.gpus >= gpus_at_least),
        lambda now: dict(status=JobStatus.LEASED, lease_owner=owner,
                         lease_expires_at=now + duration, heartbeat_at=now, leased_at=now,
                         attempts=JobRow.attempts + 1,
                         node_id=None),  # its node, if any, is named by the claim (nodes.assign)
        (JobStatus.QUEUED, JobStatus.LEASED), owner)


def _take_first(session: Session, eligible: tuple[Any, ...],
                values: Callable[[datetime], dict[str, Any]], states: tuple[str, str],
                owner: str, detail: str | None = None) -> JobRow | None:
    """The first eligible job (by level, then age) that this call wins with a conditional
    UPDATE: rows another worker holds are skipped (PostgreSQL's SKIP LOCKED), a row another
    has just taken (SQLite) is tried no more, and nothing of ours was changed. Flushes."""
    tried: set[int] = set()
    while True:
        candidate = session.execute(
            select(JobRow.id)
            .where(*eligible, JobRow.id.not_in(tried) if tried else True)
            .order_by(JobRow.priority, JobRow.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        ).scalar_one_or_none()
        if candidate is None:
            return None
        taken = session.execute(
            update(JobRow).where(JobRow.id == candidate, *eligible).values(**values(utcnow()))
        ).rowcount
        if taken == 1:
            record(session, "job", candidate, *states, owner, detail)
            session.flush()
            return session.get(JobRow, candidate, populate_existing=True)
        tried.add(candidate)


def transition(session: Session, job: JobRow, to_state: str, actor: str,
               detail: str | None = None, **values) -> None:
    """Move a job on, only if `actor` still holds its lease (a swept job is not ours)."""
    from_state = job.status
    changed = session.execute(
        update(JobRow)
        .where(JobRow.id == job.id, JobRow.status == from_state, JobRow.lease_owner == actor)
        .values(status=to_state, **values)
    ).rowcount
    if changed != 1:  # the caller's unit of work is the caller's to roll back
        raise LeaseLost(f"job {job.id} is no longer leased to {actor}")
    record(session, "job", job.id, from_state, to_state, actor, detail)
    session.flush()
    session.refresh(job)


def heartbeat(session: Session, job_id: int, owner: str,
              duration: timedelta = DEFAULT_LEASE) -> bool:
    now = utcnow()
    renewed = session.execute(
        update(JobRow)
        .where(JobRow.id == job_id, JobRow.lease_owner == owner, JobRow.status.in_(ACTIVE))
        .values(heartbeat_at=now, lease_expires_at=now + duration)
    ).rowcount
    return renewed == 1


def release_for_retry(session: Session, job: JobRow, actor: str, reason: str,
                      message: str, run_result: dict | None = None) -> None:
    """An INFRASTRUCTURE failure: queue the job again, or fail it when out of attempts.
    `run_result` keeps what happened (for organisers) even when the job is queued again."""
    kept = {"outcome": None} if run_result is None else {"run_result": run_result,
                                                         "outcome": None}
    if job.attempts >= job.max_attempts:
        transition(session, job, JobStatus.FAILED, actor, message, reason=reason, message=message,
                   finished_at=utcnow(), lease_owner=None, **kept)
    else:
        transition(session, job, JobStatus.QUEUED, actor, f"retry: {message}", lease_owner=None,
                   lease_expires_at=None, **kept)


def sweep(session: Session, actor: str, now: datetime | None = None, *,
          owner_dead: Callable[[str], bool] | None = None) -> list[int]:
    """Re-queue jobs whose worker vanished (its lease expired, or `owner_dead` says so at
    once: the caller knows which owners it can see); returns their ids. Flushes; the caller
    commits."""
    now = now or utcnow()
    stale = session.scalars(select(JobRow).where(JobRow.status.in_(ACTIVE))).all()
    swept = []
    for job in stale:
        expired = job.lease_expires_at is not None and job.lease_expires_at < now
        dead = (owner_dead is not None and job.lease_owner is not None
                and owner_dead(job.lease_owner))
        if not (expired or dead):
            continue
        if job.status == JobStatus.SCORING and job.outcome is not None:
            if _rescore(session, job, actor, now):
                swept.append(job.id)
            continue
        why = "lease expired" if expired else "worker process died"
        if take_back(session, job, actor, now,
                     why=f"the worker running this job vanished ({why}); it is run again",
                     too_often="the job's workers vanished too often; the platform will "
                               "look into it"):
            swept.append(job.id)
    session.flush()
    return swept


def take_back(session: Session, job: JobRow, actor: str, now: datetime, *, why: str,
              too_often: str) -> bool:
    """A job in hand whose worker or node is gone, back to the queue, or failed
    (INFRASTRUCTURE, `too_often` for the team) when out of attempts. Its lease is cleared,
    so whatever the old attempt says later is refused; only if nobody moved the job
    meanwhile (False then). `why` goes to the job's lifecycle."""
    out_of_attempts = job.attempts >= job.max_attempts
    to_state = JobStatus.FAILED if out_of_attempts else JobStatus.QUEUED
    values: dict[str, Any] = dict(lease_owner=None, lease_expires_at=None, outcome=None)
    if out_of_attempts:
        values.update(reason=FailureReason.INFRASTRUCTURE.value, finished_at=now,
                      message=too_often)
    changed = session.execute(
        update(JobRow).where(JobRow.id == job.id, JobRow.status == job.status,
                             JobRow.lease_owner == job.lease_owner)
        .values(status=to_state, **values)).rowcount
    if changed:
        record(session, "job", job.id, job.status, to_state, actor, why)
    return bool(changed)


def _rescore(session: Session, job: JobRow, actor: str, now: datetime) -> bool:
    """The scorer of a stored outcome vanished: the outcome waits for the next scorer (the
    run is not repeated), or the job fails once MAX_SCORINGS scorers vanished on it."""
    exhausted = job.scorings >= MAX_SCORINGS
    values = dict(lease_owner=None, lease_expires_at=None)
    if exhausted:
        message = ("scoring this job's outputs stopped too often; the platform will look "
                   "into it")
        values.update(status=JobStatus.FAILED, reason=FailureReason.INFRASTRUCTURE.value,
                      message=message, finished_at=now, outcome=None)
    else:
        message = "the scorer vanished; the outputs are scored again (the run is kept)"
    changed = session.execute(
        update(JobRow).where(JobRow.id == job.id, JobRow.status == JobStatus.SCORING,
                             JobRow.lease_owner == job.lease_owner).values(**values)
    ).rowcount
    if changed:
        record(session, "job", job.id, JobStatus.SCORING,
               JobStatus.FAILED if exhausted else JobStatus.SCORING, actor, message)
    return bool(changed)


def lease_scoring(session: Session, owner: str, duration: timedelta = DEFAULT_LEASE
                  ) -> JobRow | None:
    """Take the next stored outcome no scorer holds, for `owner` until the lease ends (a
    scorer renews it with `heartbeat`). Flushes; the caller commits."""
    return _take_first(
        session, (JobRow.status == JobStatus.SCORING, JobRow.outcome.is_not(None),
                  JobRow.lease_owner.is_(None)),
        lambda now: dict(lease_owner=owner, lease_expires_at=now + duration,
                         heartbeat_at=now, scorings=JobRow.scorings + 1),
        (JobStatus.SCORING, JobStatus.SCORING), owner, "scoring the stored outcome")


def position(session: Session, submission: SubmissionRow) -> int | None:
    """How many queued jobs the fair-share policy leases before this submission's first
    queued job, as the queue stands (None: nothing of it is queued)."""
    return fair_share.jobs_ahead(session, submission.id)


def estimated_wait(session: Session, submission: SubmissionRow) -> timedelta | None:
    """Jobs ahead x the recent mean job duration / active workers (at least one)."""
    ahead = position(session, submission)
    if ahead is None:
        return None
    recent = session.scalars(select(JobRow).where(JobRow.status == JobStatus.SUCCEEDED,
                                                  JobRow.started_at.is_not(None))
                             .order_by(JobRow.finished_at.desc()).limit(50)).all()
    durations = [(j.finished_at - j.started_at).total_seconds() for j in recent
                 if j.finished_at and j.started_at]
    if not durations:
        return None
    mean = sum(durations) / len(durations)
    # jobs on nodes, one per busy slot (a local worker's slots share one owner; scorers
    # hold no slot)
    busy = session.scalar(select(func.count()).select_from(JobRow).where(
        JobRow.status.in_(ON_A_NODE_JOB_STATES))) or 0
    slots = max(busy, 1)
    # the jobs ahead, shared among the busy slots, plus half a job still running on average
    return timedelta(seconds=mean * (ahead / slots + (0.5 if busy else 0.0)))
