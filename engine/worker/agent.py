"""The node agent: lease a job, run it, report it. No database here.

    lease a ticket (with the GPUs free) -> verify the dataset seal -> stage the shard's
    inputs (never ground truth) -> allocate GPUs -> started -> prepare the image
    -> run the container (heartbeats renew the lease meanwhile) -> complete (the
    coordinator validates, scores and writes, all or nothing) -> release

Killing the worker at any moment loses nothing: a container it left is removed by the
next runner to start on the node (its owner process is dead), its lease is swept back to
the queue (at once when the owner is known dead, otherwise when the lease expires), its
work directory is removed by the next worker to start, and since the coordinator writes
the results in the same transaction that ends the job, no case is ever written twice.

A worker survives anything one job does: any exception while staging, running or
completing ends THAT job as INFRASTRUCTURE (retried, never counted against the team),
with the traceback kept where only organisers look, and the worker goes on to the next.

`run` keeps the node's slots full (slots.py: one job per GPU, CPU slots for CPU jobs, each
job with its own heartbeat, telemetry, work dir and cancel) and reports ended runs apart
from the slots (reporter.py): a GPU never waits for scoring. `run_once` is one job, start
to report, in the caller's thread.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import socket
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from engine.config import Settings
from engine.datasets import DatasetError, SealedDataset, VerificationCache, stage
from engine.errors import LeaseLost
from engine.evaluation import run_spec, verified_dataset
from engine.gpu_metrics import gpu_sample_recorder
from engine.image_presence import ImageUnavailable, ensure_image
from engine.node_description import NodeDescription, describe
from engine.provenance import node_facts, run_spec_data
from engine.store import BlobStore, open_store
from engine.worker.heartbeat import Heartbeat
from engine.worker.protocol import (
    Coordinator,
    JobOutcome,
    JobTicket,
    PlatformFailure,
    messages_platform,
    platform_step,
)
from engine.worker.reporter import Report
from engine.worker.slots import DEFAULT_CPU_SLOTS, SlotLoop, Slots, Taken
from engine.worker.workdirs import claim_work_dir, remove_dead_workers_dirs, remove_tree
from gpu.allocator import Allocation, GPUAllocator, NotEnoughGPUs
from gpu.inventory import GPU, list_gpus
from gpu.telemetry import TelemetrySampler
from runners.base import FailureReason, MiB, Runner, RunResult, RunSpec
from runners.docker import DockerUnavailable, owner_token

log = logging.getLogger(__name__)
MAX_PLATFORM_PAUSE_SECONDS = 300.0
T = TypeVar("T")


class Agent:
    """One worker process on a node: runs a job per free slot, reports to a Coordinator."""

    def __init__(self, coordinator: Coordinator, runner: Runner, settings: Settings, *,
                 owner: str | None = None,
                 gpus: GPUAllocator | Sequence[str] | None = None,
                 heartbeat_seconds: float = 10.0, maintenance_seconds: float = 5.0,
                 platform_pause_seconds: float | None = None,
                 store: BlobStore | None = None, node_name: str | None = None,
                 cpu_slots: int = DEFAULT_CPU_SLOTS, reports_backlog: int | None = None):
        self.coordinator = coordinator
        self.store = store or open_store(settings.store_dir)  # images, loaded by digest
        self.runner = runner
        self.settings = settings
        self.owner = owner or owner_token()
        self.actor = f"worker {self.owner}"
        self.heartbeat_seconds = heartbeat_seconds
        self.maintenance_seconds = maintenance_seconds
        self._maintained_at: float | None = None
        self._runtime_answered: bool | None = None
        self.platform_pause_seconds = platform_pause_seconds
        self._platform_pause = 0.0
        self._claims_resume_at = 0.0
        self._pause_lock = threading.Lock()  # slots fail and succeed on their own threads
        self.verify_cache = VerificationCache(settings.state_dir / "verify")
        self.gpus = gpus if isinstance(gpus, GPUAllocator) else GPUAllocator(
            [g.uuid for g in list_gpus()] if gpus is None else list(gpus),
            settings.state_dir / "gpus")
        self.slots = Slots(self.gpus, cpu_slots)
        self.reports_backlog = reports_backlog  # None: as many as the node has slots
        remove_dead_workers_dirs(settings.work_dir)
        self.work_dir = claim_work_dir(settings.work_dir, self.owner)
        self._node: dict | None = None
        self.node_name = node_name or socket.gethostname()
        self.gpu_samples = gpu_sample_recorder(self.node_name)  # the DCGM-named gauges
        self.gpu_latest: dict[str, dict] = {}  # each GPU's latest reading, for heartbeats

    def describe(self) -> NodeDescription:
        """This node for the registry (engine/nodes.py): built once, sent on registering."""
        try:
            known = {g.uuid: g for g in list_gpus()}
        except Exception as exc:  # a broken NVML: the GPUs are described by uuid only
            log.warning("the node's GPUs could not be listed: %s", exc)
            known = {}
        gpus = [known.get(uuid) or GPU(uuid=uuid, index=index, name="unknown", memory_bytes=0,
                                       driver_version="unknown")
                for index, uuid in enumerate(self.gpus.uuids)]
        return describe(self.node_name, gpu_slots=len(self.gpus.uuids),
                        cpu_slots=self.slots.cpu_slots,
                        gpus=gpus, facts=self.node)

    def _gpu_sample(self, reading) -> None:
        self.gpu_samples(reading)
        self.gpu_latest[reading.uuid] = {
            "index": reading.index, "utilisation_percent": reading.utilisation_percent,
            "memory_used_mib": reading.memory_used_bytes / MiB,
            "power_watts": reading.power_watts, "energy_millijoules": reading.energy_millijoules}

    @property
    def node(self) -> dict:
        """This node's facts for provenance, asked once per agent (Docker, git, NVML); an
        unreachable daemon leaves them empty rather than failing a job's report."""
        if self._node is None:
            try:
                self._node = node_facts(self.runner)
            except Exception as exc:  # no daemon, no runner api: the facts are unknown
                log.warning("the node's facts could not be collected: %s", exc)
                return {}
        return self._node

    # -- the loop ----------------------------------------------------------------------

    def run_once(self) -> bool:
        """Lease and process one job (sweeping first when it is due). False when there
        was nothing to do."""
        self.maintain()
        ticket = self.coordinator.lease(self.gpus.free_count())
        if ticket is None:
            return False
        self.survive(ticket)
        return True

    def maintain(self, *, now: bool = False) -> None:
        """The coordinator's sweep, at most every `maintenance_seconds` (not on every poll)."""
        clock = time.monotonic()
        if (not now and self._maintained_at is not None
                and clock - self._maintained_at < self.maintenance_seconds):
            return
        self._maintained_at = clock
        self.coordinator.maintenance()

    def run(self, stop: threading.Event | None = None, *, until_idle: bool = False,
            idle_seconds: float = 2.0, max_jobs: int | None = None) -> int:
        """Keep the slots full until `stop` is set (or the queue is idle, or `max_jobs` were
        leased); running jobs finish and are reported before it returns. The jobs leased."""
        loop = SlotLoop(self, self.slots, reports_backlog=self.reports_backlog)
        return loop.run(stop or threading.Event(), until_idle=until_idle,
                        idle_seconds=idle_seconds, max_jobs=max_jobs)

    def ready_to_claim(self) -> bool:
        """Not while the runtime rests after failing a run (a daemon restarting answers
        for a while as it stops its containers), nor while it does not answer. Only for a
        long-lived node (`platform_pause_seconds` set: the CLI's workers); an agent run
        in-process claims regardless, and its runs say what failed."""
        if self.platform_pause_seconds is None:
            return True
        return time.monotonic() >= self._claims_resume_at and self.runtime_answers()

    def _after_run(self, result: RunResult) -> None:
        """A run the runtime failed pauses claims, longer each time in a row: a restart
        of the daemon costs one attempt of one job, not all of a job's attempts."""
        if result.reason is FailureReason.INFRASTRUCTURE:
            self._pause_claims("the runtime failed a run")
        else:
            with self._pause_lock:
                self._platform_pause = 0.0

    def _pause_claims(self, why: str) -> None:
        """The node failed a job on its own side (its runtime, its disk): claiming the next
        one at once would fail it too."""
        if self.platform_pause_seconds is None:
            return
        with self._pause_lock:
            now = time.monotonic()
            if now < self._claims_resume_at:
                return  # the same outage failing several slots at once: one pause, not N
            self._platform_pause = min(max(self._platform_pause * 2,
                                           self.platform_pause_seconds),
                                       MAX_PLATFORM_PAUSE_SECONDS)
            self._claims_resume_at = now + self._platform_pause
        log.warning("%s; no job is claimed for %.0f s", why, self._platform_pause)

    def runtime_answers(self) -> bool:
        """The node's container runtime answers; while it does not (a daemon restarting),
        the node claims nothing, so that no job spends its attempts on a node that cannot
        run it."""
        answers = self.runner.answers()
        if answers != self._runtime_answered:
            if not answers:
                log.warning("the container runtime does not answer: no job is claimed "
                            "until it does")
            elif self._runtime_answered is False:
                log.warning("the container runtime answers again")
            self._runtime_answered = answers
        return answers

    def survive(self, ticket: JobTicket) -> None:
        """Process one job, start to report; whatever it raises ends that job, never the
        worker."""
        self._guarded(ticket, lambda: self.process(ticket))

    def survive_run(self, ticket: JobTicket, taken: Taken) -> Report | None:
        """Run one job in its slots up to its container's end; its report still to make
        (its heartbeat going on), or None when the job already ended here."""
        def run() -> Report | None:
            heartbeat = Heartbeat(self.coordinator, ticket, self.heartbeat_seconds)
            outcome = self.execute(ticket, taken.allocation, taken=taken)
            return Report(ticket, outcome, heartbeat.start()) if outcome else None
        return self._guarded(ticket, run)

    def deliver(self, report: Report) -> None:
        """Report one ended run (the reporter's thread): as survive, a failure ends only
        that job, as the platform's."""
        self._guarded(report.ticket,
                      lambda: self.coordinator.complete(report.ticket, report.outcome))

    def give_back_unfit(self, ticket: JobTicket, exc: NotEnoughGPUs) -> None:
        """GPUs taken by another process between the lease and the allocation."""
        self._guarded(ticket, lambda: self.coordinator.retry(ticket, str(exc), node=self.node))

    def _guarded(self, ticket: JobTicket, work: Callable[[], T]) -> T | None:
        try:
            return work()
        except LeaseLost as exc:
            log.info("job %s was taken back: %s", ticket.job_id, exc)
        except PlatformFailure as exc:
            self._give_back(ticket, exc.stage, exc.detail)
        except Exception as exc:
            self._give_back(ticket, "handling the job", "".join(traceback.format_exception(exc)))
        return None

    def _give_back(self, ticket: JobTicket, stage: str, detail: str) -> None:
        log.error("job %s failed on the platform's side while %s:\n%s", ticket.job_id, stage,
                  detail)
        self._pause_claims(f"job {ticket.job_id} failed on this node's side")
        try:
            self.coordinator.retry(ticket, messages_platform(stage), detail, node=self.node)
        except LeaseLost:
            pass  # swept or cancelled meanwhile: not ours to end
        except Exception:  # the coordinator itself: the lease expires and the sweep retries
            log.exception("job %s could not be released; its lease will expire", ticket.job_id)

    # -- one job ------------------------------------------------------------------------

    def prepare_image(self, ticket: JobTicket) -> None:
        """The pinned image on this node, loaded from the store by digest if it vanished
        (run under the heartbeat: a large load takes minutes). A failure is the platform's
        (INFRASTRUCTURE), never the team's IMAGE_INVALID."""
        try:
            ensure_image(self.runner, self.store, ticket.image_id, ticket.image_archive_sha256)
        except DockerUnavailable:
            pass  # no daemon to ask: the run reports it, as for any run (INFRASTRUCTURE)
        except ImageUnavailable as exc:  # missing or corrupt in the store: organisers act
            raise PlatformFailure("loading the image", exc) from exc

    def process(self, ticket: JobTicket) -> None:
        """One job in this thread: run it, then report it."""
        outcome = self.execute(ticket)
        if outcome is not None:
            self.coordinator.complete(ticket, outcome)

    def execute(self, ticket: JobTicket, allocation: Allocation | None = None, *,
                taken: Taken | None = None) -> JobOutcome | None:
        """Stage, start, run: the outcome to report, or None when the job was given back
        already. `allocation`: the GPUs its slot holds (else allocated here, after staging,
        and released when the container ends)."""
        try:
            dataset = self._dataset(ticket)
        except DatasetError as exc:
            self.coordinator.retry(ticket, f"the test set failed verification: {exc}",
                                   node=self.node)
            return None
        job_dir = self.work_dir / f"job-{ticket.job_id}-{ticket.attempt}"
        output_dir = (self.settings.outputs_dir / f"submission-{ticket.submission_id}"
                      / f"job-{ticket.job_id}")
        shutil.rmtree(output_dir, ignore_errors=True)
        try:
            with platform_step("staging the inputs"):
                staged = stage(dataset, list(ticket.case_ids), job_dir / "input")
            if allocation is None:
                try:
                    allocation = self.gpus.allocate(ticket.gpus)
                except NotEnoughGPUs as exc:
                    self.coordinator.retry(ticket, str(exc), node=self.node)
                    return None
                held: contextlib.AbstractContextManager = allocation
            else:
                held = contextlib.nullcontext()  # the slot's: released by the slot
            with held:
                self.coordinator.started(ticket)
                spec = self._spec(ticket, staged, output_dir, allocation.uuids)
                result, gpu_usage = self._run(ticket, spec, taken)
            return JobOutcome(result, gpu_usage, str(output_dir), node=self.node,
                              run_spec=run_spec_data(spec))
        finally:
            remove_tree(job_dir)

    def _dataset(self, ticket: JobTicket) -> SealedDataset:
        return verified_dataset(ticket.dataset_path, ticket.dataset_version, self.verify_cache,
                                what=f"job {ticket.job_id}")

    def _spec(self, ticket: JobTicket, staged: Path, output_dir: Path,
              gpu_uuids: tuple[str, ...]) -> RunSpec:
        return run_spec(ticket.limits, ticket.image_id, staged, output_dir,
                        len(ticket.case_ids), gpu_uuids, labels=dict(ticket.labels),
                        user=ticket.image_user)

    def _run(self, ticket: JobTicket, spec: RunSpec,
             taken: Taken | None = None) -> tuple[RunResult, dict]:
        with self._heartbeats(ticket) as lost:
            with platform_step("preparing the image"):
                self.prepare_image(ticket)
            sampler = TelemetrySampler(spec.gpu_uuids, on_sample=self._gpu_sample).start()
            started = time.monotonic()
            try:
                with platform_step("running the container"):
                    result = self.runner.run(spec, cancel=lost,
                                             on_log=functools.partial(self._log, ticket))
            finally:
                usage = sampler.stop()
                for uuid in spec.gpu_uuids:  # idle now: no stale reading on later heartbeats
                    self.gpu_latest.pop(uuid, None)
                if taken is not None:
                    self.slots.record(taken, ticket.job_id, started, time.monotonic())
        self._after_run(result)
        if lost.is_set():
            raise LeaseLost(f"job {ticket.job_id} was taken back while it ran")
        return result, {uuid: vars(u) for uuid, u in usage.items()}

    def _log(self, ticket: JobTicket, text: str) -> None:
        """A live log chunk to the coordinator (the runner bounds size and rate)."""
        self.coordinator.log(ticket, text)

    @contextlib.contextmanager
    def _heartbeats(self, ticket: JobTicket):
        """Renew the lease while the body runs; the event yielded is set when it was lost."""
        heartbeat = Heartbeat(self.coordinator, ticket, self.heartbeat_seconds).start()
        try:
            yield heartbeat.lost
        finally:
            heartbeat.stop()
