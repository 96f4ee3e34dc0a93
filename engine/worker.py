"""The node agent: lease a job, run it, score it, report it.

    lease -> verify the dataset seal -> stage the shard's inputs -> allocate GPUs
    -> run the container (heartbeats renew the lease meanwhile) -> validate outputs
    -> score against ground truth here, in the trusted process -> write every case
    result and the job's end in one transaction -> release

Killing the worker at any moment loses nothing: a container it left is removed
by the next runner to start on the node (its owner process is dead), its lease
is swept back to the queue (at once when the owner is known dead, otherwise
when the lease expires), its work directory is removed by the next worker to
start, and since results are written in the same transaction that ends the
job, no case is ever written twice.

A worker survives anything one job does: any exception while staging, running,
collecting, validating or scoring ends THAT job, as the participant's typed
reason when their outputs caused it, otherwise as INFRASTRUCTURE (retried, never
counted against the team) with the traceback kept where only organisers look
(the job's run_result), and the worker goes on to the next job.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from engine import queue
from engine.challenges import Challenge, Phase
from engine.config import Settings
from engine.dataset_versions import require_version
from engine.datasets import DatasetError, SealedDataset, VerificationCache, stage, unstage
from engine.db.models import CaseResultRow, ImageRow, JobRow, utcnow
from engine.image_presence import ImageUnavailable, ensure_image
from engine.medio import read_header
from engine.outputs import (
    ProbabilityOutput,
    SegmentationOutput,
    untrusted_case,
    untrusted_table,
    validate_probabilities,
    validate_segmentation,
)
from engine.results import flatten, worst_metrics
from engine.scoring.cases import CasePair, LesionSettings, score_cases
from engine.scoring.evaluation_image import (
    EvaluationImageUnusable,
    pinned_evaluation_image,
    run_evaluation_image,
)
from engine.scoring.segmentation import SegmentationSettings
from engine.statuses import JobKind, JobStatus
from engine.store import BlobStore, open_store
from engine.submissions import after_job, challenge_definition, find_phase, verified_dataset
from gpu.allocator import GPUAllocator, NotEnoughGPUs
from gpu.inventory import list_gpus
from gpu.telemetry import TelemetrySampler
from runners.base import FailureReason, Runner, RunResult, RunSpec
from runners.docker import DockerUnavailable, owner_alive, owner_token
from runners.image_user import numeric_pair

RUN_FAILURES = {FailureReason.TIMEOUT, FailureReason.OOM_KILLED, FailureReason.NONZERO_EXIT,
                FailureReason.OUTPUT_QUOTA, FailureReason.OUTPUT_INVALID,
                FailureReason.IMAGE_INVALID}
# A run that ended like this may still have written some cases whole: those are scored.
PARTIAL_RUN_FAILURES = {FailureReason.TIMEOUT, FailureReason.OOM_KILLED,
                        FailureReason.NONZERO_EXIT, FailureReason.OUTPUT_QUOTA}
OWNER_TAG = "owner"  # in each worker's work directory: whose it is, for the next one to judge
log = logging.getLogger(__name__)


class EvaluatorFailed(RuntimeError):
    """The organisers' evaluation image failed: not the participant's fault (retried)."""


class PlatformFailure(RuntimeError):
    """Something of ours failed while a job was handled: INFRASTRUCTURE for that job."""

    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"{stage}: {type(cause).__name__}")
        self.stage = stage
        self.detail = "".join(traceback.format_exception(cause))


@dataclass
class ScoredCase:
    case_id: str
    valid: bool
    reason: str | None
    message: str
    metrics: dict
    output_sha256: dict


def phase_run_spec(phase: Phase, image_id: str, input_dir: Path, output_dir: Path,
                   n_cases: int, gpu_uuids: tuple[str, ...] = (),
                   labels: dict[str, str] | None = None, user: str | None = None) -> RunSpec:
    """The one sandbox of a phase: the workers and a participant's `check` both use it."""
    limits = phase.limits
    return RunSpec(
        image=image_id, input_dir=input_dir, output_dir=output_dir,
        timeout_seconds=limits.time_per_case * n_cases,
        memory_bytes=limits.memory, cpus=limits.cpus, pids_limit=limits.pids,
        shm_size_bytes=limits.shm, tmp_size_bytes=limits.tmp,
        output_quota_bytes=limits.output_quota, gpu_uuids=gpu_uuids, labels=labels or {},
        user=user,  # the uid:gid resolved at intake: a name cannot resolve differently now
    )


class Worker:
    def __init__(self, sessions: sessionmaker[Session], settings: Settings, runner: Runner, *,
                 lease_duration: timedelta = queue.DEFAULT_LEASE,
                 heartbeat_seconds: float = 10.0, scoring_workers: int | None = None,
                 store: BlobStore | None = None):
        self.sessions = sessions
        self.settings = settings
        self.runner = runner
        self.store = store or open_store(settings.store_dir)  # images, loaded by digest
        self.actor = f"worker {owner_token()}"
        self.owner = owner_token()
        self.lease_duration = lease_duration
        self.heartbeat_seconds = heartbeat_seconds
        self.scoring_workers = scoring_workers
        self.verify_cache = VerificationCache(settings.state_dir / "verify")
        self.gpus = GPUAllocator([g.uuid for g in list_gpus()], settings.state_dir / "gpus")
        remove_dead_workers_dirs(settings.work_dir)
        self.work_dir = claim_work_dir(settings.work_dir, self.owner)

    # -- the loop ----------------------------------------------------------------------

    def run_once(self) -> bool:
        """Sweep, then lease and process one job. False when there was nothing to do."""
        with self.sessions() as session:
            self._sweep(session)
            job = queue.lease(session, self.owner, self.lease_duration,
                              gpus_available=self.gpus.free_count())
            if job is None:
                return False
            self.survive(session, job)
        return True

    def _sweep(self, session: Session) -> None:
        """Re-queue the jobs of vanished workers; a job out of attempts ends like any other:
        its submission moves on (and an INFRASTRUCTURE end never counts against the team)."""
        for job_id in queue.sweep(session, self.actor, owner_dead=dead_on_this_host):
            job = session.get(JobRow, job_id, populate_existing=True)
            if job is not None and job.status == JobStatus.FAILED:
                after_job(session, job, self.actor)
        session.commit()

    def survive(self, session: Session, job: JobRow) -> None:
        """Process one job; whatever it raises ends that job, never the worker."""
        try:
            self.process(session, job)
        except PlatformFailure as exc:
            self._end_as_infrastructure(session, job, exc.stage, exc.detail)
        except Exception as exc:
            detail = "".join(traceback.format_exception(exc))
            self._end_as_infrastructure(session, job, "handling the job", detail)

    def _end_as_infrastructure(self, session: Session, job: JobRow, stage: str,
                               detail: str) -> None:
        log.error("job %s failed on the platform's side while %s:\n%s", job.id, stage, detail)
        session.rollback()
        try:
            job = session.get(JobRow, job.id, populate_existing=True)
            if job is None or job.status not in queue.ACTIVE or job.lease_owner != self.owner:
                return  # swept or cancelled meanwhile: not ours to end
            self._infrastructure(session, job, messages_platform(stage),
                                 {"infrastructure_detail": detail[-20000:]})
        except Exception:  # the database itself: the lease expires and the sweeper retries
            session.rollback()
            log.exception("job %s could not be released; its lease will expire", job.id)

    def run(self, stop: threading.Event | None = None, *, until_idle: bool = False,
            idle_seconds: float = 2.0, max_jobs: int | None = None) -> int:
        done = 0
        stop = stop or threading.Event()
        while not stop.is_set() and (max_jobs is None or done < max_jobs):
            if self.run_once():
                done += 1
            elif until_idle:
                break
            else:
                stop.wait(idle_seconds)
        return done

    # -- one job ------------------------------------------------------------------------

    def process(self, session: Session, job: JobRow) -> None:
        submission = job.submission
        phase_row, phase = find_phase(session, submission.phase.challenge_id,
                                      submission.phase.slug)
        challenge = challenge_definition(phase_row.challenge)
        try:
            dataset = verified_dataset(phase_row, self.verify_cache)
            require_version(dataset, job.dataset_version, f"job {job.id}")  # never other inputs
        except DatasetError as exc:
            self._infrastructure(session, job, f"the test set failed verification: {exc}")
            return
        job_dir = self.work_dir / f"job-{job.id}-{job.attempts}"
        output_dir = self.settings.outputs_dir / f"submission-{submission.id}" / f"job-{job.id}"
        shutil.rmtree(output_dir, ignore_errors=True)
        try:
            with _stage("staging the inputs"):
                staged = stage(dataset, list(job.case_ids), job_dir / "input")
            try:
                allocation = self.gpus.allocate(phase.limits.gpus)
            except NotEnoughGPUs as exc:
                self._infrastructure(session, job, str(exc))
                return
            with allocation:
                queue.transition(session, job, JobStatus.RUNNING, self.owner, started_at=utcnow())
                session.commit()
                with _stage("running the container"):
                    result, gpu_usage = self._run(session, job, phase, submission.image,
                                                  staged, output_dir, allocation.uuids)
            self._finish(session, job, challenge, phase, dataset, result, gpu_usage,
                         output_dir)
        except queue.LeaseLost:
            session.rollback()  # swept or cancelled meanwhile: someone else owns it now
        finally:
            remove_tree(job_dir)

    def _run(self, session: Session, job: JobRow, phase: Phase, image: ImageRow, staged: Path,
             output_dir: Path, gpu_uuids: tuple[str, ...]) -> tuple[RunResult, dict]:
        spec = phase_run_spec(phase, image.image_id, staged, output_dir, len(job.case_ids),
                              gpu_uuids, labels={"org.epreuve.job": str(job.id),
                                                 "org.epreuve.submission": str(job.submission_id)},
                              user=image.user if numeric_pair(image.user or "") else None)
        lost = threading.Event()
        beating = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job.id, lost, beating),
                                daemon=True, name="epreuve-heartbeat")
        beat.start()
        sampler = TelemetrySampler(gpu_uuids).start()
        try:
            self._ensure_image(image)  # under the heartbeat: a large load takes minutes
            result = self.runner.run(spec, cancel=lost)
        finally:
            beating.set()
            beat.join()
            usage = sampler.stop()
        if lost.is_set():
            raise queue.LeaseLost(f"job {job.id} was taken back while it ran")
        return result, {uuid: vars(u) for uuid, u in usage.items()}

    def _ensure_image(self, image: ImageRow) -> None:
        """The pinned image on this node, loaded from the store by digest if it vanished:
        a failure is the platform's (INFRASTRUCTURE), never the team's IMAGE_INVALID."""
        try:
            ensure_image(self.runner, self.store, image.image_id, image.archive_sha256)
        except DockerUnavailable:
            pass  # no daemon to ask: the run reports it, as for any run (INFRASTRUCTURE)
        except ImageUnavailable as exc:  # missing or corrupt in the store: organisers act
            raise PlatformFailure("loading the image", exc) from exc

    def _heartbeat(self, job_id: int, lost: threading.Event, done: threading.Event) -> None:
        while not done.wait(self.heartbeat_seconds):
            with self.sessions() as session:
                if not queue.heartbeat(session, job_id, self.owner, self.lease_duration):
                    lost.set()  # swept or cancelled: stop the container
                    return

    def _infrastructure(self, session: Session, job: JobRow, message: str,
                        run_record: dict | None = None) -> None:
        queue.release_for_retry(session, job, self.owner, FailureReason.INFRASTRUCTURE.value,
                                message, run_result=run_record)
        session.refresh(job)
        if job.status == JobStatus.FAILED:
            after_job(session, job, self.actor)
        session.commit()

    def _finish(self, session: Session, job: JobRow, challenge: Challenge, phase: Phase,
                dataset: SealedDataset, result: RunResult, gpu_usage: dict,
                output_dir: Path) -> None:
        if result.reason is FailureReason.INFRASTRUCTURE:
            self._infrastructure(session, job, result.message,
                                 {**result.to_dict(), "gpus": gpu_usage,
                                  "infrastructure_detail": result.detail})
            return
        queue.transition(session, job, JobStatus.SCORING, self.owner)
        session.commit()
        run_failed = result.reason in RUN_FAILURES or result.reason is FailureReason.CANCELLED
        try:
            with _stage("validating and scoring the outputs"):
                cases = self._score(job, challenge, dataset, result, output_dir, run_failed)
        except EvaluatorFailed as exc:
            self._infrastructure(session, job, str(exc))
            return
        shared = None if result.wall_seconds is None else result.wall_seconds / len(cases)
        for case in cases:
            session.add(CaseResultRow(
                submission_id=job.submission_id, job_id=job.id, case_id=case.case_id,
                valid=case.valid, reason=case.reason, message=case.message,
                metrics=case.metrics, runtime_seconds=shared,
                runtime_exact=len(cases) == 1, output_sha256=case.output_sha256))
        run_record = {**result.to_dict(), "gpus": gpu_usage}
        first_invalid = next((c for c in cases if not c.valid), None)
        if job.kind == JobKind.SMOKE and not run_failed and first_invalid is not None:
            # the smoke case must be valid too: a wrong file name fails fast, not per shard
            queue.transition(session, job, JobStatus.FAILED, self.owner, first_invalid.message,
                             reason=first_invalid.reason, message=first_invalid.message,
                             run_result=run_record, finished_at=utcnow(), lease_owner=None)
        elif run_failed:
            queue.transition(session, job, JobStatus.FAILED, self.owner, result.message,
                             reason=result.reason.value, message=result.message,
                             run_result=run_record, finished_at=utcnow(), lease_owner=None)
        else:
            invalid = sum(not c.valid for c in cases)
            queue.transition(session, job, JobStatus.SUCCEEDED, self.owner,
                             f"{len(cases) - invalid} valid, {invalid} invalid case(s)",
                             run_result=run_record, finished_at=utcnow(), lease_owner=None)
        after_job(session, job, self.actor)
        session.commit()  # results and the job's end together: all or nothing

    # -- scoring (trusted: the only reader of ground truth) ------------------------------

    def _score(self, job: JobRow, challenge: Challenge, dataset: SealedDataset,
               result: RunResult, output_dir: Path, run_failed: bool) -> list[ScoredCase]:
        case_ids = list(job.case_ids)
        if run_failed and result.reason not in PARTIAL_RUN_FAILURES:
            return [ScoredCase(c, False, result.reason.value, result.message,
                               self._worst(challenge, dataset, c), {}) for c in case_ids]
        # a failed run's cases that were written whole are scored; the others get its reason
        fallback = (result.reason.value, result.message) if run_failed else None
        if isinstance(challenge.output, ProbabilityOutput):
            cases = self._score_probabilities(challenge.output, case_ids, output_dir)
            return [c if c.valid or fallback is None else
                    ScoredCase(c.case_id, False, *fallback, c.metrics, c.output_sha256)
                    for c in cases]
        return self._score_segmentation(job, challenge, dataset, result, output_dir, case_ids,
                                        fallback)

    def _worst(self, challenge: Challenge, dataset: SealedDataset, case_id: str) -> dict:
        if challenge.task == "classification":
            return {}
        return worst_metrics(challenge, dataset, case_id)

    def _score_segmentation(self, job, challenge, dataset, result, output_dir,
                            case_ids, fallback: tuple[str, str] | None = None
                            ) -> list[ScoredCase]:
        spec: SegmentationOutput = challenge.output
        skipped = frozenset(result.skipped_outputs)
        scored, pairs = {}, []
        for case_id in case_ids:
            reference = dataset.ground_truth_path(case_id)
            geometry = read_header(reference).geometry  # ground truth: ours, errors are ours
            outcome = untrusted_case(case_id, validate_segmentation, output_dir, case_id,
                                     spec, geometry, skipped=skipped)
            if not outcome.valid:
                reason, message = fallback or (outcome.reason.value, outcome.message)
                scored[case_id] = ScoredCase(case_id, False, reason, message,
                                             self._worst(challenge, dataset, case_id), {})
                continue
            prediction = output_dir / case_id / spec.filename
            pairs.append(CasePair(case_id, prediction, reference))
            scored[case_id] = ScoredCase(case_id, True, None, "valid", {},
                                         {spec.filename: _sha256(prediction)})
        if pairs and challenge.metrics.evaluation_image:
            self._score_with_evaluator(challenge, dataset, output_dir, scored,
                                       [p.case_id for p in pairs])
        elif pairs:
            settings = SegmentationSettings(
                labels=tuple(challenge.metrics.labels),
                nsd_tolerance_mm=challenge.metrics.nsd_tolerance_mm,
                surface=challenge.metrics.surface, empty=challenge.metrics.empty_policy())
            lesions = LesionSettings(enabled=challenge.metrics.lesion_wise)
            for case_id, scores in score_cases(pairs, settings, lesions,
                                               workers=self.scoring_workers).items():
                scored[case_id].metrics = flatten(scores)
        return [scored[c] for c in case_ids]

    def _score_with_evaluator(self, challenge: Challenge, dataset: SealedDataset,
                              output_dir: Path, scored: dict[str, ScoredCase],
                              case_ids: list[str]) -> None:
        """The organiser's image scores the valid outputs; its failures are the platform's."""
        try:
            image_id = pinned_evaluation_image(challenge.metrics.evaluation_image_id,
                                               challenge.metrics.evaluation_image)
        except EvaluationImageUnusable as exc:
            raise EvaluatorFailed(str(exc)) from None
        outcome = run_evaluation_image(self.runner, image_id, output_dir, dataset, case_ids,
                                       work_dir=self.work_dir)
        if not outcome.succeeded:
            raise EvaluatorFailed(f"the organisers' evaluation image failed: {outcome.message}")
        wanted = [m.name for m in challenge.metrics.evaluator_metrics]
        for case_id in case_ids:
            metrics = outcome.metrics.cases.get(case_id, {})
            missing = [name for name in wanted if name not in metrics]
            if missing:
                scored[case_id] = ScoredCase(
                    case_id, False, FailureReason.OUTPUT_INVALID.value,
                    f"case {case_id}: the evaluation image reported no {', '.join(missing)}",
                    self._worst(challenge, dataset, case_id), scored[case_id].output_sha256)
            else:
                scored[case_id].metrics = {name: metrics[name] for name in wanted}

    def _score_probabilities(self, spec: ProbabilityOutput, case_ids: list[str],
                             output_dir: Path) -> list[ScoredCase]:
        outcomes = untrusted_table(case_ids, validate_probabilities, output_dir, case_ids, spec)
        table = output_dir / spec.filename
        digest = {spec.filename: _sha256(table)} if table.is_file() else {}
        return [ScoredCase(c, o.valid, None if o.valid else o.reason.value, o.message,
                           {"probabilities": o.probabilities} if o.valid else {}, digest)
                for c, o in outcomes.items()]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()



# -- helpers ------------------------------------------------------------------------------


@contextlib.contextmanager
def _stage(name: str):
    """Label an unexpected failure with the step it happened in (the organisers' view)."""
    try:
        yield
    except (queue.LeaseLost, PlatformFailure, EvaluatorFailed):
        raise
    except Exception as exc:
        raise PlatformFailure(name, exc) from exc


def dead_on_this_host(owner: str) -> bool:
    """A lease owner this node can see is gone (a process of this host that died)."""
    return not owner_alive(owner)


def messages_platform(stage: str) -> str:
    """What a team reads when the platform failed them: no traceback, no host detail."""
    return (f"The platform failed while {stage} (an internal error, not caused by your "
            "submission). The job is retried automatically and never counts against your "
            "quota.")


def claim_work_dir(root: Path, owner: str) -> Path:
    """This worker's own work directory, tagged with its owner before it is visible, so that
    a worker starting later can tell whether it is still in use."""
    root.mkdir(parents=True, exist_ok=True)
    pending = Path(tempfile.mkdtemp(prefix=".claim-", dir=root))
    (pending / OWNER_TAG).write_text(owner)
    mine = root / f"worker-{owner.replace(':', '-').replace('/', '-')}"
    remove_tree(mine)  # the same process token cannot be another live worker
    os.replace(pending, mine)
    return mine


def remove_dead_workers_dirs(root: Path) -> list[Path]:
    """Remove the work directories (staged inputs, scratch) of workers that died."""
    removed = []
    if not root.is_dir():
        return removed
    for entry in root.iterdir():
        if entry.is_symlink() or not entry.is_dir():
            continue
        owner = _owner_of(entry)
        if entry.name.startswith("worker-"):
            dead = owner is None or not owner_alive(owner)  # tagged before it was renamed
        elif entry.name.startswith(".claim-"):
            dead = owner is not None and not owner_alive(owner)  # untagged: being claimed
        else:
            continue
        if dead:
            remove_tree(entry)
            removed.append(entry)
    return removed


def _owner_of(directory: Path) -> str | None:
    try:
        return (directory / OWNER_TAG).read_text().strip() or None
    except OSError:
        return None


def remove_tree(path: Path) -> None:
    """Remove a work directory whatever it holds (staged inputs are read-only)."""
    with contextlib.suppress(OSError):
        unstage(path)
    shutil.rmtree(path, ignore_errors=True)
