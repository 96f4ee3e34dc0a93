"""`DbCoordinator`: the coordinator side of the seam, over the database, in this process.

Each call is an edge: it opens its own session and commits its own unit of work, so a
lost lease (`LeaseLost`: the job was swept or cancelled, or another attempt holds it)
never rolls back anyone else's work. `complete` is the trusted part: the only reader of
ground truth. It marks the job scoring, validates and scores the outputs
(engine/evaluation.py) with no transaction open, then writes every case result, the
job's end and what follows in the submission's life (engine/lifecycle.py) in one
transaction. Sweeping happens here too (`maintenance`), with the caller's idea of a
dead owner: liveness of local processes is a node's knowledge, not the queue's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from engine import queue
from engine.challenges import Challenge, challenge_definition
from engine.config import Settings
from engine.datasets import DatasetError, VerificationCache
from engine.db.models import CaseResultRow, EventRow, JobRow, utcnow
from engine.errors import LeaseLost
from engine.evaluation import (
    EvaluatorFailed,
    SandboxLimits,
    ScoredCase,
    run_failed,
    score_outputs,
    verified_dataset,
)
from engine.lifecycle import after_job
from engine.metrics import observe_job_runtime
from engine.provenance import job_provenance
from engine.statuses import JobKind, JobStatus
from engine.worker.protocol import (
    Coordinator,
    JobOutcome,
    JobTicket,
    PlatformFailure,
    messages_platform,
    platform_step,
)
from runners.base import FailureReason, Runner, RunResult
from runners.image_user import numeric_pair

__all__ = ["Coordinator", "DbCoordinator", "JobOutcome", "JobTicket", "LeaseLost",
           "PlatformFailure", "messages_platform"]
DETAIL_KEPT = 20000  # the end of a traceback is where its cause is


class DbCoordinator:
    def __init__(self, sessions: sessionmaker[Session], settings: Settings, owner: str, *,
                 owner_dead: Callable[[str], bool] | None = None,
                 lease_duration: timedelta = queue.DEFAULT_LEASE,
                 runner: Runner | None = None, scoring_workers: int | None = None,
                 work_dir: Path | None = None):
        self.sessions = sessions
        self.settings = settings
        self.owner = owner
        self.actor = f"worker {owner}"
        self.owner_dead = owner_dead
        self.lease_duration = lease_duration
        self.runner = runner  # runs the organisers' evaluation image, where there is one
        self.scoring_workers = scoring_workers
        self.work_dir = work_dir or settings.work_dir
        self.verify_cache = VerificationCache(settings.state_dir / "verify")

    # -- the queue ----------------------------------------------------------------------

    def lease(self, capacity: int, *, min_gpus: int = 0) -> JobTicket | None:
        with self.sessions() as session:
            job = queue.lease(session, self.owner, self.lease_duration, gpus_available=capacity,
                              gpus_at_least=min_gpus)
            ticket = None if job is None else self._ticket(job)
            session.commit()
            return ticket

    def heartbeat(self, ticket: JobTicket) -> bool:
        with self.sessions() as session:
            renewed = queue.heartbeat(session, ticket.job_id, self.owner, self.lease_duration)
            session.commit()
            return renewed

    def started(self, ticket: JobTicket) -> None:
        with self.sessions() as session:
            queue.transition(session, self._held(session, ticket), JobStatus.RUNNING,
                             self.owner, started_at=utcnow())
            session.commit()

    def retry(self, ticket: JobTicket, message: str, detail: str | None = None, *,
              node: Mapping[str, Any] | None = None,
              outcome: JobOutcome | None = None) -> None:
        """`outcome` when the run happened and the failure came after (scoring, the seal);
        `node` the node's facts when it did not (a node's own failure before a report)."""
        record = {} if outcome is None else {**outcome.result.to_dict(),
                                               "gpus": dict(outcome.gpu_usage)}
        if detail is not None:
            record["infrastructure_detail"] = detail[-DETAIL_KEPT:]
        self._release(ticket, message, record, outcome=outcome, node=node)

    def maintenance(self) -> None:
        """Re-queue the jobs of vanished workers; a job out of attempts ends like any other:
        its submission moves on (and an INFRASTRUCTURE end never counts against the team)."""
        with self.sessions() as session:
            for job_id in queue.sweep(session, self.actor, owner_dead=self.owner_dead):
                job = session.get(JobRow, job_id, populate_existing=True)
                if job is not None and job.status == JobStatus.FAILED:
                    after_job(session, job, self.actor)
            session.commit()

    # -- the trusted part: score and write ----------------------------------------------

    def complete(self, ticket: JobTicket, outcome: JobOutcome) -> None:
        result = outcome.result
        if result.reason is FailureReason.INFRASTRUCTURE:
            self._release(ticket, result.message, {
                **result.to_dict(), "gpus": dict(outcome.gpu_usage),
                "infrastructure_detail": result.detail[-DETAIL_KEPT:]}, outcome=outcome)
            return
        with self.sessions() as session:
            job = self._held(session, ticket)
            phase = job.submission.phase  # the reference is ours: never taken from a report
            challenge = challenge_definition(phase.challenge)
            reference = (phase.dataset_path, job.dataset_version)  # the job's own version
            queue.transition(session, job, JobStatus.SCORING, self.owner)
            session.commit()
        try:
            dataset = verified_dataset(*reference, self.verify_cache,
                                       what=f"job {ticket.job_id}")
        except DatasetError as exc:
            self.retry(ticket, f"the test set failed verification: {exc}", outcome=outcome)
            return
        try:
            with platform_step("validating and scoring the outputs"):
                cases = score_outputs(challenge, dataset, list(ticket.case_ids), result,
                                      Path(outcome.output_dir), runner=self.runner,
                                      work_dir=self.work_dir, workers=self.scoring_workers)
        except EvaluatorFailed as exc:
            self.retry(ticket, str(exc), outcome=outcome)
            return
        self._write(ticket, outcome, challenge, cases, dataset.version)

    def _write(self, ticket: JobTicket, outcome: JobOutcome, challenge: Challenge,
               cases: list[ScoredCase], manifest_sha256: str) -> None:
        """Every case result, the job's end and what follows: all or nothing."""
        result = outcome.result
        with self.sessions() as session:
            job = self._held(session, ticket)
            shared = None if result.wall_seconds is None else result.wall_seconds / len(cases)
            for case in cases:
                session.add(CaseResultRow(
                    submission_id=job.submission_id, job_id=job.id, case_id=case.case_id,
                    valid=case.valid, reason=case.reason, message=case.message,
                    metrics=case.metrics, runtime_seconds=shared,
                    runtime_exact=len(cases) == 1, output_sha256=case.output_sha256))
            run_record = {**result.to_dict(), "gpus": dict(outcome.gpu_usage),
                          "provenance": attempt_provenance(
                              job, node=outcome.node, spec=outcome.run_spec, result=result,
                              manifest_sha256=manifest_sha256,
                              output_sha256={c.case_id: c.output_sha256 for c in cases})}
            ended = dict(run_result=run_record, finished_at=utcnow(), lease_owner=None)
            failed = run_failed(result)
            first_invalid = next((c for c in cases if not c.valid), None)
            if job.kind == JobKind.SMOKE and not failed and first_invalid is not None:
                # the smoke case must be valid too: a wrong file name fails fast, not per shard
                queue.transition(session, job, JobStatus.FAILED, self.owner,
                                 first_invalid.message, reason=first_invalid.reason,
                                 message=first_invalid.message, **ended)
            elif failed:
                queue.transition(session, job, JobStatus.FAILED, self.owner, result.message,
                                 reason=result.reason.value, message=result.message, **ended)
            else:
                invalid = sum(not c.valid for c in cases)
                queue.transition(session, job, JobStatus.SUCCEEDED, self.owner,
                                 f"{len(cases) - invalid} valid, {invalid} invalid case(s)",
                                 **ended)
            after_job(session, job, self.actor)
            session.commit()
        observe_job_runtime(str(ticket.kind), result.wall_seconds)

    # -- for a coordinator that serves remote nodes (engine/api/workers.py) ------------

    def held_ticket(self, job_id: int, attempt: int) -> JobTicket:
        """The ticket of a job still leased to us for this attempt, built from the database
        (never from a node's copy); else LeaseLost."""
        with self.sessions() as session:
            stub = JobTicket(job_id=job_id, attempt=attempt, kind="", submission_id=0,
                             case_ids=(), image_id="", image_user=None,
                             image_archive_sha256=None, limits=None,  # type: ignore[arg-type]
                             gpus=0, dataset_path="", dataset_version="")
            return self._ticket(self._held(session, stub))

    def ended_by_us(self, job_id: int, attempt: int) -> str | None:
        """The state this owner (one attempt: its token's hash) already moved the job to
        (an end, or back to the queue), or None: a repeated completion is answered, never
        applied twice."""
        with self.sessions() as session:
            return session.scalar(
                select(EventRow.to_state)
                .where(EventRow.entity == "job", EventRow.entity_id == job_id,
                       EventRow.actor == self.owner,
                       EventRow.to_state.in_([*queue.TERMINAL, JobStatus.QUEUED]))
                .order_by(EventRow.id.desc()).limit(1))

    def scoring_now(self, job_id: int, attempt: int) -> bool:
        """This attempt's completion is being scored (a repeated request meanwhile)."""
        with self.sessions() as session:
            job = session.get(JobRow, job_id)
            return (job is not None and job.attempts == attempt
                    and job.status == JobStatus.SCORING and job.lease_owner == self.owner)

    # -- helpers ------------------------------------------------------------------------

    def _release(self, ticket: JobTicket, message: str, run_record: dict, *,
                 outcome: JobOutcome | None = None,
                 node: Mapping[str, Any] | None = None) -> None:
        """INFRASTRUCTURE: queue the job again, or fail it (and move its submission on).
        The attempt keeps its provenance either way: what ran where, and what it wrote."""
        with self.sessions() as session:
            job = self._held(session, ticket)
            result = None if outcome is None else outcome.result
            run_record = {**run_record, "provenance": attempt_provenance(
                job, node=outcome.node if outcome is not None else node or {},
                spec=None if outcome is None else outcome.run_spec, result=result,
                # the node verified the seal of the job's version before it ran
                manifest_sha256=job.dataset_version if outcome is not None else None,
                output_sha256={})}  # nothing was scored: no output is vouched for
            queue.release_for_retry(session, job, self.owner,
                                    FailureReason.INFRASTRUCTURE.value, message,
                                    run_result=run_record)
            ended = job.status == JobStatus.FAILED
            if ended:
                after_job(session, job, self.actor)
            session.commit()
        if ended and result is not None:
            observe_job_runtime(str(ticket.kind), result.wall_seconds)

    def _held(self, session: Session, ticket: JobTicket) -> JobRow:
        """The ticket's job, still leased to us for this very attempt; else LeaseLost."""
        job = session.get(JobRow, ticket.job_id, populate_existing=True)
        if (job is None or job.status not in queue.ACTIVE or job.lease_owner != self.owner
                or job.attempts != ticket.attempt):
            raise LeaseLost(f"job {ticket.job_id} (attempt {ticket.attempt}) is no longer "
                            f"leased to {self.owner}")
        return job

    def _ticket(self, job: JobRow) -> JobTicket:
        submission, image = job.submission, job.submission.image
        phase = challenge_definition(submission.phase.challenge).phase(submission.phase.slug)
        return JobTicket(
            job_id=job.id, attempt=job.attempts, kind=str(job.kind),
            submission_id=submission.id, case_ids=tuple(job.case_ids),
            image_id=image.image_id,
            image_user=image.user if numeric_pair(image.user or "") else None,
            image_archive_sha256=image.archive_sha256, limits=SandboxLimits.of(phase.limits),
            gpus=job.gpus, dataset_path=submission.phase.dataset_path,
            dataset_version=job.dataset_version,
            labels={"org.epreuve.job": str(job.id),
                    "org.epreuve.submission": str(submission.id)})


def attempt_provenance(job: JobRow, *, node: Mapping[str, Any],
                       spec: Mapping[str, Any] | None, result: RunResult | None,
                       manifest_sha256: str | None,
                       output_sha256: Mapping[str, Mapping[str, str]]) -> dict[str, Any]:
    """The provenance record of one attempt (docs/provenance.md): the node's facts and the
    RunSpec as the node reported them, the rest from our own rows. Without a run (the node
    failed before one) the start and end are the job's, as the queue saw them."""
    submission = job.submission
    phase = submission.phase
    return job_provenance(
        image=submission.image, challenge=phase.challenge, phase=phase,
        manifest_sha256=manifest_sha256, spec=spec, node=node,
        started_at=result.started_at if result is not None else job.started_at,
        finished_at=result.finished_at if result is not None else utcnow(),
        output_sha256=output_sha256, case_ids=job.case_ids, run_result=result)
