"""The worker's whole loop with a fake runner and a fake GPU inventory: no Docker.

The fake runner implements the Runner protocol and writes its outputs into the output
directory as a container would (a threshold mask per case), or fails as it is told. The
GPU inventory is injected (two made-up UUIDs): a job that wants one GPU gets one, holds
it while it runs, and gives it back. The database and the scoring are real.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from engine.db.models import CaseResultRow, JobRow, SubmissionRow
from engine.images import PinnedImage
from engine.leaderboard import leaderboard
from engine.medio import Volume, read_volume, write_nifti
from engine.submissions import register_challenge, submit
from engine.worker import JobTicket, Worker
from gpu.allocator import GPUAllocator, NotEnoughGPUs
from runners.base import FailureReason, RunResult, RunSpec, RunStatus, failed, require_paths
from tests.engine_fixtures import make_scene

FAKE_GPUS = ["GPU-00000000-fake-0000-0000-000000000001",
             "GPU-00000000-fake-0000-0000-000000000002"]
IMAGE = PinnedImage(image_id="sha256:" + "ab" * 32, tar_sha256="cd" * 32, archive_sha256=None,
                    layers=[],
                    reference="fake/segmenter:latest", architecture="amd64", user="1000:1000",
                    size_bytes=1 << 20)


@dataclass
class FakeRunner:
    """A Runner that segments by threshold, like the example image, in this process.
    `fail` maps a run's index (0: the first run) to how that run ends instead."""

    gpu_locks: Path
    fail: dict[int, str] = field(default_factory=dict)
    specs: list[RunSpec] = field(default_factory=list)
    held: list[bool] = field(default_factory=list)  # was each run's GPU held while it ran?

    def inspect_image(self, reference: str) -> dict:
        return {"Id": IMAGE.image_id, "Architecture": "amd64", "Os": "linux", "Config": {}}

    def has_image(self, image_id: str) -> bool:
        return image_id == IMAGE.image_id  # always on this fake node: nothing to load

    def answers(self) -> bool:
        return True

    def load_image(self, chunks) -> None:
        raise AssertionError("the fake node holds its one image: nothing is ever loaded")

    def run(self, spec: RunSpec, cancel: threading.Event | None = None, *,
            on_log=None) -> RunResult:
        require_paths(spec)
        index = len(self.specs)
        self.specs.append(spec)
        self.held += [self._held(uuid) for uuid in spec.gpu_uuids]
        how = self.fail.get(index)
        if how == "raise":
            raise RuntimeError("a bug of ours in the runner")
        if how == "exit":
            return failed(FailureReason.NONZERO_EXIT, "the container exited with code 1",
                          exit_code=1, wall_seconds=0.1)
        written = self._segment(spec)
        return RunResult(status=RunStatus.SUCCEEDED, reason=None, message="succeeded",
                         exit_code=0, wall_seconds=0.2 * written, output_files=written,
                         image_id=spec.image, user=spec.user)

    def _segment(self, spec: RunSpec) -> int:
        listing = json.loads((spec.input_dir / "cases.json").read_text())["cases"]
        for case in listing:
            image = read_volume(spec.input_dir / case["case_id"] / case["files"][0])
            array = np.asarray(image.array, dtype=float)
            mask = (array > np.percentile(array, 90)).astype(np.uint8)
            write_nifti(Volume(mask, image.affine),
                        spec.output_dir / case["case_id"] / "mask.nii.gz")
        return len(listing)

    def _held(self, uuid: str) -> bool:
        try:
            GPUAllocator([uuid], self.gpu_locks).allocate(1).release()
        except NotEnoughGPUs:
            return True
        return False


def gpu_scene(tmp_path: Path):
    scene = make_scene(tmp_path, validation_cases=3, cases_per_run=2)
    text = scene.challenge_file.read_text().replace(
        "limits: {memory: 1g, cpus: 1, time_per_case: 60s, output_quota: 64m}\n    visibility",
        "limits: {memory: 1g, cpus: 1, time_per_case: 60s, output_quota: 64m, gpus: 1}\n"
        "    visibility", 1)
    assert "gpus: 1}" in text
    scene.challenge_file.write_text(text)
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        sub = submit(session, "test-liver", "validation", "gpu-team", IMAGE).id
        session.commit()
    return scene, sub


def fake_worker(scene, runner: FakeRunner) -> Worker:
    return Worker(scene.sessions, scene.settings, runner, scoring_workers=1, gpus=FAKE_GPUS)


def test_gpu_jobs_get_a_gpu_hold_it_give_it_back_and_reach_the_leaderboard(tmp_path):
    scene, sub = gpu_scene(tmp_path)
    runner = FakeRunner(scene.settings.state_dir / "gpus")
    worker = fake_worker(scene, runner)
    assert worker.gpus.uuids == FAKE_GPUS

    assert worker.run(until_idle=True) == 2  # the smoke case, then one shard of two

    assert [len(spec.gpu_uuids) for spec in runner.specs] == [1, 1]
    assert all(spec.gpu_uuids[0] in FAKE_GPUS for spec in runner.specs)
    assert runner.held == [True, True]  # held while the container ran...
    assert worker.gpus.free_count() == 2  # ...and released after
    assert {spec.user for spec in runner.specs} == {"1000:1000"}  # the uid:gid of intake
    with scene.sessions() as session:
        submission = session.get(SubmissionRow, sub)
        assert (submission.status, submission.reason) == ("succeeded", None)
        jobs = session.scalars(select(JobRow).where(JobRow.submission_id == sub)).all()
        assert [(j.kind, j.status, j.gpus) for j in jobs] == [
            ("smoke", "succeeded", 1), ("main", "succeeded", 1)]
        results = session.scalars(select(CaseResultRow).order_by(CaseResultRow.case_id)).all()
        assert [(r.case_id, r.valid) for r in results] == [
            ("case-001", True), ("case-002", True), ("case-003", True)]
        assert all(0.0 < r.metrics["dice[1]"] <= 1.0 for r in results)
        (entry,) = leaderboard(session, "test-liver", "validation")
        assert entry.team == "gpu-team"


def test_a_run_that_fails_ends_the_submission_with_its_reason(tmp_path):
    scene, sub = gpu_scene(tmp_path)
    runner = FakeRunner(scene.settings.state_dir / "gpus", fail={0: "exit"})
    worker = fake_worker(scene, runner)

    assert worker.run(until_idle=True) == 1  # the smoke job failed: nothing else is run

    assert worker.gpus.free_count() == 2
    with scene.sessions() as session:
        submission = session.get(SubmissionRow, sub)
        assert (submission.status, submission.reason) == ("failed", "NONZERO_EXIT")
        (result,) = session.scalars(select(CaseResultRow)).all()
        assert (result.valid, result.reason) == (False, "NONZERO_EXIT")
        assert leaderboard(session, "test-liver", "validation") == []


def test_a_runner_that_raises_is_retried_as_the_platforms_failure(tmp_path):
    scene, sub = gpu_scene(tmp_path)
    runner = FakeRunner(scene.settings.state_dir / "gpus", fail={0: "raise"})
    worker = fake_worker(scene, runner)

    assert worker.run(until_idle=True) == 3  # the smoke job twice (retried), then the shard

    assert worker.gpus.free_count() == 2
    with scene.sessions() as session:
        submission = session.get(SubmissionRow, sub)
        assert submission.status == "succeeded"
        smoke = session.scalars(select(JobRow).where(JobRow.kind == "smoke")).one()
        assert (smoke.status, smoke.attempts) == ("succeeded", 2)


def test_reports_of_an_attempt_that_was_swept_are_refused(tmp_path):
    """A late report of an old attempt changes nothing: the attempt fences it."""
    from engine.errors import LeaseLost
    from engine.worker import JobOutcome

    scene, _ = gpu_scene(tmp_path)
    runner = FakeRunner(scene.settings.state_dir / "gpus")
    worker = fake_worker(scene, runner)
    ticket = worker.coordinator.lease(2)
    assert isinstance(ticket, JobTicket) and ticket.attempt == 1
    worker.coordinator.retry(ticket, "the node went away")
    again = worker.coordinator.lease(2)
    assert (again.job_id, again.attempt) == (ticket.job_id, 2)
    outcome = JobOutcome(failed(FailureReason.TIMEOUT, "late"), {}, str(tmp_path / "none"))
    with pytest.raises(LeaseLost):
        worker.coordinator.complete(ticket, outcome)
    with pytest.raises(LeaseLost):
        worker.coordinator.started(ticket)
    worker.coordinator.started(again)  # the current attempt goes on


def test_a_node_agent_loads_no_database_code():
    """A remote node has no database: importing the agent must not need one (the import
    contract checks the imports written; this checks what Python actually loads)."""
    import subprocess
    import sys

    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, engine.worker.agent; print(sorted({m.split('.')[0] "
         "for m in sys.modules if m.startswith(('sqlalchemy', 'alembic', 'engine.db'))}))"],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    assert loaded.stdout.strip() == "[]"


class IdleCoordinator:
    """A Coordinator with nothing to hand out, counting its sweeps."""

    def __init__(self):
        self.sweeps = 0
        self.leases = 0

    def lease(self, capacity: int):
        self.leases += 1
        return None

    def maintenance(self) -> None:
        self.sweeps += 1

    def awaiting_scoring(self) -> int:
        return 0


class ScoringElsewhereCoordinator(IdleCoordinator):
    """Nothing to hand out yet, while the server still scores `pending` of the node's runs
    (each claim hears one fewer): what their ends queue would be the node's next jobs."""

    def __init__(self, pending: int):
        super().__init__()
        self.pending = pending

    def lease(self, capacity: int):
        self.leases += 1
        self.pending = max(0, self.pending - 1)
        return None

    def awaiting_scoring(self) -> int:
        return self.pending


def test_the_agent_sweeps_at_most_every_few_seconds_not_on_every_poll(tmp_path):
    from engine.config import Settings
    from engine.worker import Agent

    settings = Settings(data_dir=tmp_path, database_url="sqlite://", state_dir=tmp_path / "s")
    coordinator = IdleCoordinator()
    agent = Agent(coordinator, FakeRunner(tmp_path / "locks"), settings, gpus=FAKE_GPUS,
                  maintenance_seconds=3600)
    assert [agent.run_once() for _ in range(5)] == [False] * 5
    assert (coordinator.leases, coordinator.sweeps) == (5, 1)
    assert agent.run(until_idle=True) == 0  # idle only once a last sweep found nothing
    assert coordinator.sweeps == 2


def test_until_idle_waits_for_the_nodes_runs_still_being_scored(tmp_path):
    """A server answers a completion before scoring it: a smoke job's end queues the main
    jobs later. An --until-idle node is not idle while its runs are still being scored."""
    from engine.config import Settings
    from engine.worker import Agent

    settings = Settings(data_dir=tmp_path, database_url="sqlite://", state_dir=tmp_path / "s")
    coordinator = ScoringElsewhereCoordinator(pending=4)
    agent = Agent(coordinator, FakeRunner(tmp_path / "locks"), settings, gpus=FAKE_GPUS,
                  maintenance_seconds=3600)
    assert agent.run(until_idle=True) == 0
    assert coordinator.pending == 0 and coordinator.leases >= 5  # asked until none was left


def test_a_gpu_jobs_samples_reach_the_dcgm_gauges_and_its_provenance(tmp_path, monkeypatch):
    """The node agent's telemetry sampler feeds engine.gpu_metrics (NVML is the one stand-in:
    no GPU exists here), and each attempt's provenance names the GPU it ran on."""
    import socket
    import sys

    from engine import gpu_metrics
    from tests.test_metrics import FakeNVML

    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(1_000))
    gpu_metrics.GPU_SAMPLES.clear()
    scene, sub = gpu_scene(tmp_path)
    worker = fake_worker(scene, FakeRunner(scene.settings.state_dir / "gpus"))
    assert worker.run(until_idle=True) == 2

    heard = {(s.node, s.uuid) for s in gpu_metrics.GPU_SAMPLES.fresh()}
    assert heard and heard <= {(socket.gethostname(), uuid) for uuid in FAKE_GPUS}
    with scene.sessions() as session:
        for job in session.scalars(select(JobRow).where(JobRow.submission_id == sub)):
            record = job.run_result["provenance"]
            assert [g["uuid"] for g in record["gpus"]] == record["run_spec"]["gpu_uuids"]
            assert record["run_spec"]["gpu_uuids"][0] in FAKE_GPUS
            assert set(job.run_result["gpus"]) == set(record["run_spec"]["gpu_uuids"])
    gpu_metrics.GPU_SAMPLES.clear()


def test_one_outage_failing_several_slots_pauses_claims_once_not_once_per_slot(tmp_path):
    """A daemon restart fails every slot's run at once: the claim pause is the outage's,
    doubled only by a failure after it ended (else 6 slots reach the 300 s cap and an
    idle, healthy node is marked lost)."""
    scene, _ = gpu_scene(tmp_path)
    worker = Worker(scene.sessions, scene.settings, FakeRunner(tmp_path / "locks"),
                    scoring_workers=1, gpus=FAKE_GPUS, platform_pause_seconds=15.0)
    infrastructure = failed(FailureReason.INFRASTRUCTURE, "the daemon went away")
    for _ in range(6):  # six slots' runs fail together
        worker._after_run(infrastructure)
    assert worker._platform_pause == 15.0 and not worker.ready_to_claim()
    worker._claims_resume_at = 0.0  # the pause is over; the next failure doubles it
    worker._after_run(infrastructure)
    assert worker._platform_pause == 30.0
