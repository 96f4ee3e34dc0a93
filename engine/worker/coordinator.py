"""`DbCoordinator`: the coordinator side of the seam, over the database, in this process.

Each call is an edge: it opens its own session and commits its own unit of work, so a
lost lease (`LeaseLost`: the job was swept or cancelled, or another attempt holds it)
never rolls back anyone else's work. The trusted part is scorer.py, the only reader of
ground truth: `complete` (a local run) parks the outcome on the job under our lease and
scores it here through `score_job`; `accept` (a remote run, engine/api/workers.py) parks
it for a scorer and returns at once. Sweeping happens here too (`maintenance`), with the
caller's idea of a dead owner: liveness of local processes is a node's knowledge, not the
queue's.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from engine import live_logs, nodes, queue
from engine.challenges import challenge_definition
from engine.config import Settings
from engine.db.models import EventRow, JobRow, NodeRow, utcnow
from engine.errors import LeaseLost
from engine.evaluation import SandboxLimits
from engine.node_description import InvalidNode
from engine.statuses import JobStatus
from engine.worker.protocol import (
    Coordinator,
    JobOutcome,
    JobTicket,
    PlatformFailure,
    messages_platform,
)
from engine.worker.scorer import Scoring, attempt_provenance, park, release, score_job, sweep
from runners.base import FailureReason, Runner
from runners.image_user import numeric_pair

__all__ = ["Coordinator", "DbCoordinator", "JobOutcome", "JobTicket", "LeaseLost",
           "PlatformFailure", "attempt_provenance", "messages_platform"]
log = logging.getLogger(__name__)


class DbCoordinator:
    def __init__(self, sessions: sessionmaker[Session], settings: Settings, owner: str, *,
                 owner_dead: Callable[[str], bool] | None = None,
                 lease_duration: timedelta = queue.DEFAULT_LEASE,
                 runner: Runner | None = None, scoring_workers: int | None = None,
                 work_dir: Path | None = None, adopts_outcomes: bool = False,
                 node_id: int | None = None, lost_after: timedelta | None = None):
        self.sessions = sessions
        self.settings = settings
        self.owner = owner
        self.actor = f"worker {owner}"
        self.owner_dead = owner_dead
        self.lease_duration = lease_duration
        self.runner = runner  # runs the organisers' evaluation image, where there is one
        # a local node is on the trusted side: it scores outcomes no scorer holds (a local
        # worker that died mid-scoring) when it sweeps; a server's sweeper never does
        self.adopts_outcomes = adopts_outcomes
        self.scoring = Scoring(settings, runner=runner, work_dir=work_dir or settings.work_dir,
                               workers=scoring_workers)
        self.node_id = node_id  # the registered node this coordinator leases for, if any
        self.node_samples: Mapping[str, Any] | None = None  # its GPUs' latest readings
        self.lost_after = lost_after  # None: this coordinator marks no node lost
        self._logs_pruned_at: float | None = None

    @property
    def work_dir(self) -> Path:
        """The evaluation image's scratch (a local worker's own work directory)."""
        return self.scoring.work_dir

    @work_dir.setter
    def work_dir(self, path: Path) -> None:
        self.scoring.work_dir = path

    # -- the queue ----------------------------------------------------------------------

    def lease(self, capacity: int, *, min_gpus: int = 0) -> JobTicket | None:
        with self.sessions() as session:
            job = queue.lease(session, self.owner, self.lease_duration, gpus_available=capacity,
                              gpus_at_least=min_gpus)
            ticket = None if job is None else self._ticket(job)
            if self.node_id is not None:
                self._heard_from(session, quiet_seconds=2.0)
                if job is not None:
                    nodes.assign(session, job.id, self.node_id)
            session.commit()
            return ticket

    def heartbeat(self, ticket: JobTicket) -> bool:
        with self.sessions() as session:
            renewed = queue.heartbeat(session, ticket.job_id, self.owner, self.lease_duration)
            if self.node_id is not None:
                # a copy: the slots' samplers write the readings while this reads them
                self._heard_from(session, dict(self.node_samples or {}))
            session.commit()
            return renewed

    def started(self, ticket: JobTicket) -> None:
        with self.sessions() as session:
            queue.transition(session, self._held(session, ticket), JobStatus.RUNNING,
                             self.owner, started_at=utcnow())
            session.commit()

    def log(self, ticket: JobTicket, text: str) -> None:
        """Where the server's route keeps a remote node's chunks: the pages read one place."""
        live_logs.append(self.settings.state_dir, ticket.job_id, ticket.attempt, text)

    def retry(self, ticket: JobTicket, message: str, detail: str | None = None, *,
              node: Mapping[str, Any] | None = None,
              outcome: JobOutcome | None = None) -> None:
        """`outcome` when the run happened and the failure came after (scoring, the seal);
        `node` the node's facts when it did not (a node's own failure before a report)."""
        release(self.sessions, ticket.job_id, self.owner, message, outcome, detail=detail,
                node=node, attempt=ticket.attempt)

    def maintenance(self) -> None:
        """Re-queue the jobs of vanished workers (a job out of attempts ends like any other:
        its submission moves on); a stored outcome whose scorer vanished is scored again,
        never run again; the jobs of lost nodes (unheard for `lost_after`) are re-queued."""
        sweep(self.sessions, self.actor, owner_dead=self.owner_dead, lost_after=self.lost_after)
        if self.adopts_outcomes:
            self._score_an_orphan()
        self._prune_live_logs_when_due()

    def awaiting_scoring(self) -> int:
        return 0  # a local run is scored inside complete(), before it returns

    def _prune_live_logs_when_due(self, every_seconds: float = 60.0) -> None:
        """The live logs of attempts no page reads any more go (engine/live_logs.py)."""
        clock = time.monotonic()
        if self._logs_pruned_at is not None and clock - self._logs_pruned_at < every_seconds:
            return
        self._logs_pruned_at = clock
        with self.sessions() as session:
            in_hand = live_logs.attempts_in_hand(session)
        live_logs.prune(self.settings.state_dir, in_hand)

    def _score_an_orphan(self) -> None:
        """One stored outcome no scorer holds, scored here (at most one per sweep: the
        node's own queue comes first)."""
        with self.sessions() as session:
            job = queue.lease_scoring(session, self.owner, self.lease_duration)
            job_id = None if job is None else job.id
            session.commit()
        if job_id is not None:
            with contextlib.suppress(LeaseLost):  # cancelled or swept meanwhile: not ours
                score_job(self.sessions, job_id, self.owner, self.scoring)

    # -- the trusted part: park the outcome, score it here (scorer.py) ----------------

    def complete(self, ticket: JobTicket, outcome: JobOutcome) -> None:
        """A local run: its outcome is parked under our lease and scored here at once,
        through the one scoring path (a remote one is parked for a scorer: `accept`)."""
        if self._released_as_ours(ticket, outcome):
            return
        self._park(ticket, outcome, keep_lease=True)
        score_job(self.sessions, ticket.job_id, self.owner, self.scoring,
                  attempt=ticket.attempt)

    def accept(self, ticket: JobTicket, outcome: JobOutcome) -> None:
        """A remote run: its outcome waits on the job for a scorer; the node goes on."""
        if not self._released_as_ours(ticket, outcome):
            self._park(ticket, outcome, keep_lease=False)

    def _released_as_ours(self, ticket: JobTicket, outcome: JobOutcome) -> bool:
        """A run that failed on the platform's side is retried, not scored."""
        result = outcome.result
        if result.reason is not FailureReason.INFRASTRUCTURE:
            return False
        release(self.sessions, ticket.job_id, self.owner, result.message, outcome,
                detail=result.detail, attempt=ticket.attempt)
        return True

    def _park(self, ticket: JobTicket, outcome: JobOutcome, *, keep_lease: bool) -> None:
        with self.sessions() as session:
            park(session, self._held(session, ticket), self.owner, outcome,
                 keep_lease=self.lease_duration if keep_lease else None)
            session.commit()

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

    def answered(self, job_id: int, attempt: int) -> str | None:
        """The state this attempt's report (its owner: the token's hash) already led to, or
        None when it made none: a repeated completion or retry is answered, never applied
        twice. A completion parked by us answers the job's state while the attempt is still
        the job's (scoring, or its end); after a retry and a new attempt, "queued"."""
        with self.sessions() as session:
            last = session.scalar(
                select(EventRow.to_state)
                .where(EventRow.entity == "job", EventRow.entity_id == job_id,
                       EventRow.actor == self.owner)
                .order_by(EventRow.id.desc()).limit(1))
            if last in (*queue.TERMINAL, JobStatus.QUEUED):
                return last
            if last != JobStatus.SCORING:
                return None  # leased or running: not reported yet
            job = session.get(JobRow, job_id)
            return job.status if job.attempts == attempt else JobStatus.QUEUED

    # -- helpers ------------------------------------------------------------------------

    def _heard_from(self, session: Session, samples: Mapping[str, Any] | None = None, *,
                    quiet_seconds: float = 0) -> None:
        node = session.get(NodeRow, self.node_id)
        if node is not None:
            try:
                nodes.heard_from(session, node, self.actor, samples,
                                 quiet_seconds=quiet_seconds)
            except InvalidNode as exc:  # our own sampler's reading: dropped, not fatal
                log.warning("GPU readings of node %s dropped: %s", node.name, exc)
                nodes.heard_from(session, node, self.actor)

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

