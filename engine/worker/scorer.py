"""Scoring on the trusted side: the only reader of ground truth.

A run's end is parked on its job: the outcome a node reported (RunResult, GPU usage, the
node's facts, the RunSpec, where its outputs are on this side) is stored in `jobs.outcome`
and the job waits in SCORING (`park`). A scorer takes it with a scoring lease
(queue.lease_scoring), validates and scores the outputs (engine/evaluation.py, with the
organisers' evaluation image where the phase has one), and writes every case result, the
job's end and what follows in the submission's life in one transaction, fenced by its lease:
a scorer that lost it writes nothing (`score_job`). A scorer killed mid-scoring: its lease
expires, the sweep hands the outcome to the next scorer, the run is never repeated.

`score_job` is the one scoring path: the `Scorer` loop (a thread of `epreuve serve`, or
`epreuve scorer` on its own) calls it for remote completions, and the local worker
(engine/worker/coordinator.py) calls it in-process for its own runs, keeping its lease.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from engine import nodes, queue
from engine.challenges import Challenge, challenge_definition
from engine.config import Settings
from engine.datasets import DatasetError, VerificationCache
from engine.db.models import CaseResultRow, JobRow, utcnow
from engine.errors import LeaseLost
from engine.evaluation import (
    EvaluatorFailed,
    ScoredCase,
    run_failed,
    score_outputs,
    verified_dataset,
)
from engine.lifecycle import after_job
from engine.metrics import observe_job_runtime
from engine.provenance import job_provenance
from engine.statuses import JobKind, JobStatus
from engine.worker.protocol import JobOutcome, PlatformFailure, messages_platform, platform_step
from engine.worker.wire import result_from_json
from runners.base import FailureReason, Runner, RunResult
from runners.docker import owner_alive, owner_token

log = logging.getLogger("epreuve.scorer")
DETAIL_KEPT = 20000  # the end of a traceback is where its cause is
SCORING_LEASE = timedelta(seconds=60)
SCORER_PREFIX = "scorer:"


# -- the stored outcome ---------------------------------------------------------------------


def outcome_record(outcome: JobOutcome, attempt: int) -> dict[str, Any]:
    """A JobOutcome as data for `jobs.outcome` (every part is JSON already: the node sent
    it as JSON, or the local agent built it for the run record)."""
    return {"attempt": attempt, "result": outcome.result.to_dict(),
            "gpu_usage": dict(outcome.gpu_usage), "output_dir": str(outcome.output_dir),
            # a run may leave no output directory at all; one that vanishes later is ours
            "outputs_kept": Path(outcome.output_dir).is_dir(),
            "node": dict(outcome.node), "run_spec": outcome.run_spec}


def outcome_of(record: Mapping[str, Any]) -> JobOutcome:
    return JobOutcome(result_from_json(record["result"]), dict(record["gpu_usage"]),
                      str(record["output_dir"]), node=dict(record.get("node") or {}),
                      run_spec=record.get("run_spec"))


def park(session: Session, job: JobRow, owner: str, outcome: JobOutcome, *,
         keep_lease: timedelta | None) -> None:
    """The run is over: its outcome waits on the job (SCORING). `keep_lease`: the owner
    scores it at once under its lease (a local worker); None: any scorer takes it."""
    now = utcnow()
    held = (dict(lease_owner=owner, lease_expires_at=now + keep_lease, heartbeat_at=now)
            if keep_lease is not None else dict(lease_owner=None, lease_expires_at=None))
    queue.transition(session, job, JobStatus.SCORING, owner,
                     "the run is over; its outputs wait for scoring",
                     outcome=outcome_record(outcome, job.attempts), scorings=0, **held)


# -- scoring one job ------------------------------------------------------------------------


class Scoring:
    """What scoring needs besides the database: the settings, the evaluation image's runner
    (built on first need: most phases have no evaluation image), a scratch directory."""

    def __init__(self, settings: Settings, *, runner: Runner | Callable[[], Runner] | None = None,
                 work_dir: Path | None = None, workers: int | None = None):
        self.settings = settings
        self._runner = runner
        self.work_dir = work_dir or settings.work_dir / "scoring"
        self.workers = workers
        self.verify_cache = VerificationCache(settings.state_dir / "verify")
        self._lock = threading.Lock()

    def runner_for(self, challenge: Challenge) -> Runner | None:
        if not challenge.metrics.evaluation_image:
            return None
        self.work_dir.mkdir(parents=True, exist_ok=True)  # the evaluation image's scratch
        with self._lock:
            if callable(self._runner) and not hasattr(self._runner, "run"):
                self._runner = self._runner()
            return self._runner  # type: ignore[return-value]


def default_runner(settings: Settings) -> Callable[[], Runner]:
    """The server's own Docker, for the organisers' evaluation images."""
    def build() -> Runner:
        from runners import make_runner

        return make_runner(settings.runner, state_dir=settings.state_dir / "scoring-runs")
    return build


def score_job(sessions: sessionmaker[Session], job_id: int, owner: str,
              scoring: Scoring, *, attempt: int | None = None) -> str:
    """Validate and score the stored outcome of a job `owner` holds in SCORING, and write
    the results and the job's end, all or nothing; the state reached. LeaseLost when the
    lease was lost (nothing written). A failure of ours re-queues the run (INFRASTRUCTURE)."""
    with sessions() as session:
        job = _held(session, job_id, owner, attempt)
        phase = job.submission.phase  # the reference is ours: never taken from a report
        challenge = challenge_definition(phase.challenge)
        reference = (phase.dataset_path, job.dataset_version)  # the job's own version
        outcome = outcome_of(job.outcome)
        outputs_kept = bool(job.outcome.get("outputs_kept"))
        case_ids = list(job.case_ids)
    if outputs_kept and not Path(outcome.output_dir).is_dir():
        return release(sessions, job_id, owner, "the run's outputs were lost on the server's "
                       "side; the job is run again", outcome)
    try:
        dataset = verified_dataset(*reference, scoring.verify_cache, what=f"job {job_id}")
    except DatasetError as exc:
        return release(sessions, job_id, owner, f"the test set failed verification: {exc}",
                       outcome)
    try:
        with platform_step("validating and scoring the outputs"):
            cases = score_outputs(challenge, dataset, case_ids, outcome.result,
                                  Path(outcome.output_dir), runner=scoring.runner_for(challenge),
                                  work_dir=scoring.work_dir, workers=scoring.workers)
    except EvaluatorFailed as exc:
        return release(sessions, job_id, owner, str(exc), outcome)
    except PlatformFailure as exc:  # ours, while scoring: retried, never the team's
        log.error("scoring job %s failed while %s:\n%s", job_id, exc.stage, exc.detail)
        return release(sessions, job_id, owner, messages_platform(exc.stage), outcome,
                       detail=exc.detail)
    return write(sessions, job_id, owner, outcome, cases, dataset.version)


def write(sessions: sessionmaker[Session], job_id: int, owner: str, outcome: JobOutcome,
          cases: list[ScoredCase], manifest_sha256: str) -> str:
    """Every case result, the job's end and what follows: all or nothing, and only while
    `owner` still holds the job (the fence goes first: a lost lease writes no row)."""
    result = outcome.result
    with sessions() as session:
        job = _held(session, job_id, owner)
        run_record = {**result.to_dict(), "gpus": dict(outcome.gpu_usage),
                      "provenance": attempt_provenance(
                          job, node=outcome.node, spec=outcome.run_spec, result=result,
                          manifest_sha256=manifest_sha256,
                          output_sha256={c.case_id: c.output_sha256 for c in cases})}
        ended = dict(run_result=run_record, finished_at=utcnow(), lease_owner=None,
                     outcome=None)
        first_invalid = next((c for c in cases if not c.valid), None)
        if job.kind == JobKind.SMOKE and not run_failed(result) and first_invalid is not None:
            # the smoke case must be valid too: a wrong file name fails fast, not per shard
            queue.transition(session, job, JobStatus.FAILED, owner, first_invalid.message,
                             reason=first_invalid.reason, message=first_invalid.message,
                             **ended)
        elif run_failed(result):
            queue.transition(session, job, JobStatus.FAILED, owner, result.message,
                             reason=result.reason.value, message=result.message, **ended)
        else:
            invalid = sum(not c.valid for c in cases)
            queue.transition(session, job, JobStatus.SUCCEEDED, owner,
                             f"{len(cases) - invalid} valid, {invalid} invalid case(s)",
                             **ended)
        shared = None if result.wall_seconds is None else result.wall_seconds / len(cases)
        for case in cases:
            session.add(CaseResultRow(
                submission_id=job.submission_id, job_id=job.id, case_id=case.case_id,
                valid=case.valid, reason=case.reason, message=case.message,
                metrics=case.metrics, runtime_seconds=shared,
                runtime_exact=len(cases) == 1, output_sha256=case.output_sha256))
        session.flush()
        after_job(session, job, actor_of(owner))
        state, kind = str(job.status), str(job.kind)
        session.commit()
    observe_job_runtime(kind, result.wall_seconds)
    return state


def release(sessions: sessionmaker[Session], job_id: int, owner: str, message: str,
            outcome: JobOutcome | None, *, detail: str | None = None,
            node: Mapping[str, Any] | None = None, attempt: int | None = None) -> str:
    """INFRASTRUCTURE: queue the job again (its run too), or fail it when out of attempts
    and move its submission on. The attempt keeps its provenance either way: what ran
    where, and what it wrote. `outcome` when the run happened; `node` when it did not."""
    result = None if outcome is None else outcome.result
    record = {} if outcome is None else {**result.to_dict(), "gpus": dict(outcome.gpu_usage)}
    if detail is not None:
        record["infrastructure_detail"] = detail[-DETAIL_KEPT:]
    with sessions() as session:
        job = _held(session, job_id, owner, attempt)
        record["provenance"] = attempt_provenance(
            job, node=outcome.node if outcome is not None else node or {},
            spec=None if outcome is None else outcome.run_spec, result=result,
            # the node verified the seal of the job's version before it ran
            manifest_sha256=job.dataset_version if outcome is not None else None,
            output_sha256={})  # nothing was scored: no output is vouched for
        queue.release_for_retry(session, job, owner, FailureReason.INFRASTRUCTURE.value,
                                message, run_result=record)
        ended = job.status == JobStatus.FAILED
        if ended:
            after_job(session, job, actor_of(owner))
        state, kind = str(job.status), str(job.kind)
        session.commit()
    if ended and result is not None:
        observe_job_runtime(kind, result.wall_seconds)
    return state


def _held(session: Session, job_id: int, owner: str, attempt: int | None = None) -> JobRow:
    """The job, still held by `owner` in an active state (for this very attempt, when one
    is named: a local worker's owner outlives its attempts); else LeaseLost."""
    job = session.get(JobRow, job_id, populate_existing=True)
    if (job is None or job.status not in queue.ACTIVE or job.lease_owner != owner
            or (attempt is not None and job.attempts != attempt)):
        raise LeaseLost(f"job {job_id} is no longer held by {owner}")
    return job


def actor_of(owner: str) -> str:
    """Who the history names: a scorer by its own name, a node's worker as before."""
    return owner if owner.startswith(SCORER_PREFIX) else f"worker {owner}"


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


# -- the sweep, shared by every coordinator and scorer ---------------------------------------


def sweep(sessions: sessionmaker[Session], actor: str, *,
          owner_dead: Callable[[str], bool] | None = None,
          lost_after: timedelta | None = None) -> list[int]:
    """Re-queue the jobs of vanished workers, hand the outcomes of vanished scorers to the
    next; a job that ended here moves its submission on (an INFRASTRUCTURE end never counts
    against the team)."""
    def dead(owner: str) -> bool:
        return scorer_dead(owner) or (owner_dead is not None and owner_dead(owner))

    with sessions() as session:
        swept = queue.sweep(session, actor, owner_dead=dead)
        if lost_after is not None:  # nodes unheard this long: their jobs run elsewhere
            swept += nodes.sweep_lost(session, lost_after, actor)
        for job_id in swept:
            job = session.get(JobRow, job_id, populate_existing=True)
            if job is not None and job.status == JobStatus.FAILED:
                after_job(session, job, actor)
        session.commit()
    return swept


def scorer_owner() -> str:
    """A scorer's lease owner: unique, and naming its process so that a sweep on the same
    host sees at once that it died (any other host waits for its lease to end)."""
    return f"{SCORER_PREFIX}{uuid.uuid4().hex[:12]}@{owner_token()}"


def scorer_dead(owner: str) -> bool:
    if not owner.startswith(SCORER_PREFIX):
        return False
    return not owner_alive(owner.partition("@")[2])


# -- the scorer loop ----------------------------------------------------------------------


class Scorer:
    """Takes stored outcomes one at a time and scores them, renewing its scoring lease
    meanwhile; sweeps every `sweep_seconds` so that it works with no server beside it
    (None: the server's sweeper does it)."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings, *,
                 lease: timedelta = SCORING_LEASE, poll_seconds: float = 1.0,
                 sweep_seconds: float | None = 5.0, scoring: Scoring | None = None,
                 owner: str | None = None, on_scored: Callable[[], None] | None = None):
        self.sessions = sessions
        self.owner = owner or scorer_owner()
        self.lease = lease
        self.poll_seconds = poll_seconds
        self.sweep_seconds = sweep_seconds
        self.scoring = scoring or Scoring(settings, runner=default_runner(settings))
        self.wake = threading.Event()  # set by a completion: no wait for the next poll
        # told after each job scored: its end may have queued more (a smoke job's: the main
        # ones), which a claim waiting in this process takes at once
        self.on_scored = on_scored
        self._swept_at: float | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def score_next(self) -> int | None:
        """Take one stored outcome and score it; its job id, or None when none waits."""
        with self.sessions() as session:
            job = queue.lease_scoring(session, self.owner, self.lease)
            job_id = None if job is None else job.id
            session.commit()
        if job_id is None:
            return None
        with self._renewing(job_id):
            try:
                state = score_job(self.sessions, job_id, self.owner, self.scoring)
                log.info("job %s scored: %s", job_id, state)
            except LeaseLost as exc:
                log.warning("job %s: the scoring lease was lost, nothing written: %s",
                            job_id, exc)
        if self.on_scored is not None:
            self.on_scored()
        return job_id

    def run(self, stop: threading.Event, *, until_idle: bool = False) -> int:
        scored = 0
        while not stop.is_set():
            self._sweep_when_due()
            try:
                done = self.score_next()
            except Exception:  # the database restarts: its lease expires, scored again
                log.exception("scoring failed; the job's lease will expire")
                done = None
            if done is not None:
                scored += 1
                continue
            if until_idle:
                break
            self.wake.wait(self.poll_seconds)
            self.wake.clear()
        return scored

    def _sweep_when_due(self) -> None:
        if self.sweep_seconds is None:
            return
        clock = time.monotonic()
        if self._swept_at is not None and clock - self._swept_at < self.sweep_seconds:
            return
        self._swept_at = clock
        try:
            sweep(self.sessions, self.owner)
        except Exception:
            log.exception("the scorer's sweep failed")

    @contextlib.contextmanager
    def _renewing(self, job_id: int):
        """Renew the scoring lease while the body runs (a slow evaluation image)."""
        done = threading.Event()

        def renew() -> None:
            while not done.wait(self.lease.total_seconds() / 3):
                try:
                    with self.sessions() as session:
                        if not queue.heartbeat(session, job_id, self.owner, self.lease):
                            return  # lost: the write will be refused
                        session.commit()
                except Exception:
                    log.exception("renewing the scoring lease of job %s failed", job_id)

        beat = threading.Thread(target=renew, daemon=True, name="epreuve-scoring-lease")
        beat.start()
        try:
            yield
        finally:
            done.set()
            beat.join()

    # -- as a thread of the server ---------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, args=(self._stop,), daemon=True,
                                        name="epreuve-scorer")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()
