"""Prometheus metrics: counted in a real database (SQLite and PostgreSQL) at scrape time,
GPUs under dcgm-exporter's names, and HTTP requests through a real server on loopback.

Rows are made by the engine's own functions (register, submit, lease, transition,
cancel), then /metrics is scraped and parsed as Prometheus would.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import threading
import types
from datetime import timedelta

import httpx
import pytest
import uvicorn
from fastapi import APIRouter, FastAPI
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from engine import metrics, queue
from engine.db import session_factory
from engine.db.models import SubmissionRow, TeamRow, utcnow
from engine.images import PinnedImage
from engine.lifecycle import after_job, cancel
from engine.statuses import JobStatus
from engine.submissions import register_challenge, submit
from gpu.telemetry import TelemetrySampler
from tests.conftest import postgres_sessions
from tests.engine_fixtures import make_scene

TEAMS = ("alpha", 'evil"} 1 # x', "gamma")


def scrape(registry) -> dict[str, list]:
    """{family name: [(sample name, labels, value)]}, parsed as Prometheus parses it."""
    return parse(generate_latest(registry).decode())


LABELS = {"epreuve_submissions_total": ("state", "reason"),
          "epreuve_jobs_total": ("kind", "state", "reason"),
          "epreuve_queue_jobs": ("challenge", "phase", "state"),
          "epreuve_workers": ("state",), "epreuve_metrics_database_up": (),
          "epreuve_job_runtime_seconds_count": ("kind",),
          "epreuve_job_runtime_seconds_bucket": ("kind", "le"),
          "epreuve_http_requests_total": ("route", "method", "status"),
          "epreuve_http_request_duration_seconds_count": ("route",)}
DCGM_LABELS = ("gpu", "UUID", "Hostname")


def values(families, name: str) -> dict[tuple, float]:
    """{label values, in LABELS' order: value} of the samples named `name`; every sample
    has exactly those labels."""
    order = LABELS.get(name, DCGM_LABELS)
    found = {}
    for samples in families.values():
        for sample, labels, value in samples:
            if sample == name:
                assert set(labels) == set(order), labels
                found[tuple(labels[key] for key in order)] = value
    return found


def pinned(n: int) -> PinnedImage:
    return PinnedImage(image_id=f"sha256:{n:064x}", tar_sha256=f"{n:064x}",
                       archive_sha256=None, layers=[],
                       reference=f"team/image:{n}", architecture="amd64", user="1000:1000",
                       size_bytes=1)


def step(session, job, owner: str, *states: str, **values) -> None:
    for state in states:
        queue.transition(session, job, state, owner, **values if state == states[-1] else {})
    session.commit()


@pytest.fixture(params=["sqlite", "postgresql"])
def scene(request, tmp_path):
    url = None
    if request.param == "postgresql":
        postgres_sessions()  # a clean schema
        url = os.environ["EPREUVE_TEST_POSTGRES_URL"]
    scene = make_scene(tmp_path, database_url=url)
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        session.commit()
    return scene


@pytest.fixture
def busy(scene):
    """Three submissions: one failed (OOM on its smoke case), one running its main jobs, one
    cancelled. Worker w-one ended its job; w-two is running one."""
    sessions = scene.sessions
    with sessions() as session:
        ids = [submit(session, "test-liver", "validation", team, pinned(i)).id
               for i, team in enumerate(TEAMS)]
        session.commit()
    with sessions() as session:
        job = queue.lease(session, "w-one")
        step(session, job, "w-one", JobStatus.RUNNING, JobStatus.SCORING, JobStatus.FAILED,
             reason="OOM_KILLED", lease_owner=None, finished_at=utcnow())
        after_job(session, job, "test")
        session.commit()
        job = queue.lease(session, "w-two")
        step(session, job, "w-two", JobStatus.RUNNING, JobStatus.SCORING, JobStatus.SUCCEEDED,
             lease_owner=None, finished_at=utcnow())
        after_job(session, job, "test")  # two main jobs queued
        session.commit()
        cancel(session, ids[2], "test")
        session.commit()
        job = queue.lease(session, "w-two")
        step(session, job, "w-two", JobStatus.RUNNING)
    return ids


def test_submissions_and_jobs_by_state_and_reason(scene, busy):
    families = scrape(metrics.build_registry(scene.sessions, gpu_samples=metrics.GPUSamples()))
    assert values(families, "epreuve_submissions_total") == {
        ("queued", "none"): 3, ("running", "none"): 1, ("succeeded", "none"): 0,
        ("failed", "none"): 0, ("failed", "OOM_KILLED"): 1, ("cancelled", "none"): 0,
        ("cancelled", "CANCELLED"): 1}
    jobs = {labels: n for labels, n in values(families, "epreuve_jobs_total").items() if n}
    assert jobs == {
        ("smoke", "queued", "none"): 3, ("smoke", "leased", "none"): 2,
        ("smoke", "running", "none"): 2, ("smoke", "scoring", "none"): 2,
        ("smoke", "failed", "OOM_KILLED"): 1, ("smoke", "succeeded", "none"): 1,
        ("smoke", "cancelled", "CANCELLED"): 1,
        ("main", "queued", "none"): 2, ("main", "leased", "none"): 1,
        ("main", "running", "none"): 1}


def test_queue_length_by_phase_zeros_included(scene, busy):
    families = scrape(metrics.build_registry(scene.sessions, gpu_samples=metrics.GPUSamples()))
    queued = values(families, "epreuve_queue_jobs")
    assert {k: v for k, v in queued.items() if v} == {
        ("test-liver", "validation", "queued"): 1, ("test-liver", "validation", "running"): 1}
    assert set(queued) == {("test-liver", phase, state) for phase in ("validation", "final",
                                                                      "closed")
                           for state in ("queued", "leased", "running", "scoring")}


def test_workers_up_and_busy_from_recent_heartbeats(scene, busy):
    families = scrape(metrics.build_registry(scene.sessions, gpu_samples=metrics.GPUSamples()))
    assert values(families, "epreuve_workers") == {("up",): 1, ("busy",): 1}
    registered = metrics.build_registry(scene.sessions, gpu_samples=metrics.GPUSamples(),
                                        registered_workers=lambda: ["w-two", "w-idle"])
    assert values(scrape(registered), "epreuve_workers") == {("up",): 2, ("busy",): 1}
    silent = metrics.build_registry(scene.sessions, gpu_samples=metrics.GPUSamples(),
                                    heartbeat_window=timedelta(0))
    # no heartbeat is newer than this very instant: the running worker counts as gone
    assert values(scrape(silent), "epreuve_workers") == {("up",): 0, ("busy",): 0}


def test_a_scorer_holding_a_job_is_not_counted_as_a_worker(scene, busy):
    """A SCORING job held by the server's scorer (not a node) counts no worker up or busy."""
    from sqlalchemy import update

    from engine.db.models import JobRow
    with scene.sessions() as session:
        job = queue.lease(session, "w-three")
        step(session, job, "w-three", JobStatus.RUNNING, JobStatus.SCORING)
        session.execute(update(JobRow).where(JobRow.id == job.id).values(
            lease_owner="scorer:0123456789ab@host:1:2", heartbeat_at=utcnow()))
        session.commit()
    families = scrape(metrics.build_registry(scene.sessions, gpu_samples=metrics.GPUSamples()))
    assert values(families, "epreuve_workers") == {("up",): 1, ("busy",): 1}  # w-two only


def test_counters_never_go_down_as_jobs_move_on(scene, busy):
    registry = metrics.build_registry(scene.sessions, gpu_samples=metrics.GPUSamples())
    before = values(scrape(registry), "epreuve_jobs_total")
    with scene.sessions() as session:
        job = queue.lease(session, "w-three")
        step(session, job, "w-three", JobStatus.RUNNING)
    after = values(scrape(registry), "epreuve_jobs_total")
    assert all(after.get(labels, 0) >= n for labels, n in before.items())
    assert after["main", "leased", "none"] == before["main", "leased", "none"] + 1
    assert after["main", "queued", "none"] == before["main", "queued", "none"]


def test_no_label_is_a_submission_id_or_a_team_name(scene, busy):
    with scene.sessions() as session:
        teams = set(session.scalars(select(TeamRow.name)))
        ids = {str(i) for i in session.scalars(select(SubmissionRow.id))}
    assert teams == set(TEAMS) and ids == {str(i) for i in busy}
    families = scrape(metrics.build_registry(scene.sessions, gpu_samples=metrics.GPUSamples()))
    labels = label_values(families)
    assert labels and not labels & (teams | ids)
    assert set(families) >= {"epreuve_submissions", "epreuve_jobs", "epreuve_queue_jobs",
                             "epreuve_workers", "epreuve_metrics_database_up"}


def test_unknown_kinds_and_reasons_read_other(scene):
    with scene.sessions() as session:
        submission = submit(session, "test-liver", "validation", "alpha", pinned(9))
        queue.enqueue(session, submission, [["case-002"]], kind="kind-" + "x" * 10, actor="t")
        job = queue.lease(session, "w")
        step(session, job, "w", JobStatus.FAILED, reason="made up", lease_owner=None)
    families = scrape(metrics.build_registry(scene.sessions, gpu_samples=metrics.GPUSamples()))
    jobs = values(families, "epreuve_jobs_total")
    assert jobs["smoke", "failed", "other"] == 1
    assert jobs["other", "queued", "none"] == 1


def test_a_database_that_does_not_answer_is_reported_not_raised(tmp_path):
    sessions = session_factory(f"sqlite:///{tmp_path / 'empty.db'}", upgrade=False)
    families = scrape(metrics.build_registry(sessions, gpu_samples=metrics.GPUSamples()))
    assert values(families, "epreuve_metrics_database_up") == {(): 0}
    assert "epreuve_jobs" not in families


def test_database_up_when_it_answers(scene):
    families = scrape(metrics.build_registry(scene.sessions, gpu_samples=metrics.GPUSamples()))
    assert values(families, "epreuve_metrics_database_up") == {(): 1}


# -- job runtimes ----------------------------------------------------------------------------

def runtime(families, kind: str, le: str | None = None) -> float:
    if le is None:
        return values(families, "epreuve_job_runtime_seconds_count").get((kind,), 0)
    return values(families, "epreuve_job_runtime_seconds_bucket").get((kind, le), 0)


def test_job_runtimes_in_seconds_by_kind():
    registry = metrics.build_registry(None, gpu_samples=metrics.GPUSamples())
    before = scrape(registry)
    for seconds in (0.5, 42.0, 3000.0):
        metrics.observe_job_runtime("main", seconds)
    metrics.observe_job_runtime("smoke", 2.0)
    for nonsense in (math.nan, -1.0, math.inf, "12", True):
        metrics.observe_job_runtime("main", nonsense)
    metrics.observe_job_runtime("a hostile kind", 1.0)
    after = scrape(registry)
    assert runtime(after, "main") - runtime(before, "main") == 3
    assert runtime(after, "smoke") - runtime(before, "smoke") == 1
    assert runtime(after, "other") - runtime(before, "other") == 1
    assert runtime(after, "main", "60.0") - runtime(before, "main", "60.0") == 2
    assert runtime(after, "main", "1.0") - runtime(before, "main", "1.0") == 1
    assert "a hostile kind" not in str(after)


def test_several_registries_share_the_runtimes_and_do_not_collide():
    one = metrics.build_registry(None, gpu_samples=metrics.GPUSamples())
    two = metrics.build_registry(None, gpu_samples=metrics.GPUSamples())
    metrics.observe_job_runtime("smoke", 7.0)
    assert runtime(scrape(one), "smoke") == runtime(scrape(two), "smoke") >= 1


# -- GPUs --------------------------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


UUID = "GPU-11111111-2222-3333-4444-555555555555"


def test_gpu_samples_under_dcgm_names_and_labels():
    samples = metrics.GPUSamples()
    samples.record("node-a", 0, UUID, 87, 40960, 312.5, 123456789)
    samples.record("node-b", 1, "GPU-b", 3, 10, 60.0, None)  # no energy counter on this GPU
    families = scrape(metrics.build_registry(None, gpu_samples=samples))
    a = ("0", UUID, "node-a")
    assert values(families, "DCGM_FI_DEV_GPU_UTIL") == {a: 87, ("1", "GPU-b", "node-b"): 3}
    assert values(families, "DCGM_FI_DEV_FB_USED")[a] == 40960
    assert values(families, "DCGM_FI_DEV_POWER_USAGE")[a] == 312.5
    assert values(families, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION") == {a: 123456789}


def test_the_module_table_is_fed_by_record_gpu_sample():
    metrics.GPU_SAMPLES.clear()
    metrics.record_gpu_sample("node-a", 2, UUID, 50, 1, 2.0, 3)
    families = scrape(metrics.build_registry(None))
    assert values(families, "DCGM_FI_DEV_GPU_UTIL") == {("2", UUID, "node-a"): 50}
    metrics.GPU_SAMPLES.clear()


def test_a_gpu_not_heard_from_is_dropped_and_the_table_is_bounded():
    clock = Clock()
    samples = metrics.GPUSamples(capacity=3, stale_after=60, clock=clock)
    samples.record("old", 0, "GPU-old", 1, 1, 1.0, 1)
    clock.now += 61
    for i in range(4):
        samples.record("n", i, f"GPU-{i}", 1, 1, 1.0, 1)
    assert [s.uuid for s in samples.fresh()] == ["GPU-1", "GPU-2", "GPU-3"]
    samples.record("n", 1, "GPU-1", 5, 1, 1.0, 1)  # heard again: the newest now
    samples.record("n", 4, "GPU-4", 1, 1, 1.0, 1)
    assert [s.uuid for s in samples.fresh()] == ["GPU-1", "GPU-3", "GPU-4"]
    clock.now += 61
    assert samples.fresh() == []


@pytest.mark.parametrize("field, value", [
    ("node", ""), ("node", "n" * 201), ("node", "a\nb"), ("uuid", None), ("uuid", 'x"\n'),
    ("index", -1), ("index", "0"), ("index", True), ("util", math.nan), ("util", -1),
    ("mem_used_mib", math.inf), ("power_w", "300"), ("energy_mj", -5)])
def test_a_reading_that_is_no_reading_is_refused(field, value):
    reading = dict(node="n", index=0, uuid="GPU-x", util=1, mem_used_mib=1, power_w=1.0,
                   energy_mj=1)
    samples = metrics.GPUSamples()
    with pytest.raises(ValueError, match="GPU"):
        samples.record(**{**reading, field: value})
    assert samples.fresh() == []


# -- HTTP requests, through a real server ------------------------------------------------------

def item(request):
    if request.path_params["item_id"] == "missing":
        raise HTTPException(404, "no such item")
    return PlainTextResponse("ok")


def boom(request):
    raise RuntimeError("a bug")


class LoopbackServer:
    """uvicorn on 127.0.0.1, on a port the kernel picked."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="critical",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run,
                                       kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> httpx.Client:
        self.thread.start()
        client = httpx.Client(base_url=self.url, timeout=10)
        for _ in range(500):  # wait for the server to listen, not for a time
            if self.server.started:
                break
            threading.Event().wait(0.01)
        assert self.server.started
        return client

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.sock.close()


@pytest.fixture
def starlette_app():
    registry = metrics.build_registry(None, gpu_samples=metrics.GPUSamples())

    def metrics_page(request):
        return Response(generate_latest(registry), media_type="text/plain")

    app = Starlette(routes=[Route("/items/{item_id}", item, methods=["GET", "PUT"]),
                            Route("/boom", boom), Route("/metrics", metrics_page)],
                    middleware=[Middleware(metrics.RequestMetrics, registry=registry)])
    return app


def parse(text: str) -> dict[str, list]:
    return {f.name: [(s.name, s.labels, s.value) for s in f.samples]
            for f in text_string_to_metric_families(text)}


def label_values(families) -> set[str]:
    return {value for samples in families.values() for _, labels, _ in samples
            for value in labels.values()}


def test_requests_by_route_template_method_and_status(starlette_app):
    with LoopbackServer(starlette_app) as client:
        assert client.get("/items/12345").status_code == 200
        assert client.get("/items/67890").status_code == 200
        assert client.put("/items/12345").status_code == 200
        assert client.get("/items/missing").status_code == 404
        assert client.post("/items/1").status_code == 405
        assert client.get("/boom").status_code == 500
        for path in ("/no/such/path", "/etc/passwd", "/items"):
            assert client.get(path).status_code == 404
        assert client.request("FOOBAR", "/items/1").status_code == 405
        families = parse(client.get("/metrics").text)
    assert values(families, "epreuve_http_requests_total") == {
        ("/items/{item_id}", "GET", "200"): 2, ("/items/{item_id}", "PUT", "200"): 1,
        ("/items/{item_id}", "GET", "404"): 1, ("/items/{item_id}", "POST", "405"): 1,
        ("/items/{item_id}", "other", "405"): 1,
        ("/boom", "GET", "500"): 1, ("unmatched", "GET", "404"): 3}
    raw = ("12345", "67890", "/no/such/path", "/etc/passwd", "FOOBAR", "missing", "/items")
    assert not label_values(families) & set(raw)
    durations = values(families, "epreuve_http_request_duration_seconds_count")
    assert durations == {("/items/{item_id}",): 6, ("/boom",): 1, ("unmatched",): 3}


def test_a_fastapi_router_prefix_is_part_of_the_template():
    registry = metrics.build_registry(None, gpu_samples=metrics.GPUSamples())
    router = APIRouter(prefix="/challenges/{challenge}")

    @router.get("/submissions/{submission_id}")
    def one(challenge: str, submission_id: int):
        return {"id": submission_id}

    app = FastAPI()
    app.include_router(router)

    @app.get("/metrics")
    def metrics_page():
        return Response(generate_latest(registry), media_type="text/plain")

    app.add_middleware(metrics.RequestMetrics, registry=registry)
    with LoopbackServer(app) as client:
        assert client.get("/challenges/liver/submissions/41").status_code == 200
        assert client.get("/challenges/liver/submissions/not-a-number").status_code == 422
        families = parse(client.get("/metrics").text)
    template = "/challenges/{challenge}/submissions/{submission_id}"
    assert values(families, "epreuve_http_requests_total") == {
        (template, "GET", "200"): 1, (template, "GET", "422"): 1}
    assert not label_values(families) & {"41", "liver", "not-a-number"}


def test_two_apps_on_one_registry_share_the_http_metrics():
    registry = metrics.build_registry(None, gpu_samples=metrics.GPUSamples())
    one = metrics.RequestMetrics(Starlette(), registry)
    two = metrics.RequestMetrics(Starlette(), registry)
    assert one.requests is two.requests and one.duration is two.duration


class FakeNVML(types.ModuleType):
    """pynvml for one GPU (a GPU cannot exist here): the calls TelemetrySampler makes."""

    class NVMLError(Exception):
        pass

    def __init__(self, energy: int | None):
        super().__init__("pynvml")
        self.energy = energy

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return uuid

    def nvmlDeviceGetIndex(self, handle):
        return 3

    def nvmlDeviceGetPowerUsage(self, handle):
        return 287_500  # mW

    def nvmlDeviceGetUtilizationRates(self, handle):
        return types.SimpleNamespace(gpu=64)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(used=3 * 2**30, total=80 * 2**30)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if self.energy is None:
            raise self.NVMLError("not supported")
        self.energy += 1000
        return self.energy


@pytest.mark.parametrize("energy", [5_000_000, None])
def test_the_telemetry_sampler_feeds_the_dcgm_metrics(monkeypatch, energy):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(energy))
    samples = metrics.GPUSamples()
    sampler = TelemetrySampler((UUID,), interval_seconds=3600,
                               on_sample=metrics.gpu_sample_recorder("node-x", samples))
    sampler.start().stop()  # stop() takes one last sample
    families = scrape(metrics.build_registry(None, gpu_samples=samples))
    key = ("3", UUID, "node-x")
    assert values(families, "DCGM_FI_DEV_GPU_UTIL") == {key: 64}
    assert values(families, "DCGM_FI_DEV_FB_USED") == {key: 3 * 1024}
    assert values(families, "DCGM_FI_DEV_POWER_USAGE") == {key: 287.5}
    expected = {} if energy is None else {key: 5_002_000}
    assert values(families, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION") == expected


def test_a_failing_consumer_never_stops_the_sampler(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(1))

    def broken(reading):
        raise RuntimeError("consumer bug")

    sampler = TelemetrySampler((UUID,), interval_seconds=3600, on_sample=broken).start()
    sampler.sample()
    usage = sampler.stop()
    assert usage[UUID].samples == 2 and usage[UUID].peak_power_watts == 287.5
