"""A node runs a job per slot at once, and reports apart from its slots.

Real Docker, real containers, a real database. Only the GPUs are made up (a GPU cannot
exist here): the agent allocates made-up UUIDs, and `MadeUpGpusRunner` runs the container
without the device request while the spec (and so the provenance) keeps the UUIDs. Its
`together` barrier holds each of the first runs until that many are about to start at
once: a node that ran one job at a time never gets past it (the barrier breaks, the job
is the platform's failure), so every assertion below that the jobs succeeded says they ran
side by side.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import select

from engine.db.models import EventRow, JobRow, SubmissionRow
from engine.lifecycle import cancel
from engine.statuses import JobStatus
from engine.submissions import register_challenge, submit
from engine.worker import Worker
from engine.worker.slots import busy_fractions
from runners.base import RunResult, RunSpec
from runners.docker import DockerRunner
from tests.engine_fixtures import build_examples, make_scene, pin

FAKE_GPUS = ["GPU-00000000-fake-0000-0000-00000000000a",
             "GPU-00000000-fake-0000-0000-00000000000b"]
GUARD_SECONDS = 180  # a deadlock guard only: a sequential node breaks the barrier here


class MadeUpGpusRunner(DockerRunner):
    def __init__(self, state_dir: Path, *, together: int = 0):
        super().__init__(state_dir=state_dir)
        self.together = threading.Barrier(together) if together else None
        self.lock = threading.Lock()
        self.count = 0
        self.entered = threading.Semaphore(0)
        self.results: dict[str, RunResult] = {}  # by the job's output dir name

    def run(self, spec: RunSpec, cancel: threading.Event | None = None, *,
            on_log=None) -> RunResult:
        with self.lock:
            index, self.count = self.count, self.count + 1
        self.entered.release()
        if self.together is not None and index < self.together.parties:
            self.together.wait(timeout=GUARD_SECONDS)  # the first ones start together
        result = super().run(replace(spec, gpu_uuids=()), cancel=cancel, on_log=on_log)
        with self.lock:
            self.results[Path(spec.output_dir).name] = result
        return result


@pytest.fixture(scope="module")
def images(docker_engine, module_tmp):
    return build_examples(module_tmp("example-images"))


@pytest.fixture(scope="module")
def tars(module_tmp):
    return module_tmp("tars")


def scene_with(tmp_path, image_id, *, gpus: bool, teams=("alpha", "beta")):
    scene = make_scene(tmp_path)
    if gpus:
        scene.challenge_file.write_text(scene.challenge_file.read_text().replace(
            "limits: {memory: 1g, cpus: 1, time_per_case: 60s, output_quota: 64m}\n"
            "    visibility",
            "limits: {memory: 1g, cpus: 1, time_per_case: 60s, output_quota: 64m, gpus: 1}\n"
            "    visibility", 1))
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        ids = [submit(session, "test-liver", "validation", team, image_id).id for team in teams]
        session.commit()
    return scene, ids


def smoke_jobs(scene) -> list[JobRow]:
    with scene.sessions() as session:
        return session.scalars(select(JobRow).where(JobRow.kind == "smoke")
                               .order_by(JobRow.id)).all()


def job_events(scene, job_id: int) -> list[tuple[int, str]]:
    with scene.sessions() as session:
        return [(e.id, e.to_state) for e in session.scalars(
            select(EventRow).where(EventRow.entity == "job", EventRow.entity_id == job_id)
            .order_by(EventRow.id))]


def first_event(events: list[tuple[int, str]], state: str) -> int:
    return next(event_id for event_id, to_state in events if to_state == state)


def assert_ran_side_by_side(scene, first: JobRow, second: JobRow) -> None:
    """Each started (RUNNING) before the other's run was reported (SCORING)."""
    one, two = job_events(scene, first.id), job_events(scene, second.id)
    assert first_event(one, JobStatus.RUNNING) < first_event(two, JobStatus.SCORING)
    assert first_event(two, JobStatus.RUNNING) < first_event(one, JobStatus.SCORING)


def test_two_gpu_jobs_run_at_once_on_a_two_gpu_node_each_on_its_own_gpu(tmp_path, images,
                                                                        tars):
    scene, _ = scene_with(tmp_path, pin(images["threshold"], tars), gpus=True)
    runner = MadeUpGpusRunner(scene.settings.state_dir / "runs", together=2)
    worker = Worker(scene.sessions, scene.settings, runner, scoring_workers=1, gpus=FAKE_GPUS,
                    cpu_slots=0, heartbeat_seconds=0.5)

    assert worker.run(until_idle=True, max_jobs=2) == 2  # the two smoke jobs, at once

    first, second = smoke_jobs(scene)
    assert (first.status, second.status) == ("succeeded", "succeeded")
    assert_ran_side_by_side(scene, first, second)
    gpus = [[g["uuid"] for g in job.run_result["provenance"]["gpus"]] for job in (first, second)]
    assert sorted(gpus) == [[FAKE_GPUS[0]], [FAKE_GPUS[1]]]  # one GPU each, not the same
    assert worker.gpus.free_count() == 2
    uses = worker.slots.uses
    assert sorted(name for use in uses for name in use.slots) == sorted(FAKE_GPUS)
    assert max(u.started for u in uses) < min(u.ended for u in uses)  # the containers overlap


def test_cpu_jobs_run_at_once_in_cpu_slots_and_never_on_a_gpu(tmp_path, images, tars):
    scene, _ = scene_with(tmp_path, pin(images["threshold"], tars), gpus=False)
    runner = MadeUpGpusRunner(scene.settings.state_dir / "runs", together=2)
    worker = Worker(scene.sessions, scene.settings, runner, scoring_workers=1, gpus=FAKE_GPUS,
                    cpu_slots=2, heartbeat_seconds=0.5)

    assert worker.run(until_idle=True, max_jobs=2) == 2

    first, second = smoke_jobs(scene)
    assert (first.status, second.status) == ("succeeded", "succeeded")
    assert_ran_side_by_side(scene, first, second)
    assert all(job.run_result["provenance"]["gpus"] == [] for job in (first, second))
    assert sorted(n for use in worker.slots.uses for n in use.slots) == ["cpu-0", "cpu-1"]


def test_gpu_slots_lease_no_cpu_job_when_the_cpu_slots_are_full(tmp_path, images, tars):
    """A CPU job never sits on a GPU slot: with no CPU slot, the node leaves it queued."""
    scene, _ = scene_with(tmp_path, pin(images["threshold"], tars), gpus=False,
                            teams=("alpha",))
    worker = Worker(scene.sessions, scene.settings,
                    MadeUpGpusRunner(scene.settings.state_dir / "runs"), scoring_workers=1,
                    gpus=FAKE_GPUS, cpu_slots=0)
    assert worker.run(until_idle=True) == 0
    (job,) = smoke_jobs(scene)
    assert job.status == "queued"


class CompletesAfterTheNextLease:
    """The real coordinator, whose first `complete` waits until the node has leased its
    next job: as a server scoring slowly would. A node whose slot waited for the report
    would wait here until the guard ran out."""

    def __init__(self, inner):
        self.inner = inner
        self.order: list[str] = []
        self.leased_again = threading.Event()
        self.first_complete: int | None = None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def lease(self, capacity: int, **kwargs):
        ticket = self.inner.lease(capacity, **kwargs)
        if ticket is not None:
            self.order.append(f"leased {ticket.job_id}")
            if self.first_complete is not None:
                self.leased_again.set()
        return ticket

    def complete(self, ticket, outcome):
        if self.first_complete is None:
            self.first_complete = ticket.job_id
            self.leased_again.wait(GUARD_SECONDS)
        self.inner.complete(ticket, outcome)
        self.order.append(f"completed {ticket.job_id}")


def test_a_slot_leases_its_next_job_while_the_last_is_being_completed(tmp_path, images, tars):
    scene, _ = scene_with(tmp_path, pin(images["threshold"], tars), gpus=False)
    worker = Worker(scene.sessions, scene.settings,
                    MadeUpGpusRunner(scene.settings.state_dir / "runs"), scoring_workers=1,
                    gpus=[], cpu_slots=1, heartbeat_seconds=0.5)
    coordinator = worker.coordinator = CompletesAfterTheNextLease(worker.coordinator)

    assert worker.run(until_idle=True, max_jobs=2) == 2

    first, second = smoke_jobs(scene)
    assert coordinator.order[:3] == [f"leased {first.id}", f"leased {second.id}",
                                     f"completed {first.id}"]
    assert (first.status, second.status) == ("succeeded", "succeeded")


def test_a_stop_lets_running_jobs_finish_and_report_and_leases_no_more(tmp_path, images,
                                                                       tars):
    scene, _ = scene_with(tmp_path, pin(images["threshold"], tars), gpus=False)
    runner = MadeUpGpusRunner(scene.settings.state_dir / "runs")
    worker = Worker(scene.sessions, scene.settings, runner, scoring_workers=1, gpus=[],
                    cpu_slots=2, heartbeat_seconds=0.5)
    stop = threading.Event()
    done: list[int] = []
    thread = threading.Thread(target=lambda: done.append(worker.run(stop, idle_seconds=0.2)))
    thread.start()
    for _ in range(2):  # both smoke jobs are in their containers...
        assert runner.entered.acquire(timeout=GUARD_SECONDS)
    stop.set()  # ...when the node is asked to stop
    thread.join(GUARD_SECONDS)

    assert not thread.is_alive() and done == [2]
    first, second = smoke_jobs(scene)
    assert (first.status, second.status) == ("succeeded", "succeeded")  # finished, reported
    with scene.sessions() as session:
        main = session.scalars(select(JobRow).where(JobRow.kind == "main")).all()
        assert main and {job.status for job in main} == {"queued"}  # never leased


def test_a_lease_lost_in_one_slot_stops_only_that_container(tmp_path, images, tars):
    scene, (victim, other) = scene_with(tmp_path, pin(images["slow"], tars), gpus=False)
    runner = MadeUpGpusRunner(scene.settings.state_dir / "runs")
    worker = Worker(scene.sessions, scene.settings, runner, scoring_workers=1, gpus=[],
                    cpu_slots=2, heartbeat_seconds=0.2)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), kwargs={"idle_seconds": 0.2})
    thread.start()
    for _ in range(2):
        assert runner.entered.acquire(timeout=GUARD_SECONDS)
    with scene.sessions() as session:
        cancel(session, victim, "an organiser", "taken back mid-run")
        session.commit()
    stop.set()
    thread.join(GUARD_SECONDS)

    assert not thread.is_alive()
    with scene.sessions() as session:
        jobs = {job.submission_id: job for job in session.scalars(
            select(JobRow).where(JobRow.kind == "smoke"))}
        assert jobs[victim].status == "cancelled"
        assert jobs[other].status == "succeeded"
        assert session.get(SubmissionRow, victim).status == "cancelled"
    ran = {name: result.reason for name, result in runner.results.items()}
    assert ran[f"job-{jobs[victim].id}"] == "CANCELLED"  # its container stopped
    assert ran[f"job-{jobs[other].id}"] is None  # the other ran to its end


def test_busy_fractions_sum_each_slots_container_time_within_the_window():
    from engine.worker.slots import SlotUse

    uses = [SlotUse(("gpu-a",), 1, 0.0, 4.0), SlotUse(("gpu-a", "gpu-b"), 2, 5.0, 10.0)]
    assert busy_fractions(uses, ["gpu-a", "gpu-b", "cpu-0"], 0.0, 10.0) == {
        "gpu-a": 0.9, "gpu-b": 0.5, "cpu-0": 0.0}


def test_busy_fractions_leave_out_the_spans_when_the_queue_was_dry():
    from engine.worker.slots import SlotUse

    uses = [SlotUse(("cpu-0",), 1, 0.0, 4.0), SlotUse(("cpu-0",), 2, 6.0, 10.0)]
    assert busy_fractions(uses, ["cpu-0"], 0.0, 10.0, [(4.0, 6.0)]) == {"cpu-0": 1.0}
