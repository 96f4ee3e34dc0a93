"""The node agent: lease a job, run it, score it, report it.

    lease -> verify the dataset seal -> stage the shard's inputs -> allocate GPUs
    -> run the container (heartbeats renew the lease meanwhile) -> validate outputs
    -> score against ground truth here, in the trusted process -> write every case
    result and the job's end in one transaction -> release

Killing the worker at any moment loses nothing: a container it left is removed
by the next runner to start on the node (its owner process is dead), its lease
is swept back to the queue (at once when the owner is known dead, otherwise
when the lease expires), and since results are written in the same
transaction that ends the job, no case is ever written twice.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from engine import queue
from engine.challenges import Challenge, Phase
from engine.config import Settings
from engine.datasets import DatasetError, SealedDataset, VerificationCache, stage, unstage
from engine.db.models import CaseResultRow, ImageRow, JobRow, utcnow
from engine.medio import read_header
from engine.outputs import (
    ProbabilityOutput,
    SegmentationOutput,
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
from engine.submissions import after_job, challenge_definition, find_phase, verified_dataset
from gpu.allocator import GPUAllocator, NotEnoughGPUs
from gpu.inventory import list_gpus
from gpu.telemetry import TelemetrySampler
from runners.base import FailureReason, Runner, RunResult, RunSpec
from runners.docker import owner_token
from runners.image_user import numeric_pair

RUN_FAILURES = {FailureReason.TIMEOUT, FailureReason.OOM_KILLED, FailureReason.NONZERO_EXIT,
                FailureReason.OUTPUT_QUOTA, FailureReason.OUTPUT_INVALID,
                FailureReason.IMAGE_INVALID}


class EvaluatorFailed(RuntimeError):
    """The organisers' evaluation image failed: not the participant's fault (retried)."""


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
                 heartbeat_seconds: float = 10.0, scoring_workers: int | None = None):
        self.sessions = sessions
        self.settings = settings
        self.runner = runner
        self.actor = f"worker {owner_token()}"
        self.owner = owner_token()
        self.lease_duration = lease_duration
        self.heartbeat_seconds = heartbeat_seconds
        self.scoring_workers = scoring_workers
        self.verify_cache = VerificationCache(settings.state_dir / "verify")
        self.gpus = GPUAllocator([g.uuid for g in list_gpus()], settings.state_dir / "gpus")

    # -- the loop ----------------------------------------------------------------------

    def run_once(self) -> bool:
        """Sweep, then lease and process one job. False when there was nothing to do."""
        with self.sessions() as session:
            queue.sweep(session, self.actor)
            job = queue.lease(session, self.owner, self.lease_duration,
                              gpus_available=self.gpus.free_count())
            if job is None:
                return False
            self.process(session, job)
        return True

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
        except DatasetError as exc:
            self._infrastructure(session, job, f"the test set failed verification: {exc}")
            return
        job_dir = self.settings.work_dir / f"job-{job.id}-{job.attempts}"
        output_dir = self.settings.outputs_dir / f"submission-{submission.id}" / f"job-{job.id}"
        shutil.rmtree(output_dir, ignore_errors=True)
        staged = None
        try:
            staged = stage(dataset, list(job.case_ids), job_dir / "input")
            try:
                allocation = self.gpus.allocate(phase.limits.gpus)
            except NotEnoughGPUs as exc:
                self._infrastructure(session, job, str(exc))
                return
            with allocation:
                queue.transition(session, job, "running", self.owner, started_at=utcnow())
                session.commit()
                result, gpu_usage = self._run(session, job, phase, submission.image,
                                              staged, output_dir, allocation.uuids)
            self._finish(session, job, challenge, phase, dataset, result, gpu_usage,
                         output_dir)
        except queue.LeaseLost:
            session.rollback()  # swept or cancelled meanwhile: someone else owns it now
        finally:
            if staged is not None:
                unstage(staged)
            shutil.rmtree(job_dir, ignore_errors=True)

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
            result = self.runner.run(spec, cancel=lost)
        finally:
            beating.set()
            beat.join()
            usage = sampler.stop()
        if lost.is_set():
            raise queue.LeaseLost(f"job {job.id} was taken back while it ran")
        return result, {uuid: vars(u) for uuid, u in usage.items()}

    def _heartbeat(self, job_id: int, lost: threading.Event, done: threading.Event) -> None:
        while not done.wait(self.heartbeat_seconds):
            with self.sessions() as session:
                if not queue.heartbeat(session, job_id, self.owner, self.lease_duration):
                    lost.set()  # swept or cancelled: stop the container
                    return

    def _infrastructure(self, session: Session, job: JobRow, message: str) -> None:
        queue.release_for_retry(session, job, self.owner, FailureReason.INFRASTRUCTURE.value,
                                message)
        session.refresh(job)
        if job.status == "failed":
            after_job(session, job, self.actor)
        session.commit()

    def _finish(self, session: Session, job: JobRow, challenge: Challenge, phase: Phase,
                dataset: SealedDataset, result: RunResult, gpu_usage: dict,
                output_dir: Path) -> None:
        if result.reason is FailureReason.INFRASTRUCTURE:
            self._infrastructure(session, job, result.message)
            return
        queue.transition(session, job, "scoring", self.owner)
        session.commit()
        run_failed = result.reason in RUN_FAILURES or result.reason is FailureReason.CANCELLED
        try:
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
        if job.kind == "smoke" and not run_failed and first_invalid is not None:
            # the smoke case must be valid too: a wrong file name fails fast, not per shard
            queue.transition(session, job, "failed", self.owner, first_invalid.message,
                             reason=first_invalid.reason, message=first_invalid.message,
                             run_result=run_record, finished_at=utcnow(), lease_owner=None)
        elif run_failed:
            queue.transition(session, job, "failed", self.owner, result.message,
                             reason=result.reason.value, message=result.message,
                             run_result=run_record, finished_at=utcnow(), lease_owner=None)
        else:
            invalid = sum(not c.valid for c in cases)
            queue.transition(session, job, "succeeded", self.owner,
                             f"{len(cases) - invalid} valid, {invalid} invalid case(s)",
                             run_result=run_record, finished_at=utcnow(), lease_owner=None)
        after_job(session, job, self.actor)
        session.commit()  # results and the job's end together: all or nothing

    # -- scoring (trusted: the only reader of ground truth) ------------------------------

    def _score(self, job: JobRow, challenge: Challenge, dataset: SealedDataset,
               result: RunResult, output_dir: Path, run_failed: bool) -> list[ScoredCase]:
        case_ids = list(job.case_ids)
        if run_failed:
            return [ScoredCase(c, False, result.reason.value, result.message,
                               self._worst(challenge, dataset, c), {}) for c in case_ids]
        if isinstance(challenge.output, ProbabilityOutput):
            return self._score_probabilities(challenge.output, case_ids, output_dir)
        return self._score_segmentation(job, challenge, dataset, result, output_dir, case_ids)

    def _worst(self, challenge: Challenge, dataset: SealedDataset, case_id: str) -> dict:
        if challenge.task == "classification":
            return {}
        return worst_metrics(challenge, dataset, case_id)

    def _score_segmentation(self, job, challenge, dataset, result, output_dir,
                            case_ids) -> list[ScoredCase]:
        spec: SegmentationOutput = challenge.output
        skipped = frozenset(result.skipped_outputs)
        scored, pairs = {}, []
        for case_id in case_ids:
            reference = dataset.ground_truth_path(case_id)
            outcome = validate_segmentation(output_dir, case_id, spec,
                                            read_header(reference).geometry, skipped=skipped)
            if not outcome.valid:
                scored[case_id] = ScoredCase(case_id, False, outcome.reason.value,
                                             outcome.message,
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
                                       work_dir=self.settings.work_dir)
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
        outcomes = validate_probabilities(output_dir, case_ids, spec)
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

