"""The node registry over a real server on loopback (uvicorn, SQLite and PostgreSQL):
nodes register through the worker routes and refuse hostile descriptions with a clear 422
(nothing kept); a token cannot speak for another token's node; heartbeats carry each GPU's
latest reading, which the server keeps and exports under the DCGM names; a node unheard
for `node_lost_after` is marked lost by the server's sweep, its job re-queued at once as
the platform's failure with an event, and when it comes back it is active again while
its stale attempt is refused (409). Organisers and admins read GET /api/v1/nodes;
participants, reviewers and workers get 403. A local worker registers through the database.
"""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import timedelta

import httpx
import pytest
from prometheus_client import generate_latest
from sqlalchemy import func, select

from engine import nodes
from engine.api.app import ApiOptions
from engine.api.ratelimit import Rate
from engine.db.models import CaseResultRow, EventRow, JobRow, NodeRow, TokenRow
from engine.errors import EXIT_REFUSED
from engine.node_description import InvalidNode, validated
from engine.tokens import create_token, hash_secret
from tests.api_fixtures import build_world, queued_submission, start_server
from tests.test_remote_worker_process import (  # noqa: F401 - slow_image is a fixture
    server_world,
    slow_image,
    submission_status,
    worker_process,
)
from tests.test_remote_worker_process import wait_for as remote_wait

API = "/api/v1/worker"
GPU = {"uuid": "GPU-5d0c1f7e-test", "model": "NVIDIA H200", "driver": "550.54.15",
       "memory_bytes": 150_754_820_096}
GOOD = {"name": "gpu-node-01", "gpu_slots": 1, "cpu_slots": 2, "gpus": [GPU],
        "facts": {"docker_version": "26.1.5", "os": "Debian GNU/Linux 13"}}
SAMPLE = {"index": 0, "utilisation_percent": 87.0, "memory_used_mib": 20480.0,
          "power_watts": 412.5, "energy_millijoules": 9_000_000.0}
FAST = Rate(burst=10_000, per_second=1000.0)


def client(server, token: str | None) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=30,
                        headers={"Authorization": f"Bearer {token}"} if token else {})


def node_count(world) -> int:
    with world.sessions() as session:
        return session.scalar(select(func.count()).select_from(NodeRow))


def wait_for(what: str, check, timeout: float = 60.0):
    """Poll until `check()` is truthy (a deadline against hanging, not a timed assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"gave up waiting for {what}")


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def live(request, module_tmp):
    world = build_world(module_tmp(f"nodes-{request.param}"), request.param)
    server = start_server(world, ApiOptions(rate=FAST))
    yield server
    server.stop()


# -- a node's description: hostile input ------------------------------------------------


HOSTILE = {
    "a huge name": {**GOOD, "name": "n" * 5000},
    "control characters in the name": {**GOOD, "name": "node\x1b[31m-red"},
    "a newline in the name": {**GOOD, "name": "node\nforged log line"},
    "a path as the name": {**GOOD, "name": "../../etc/passwd"},
    "an empty name": {**GOOD, "name": ""},
    "a name of the wrong type": {**GOOD, "name": ["gpu-node-01"]},
    "slots as text": {**GOOD, "gpu_slots": "8"},
    "slots as a boolean": {**GOOD, "cpu_slots": True},
    "negative slots": {**GOOD, "gpu_slots": -1},
    "absurd slots": {**GOOD, "gpu_slots": 10**12},
    "too many GPUs": {**GOOD, "gpus": [GPU] * 65},
    "a GPU of the wrong type": {**GOOD, "gpus": ["GPU-0"]},
    "a GPU model with control characters": {**GOOD, "gpus": [{**GPU, "model": "H200\x00"}]},
    "a GPU with a huge uuid": {**GOOD, "gpus": [{**GPU, "uuid": "G" * 100_000}]},
    "GPU memory as a float": {**GOOD, "gpus": [{**GPU, "memory_bytes": 1.5}]},
    "an unknown field": {**GOOD, "admin": True},
    "facts too large": {**GOOD, "facts": {"padding": "x" * (64 << 10)}},
    "facts of the wrong type": {**GOOD, "facts": ["docker"]},
    "not an object": ["gpu-node-01"],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_description_is_refused_before_the_database(case):
    with pytest.raises(InvalidNode):
        validated(HOSTILE[case])


def test_a_valid_description_is_kept_to_the_field():
    description = validated(GOOD)
    assert description.to_json() == GOOD


def test_hostile_descriptions_get_a_clear_422_and_leave_no_node(live):
    before = node_count(live.world)
    with client(live, live.world.tokens["worker"]) as worker:
        for case, body in HOSTILE.items():
            answer = worker.post(f"{API}/nodes/register", json=body)
            assert answer.status_code == 422, (case, answer.text)
            error = answer.json()["error"]
            assert error["message"] and "Traceback" not in error["message"], case
        deep = "[" * 100_000 + "]" * 100_000  # nesting no parser should recurse into
        answer = worker.post(f"{API}/nodes/register", content=deep,
                             headers={"Content-Type": "application/json"})
        assert answer.status_code in (400, 413, 422), answer.text  # a clear refusal, no 500
        assert answer.json()["error"]["message"]
    assert node_count(live.world) == before


def test_a_node_registers_once_per_token_and_name(live):
    with client(live, live.world.tokens["worker"]) as worker:
        first = worker.post(f"{API}/nodes/register", json=GOOD)
        again = worker.post(f"{API}/nodes/register", json={**GOOD, "cpu_slots": 4})
    assert first.status_code == again.status_code == 200, first.text
    assert first.json()["node_id"] == again.json()["node_id"]  # restarted: the same node
    with live.world.sessions() as session:
        node = session.get(NodeRow, first.json()["node_id"])
        assert (node.name, node.cpu_slots, node.gpus, node.state) == (
            "gpu-node-01", 4, [GPU], "active")
        assert node.facts["docker_version"] == "26.1.5"


def test_a_token_cannot_speak_for_another_tokens_node(live):
    with live.world.sessions() as session:
        _, other_token = create_token(session, role="worker")
        session.commit()
    with client(live, live.world.tokens["worker"]) as worker:
        node_id = worker.post(f"{API}/nodes/register", json=GOOD).json()["node_id"]
    with client(live, other_token) as other:
        claim = other.post(f"{API}/jobs/claim", json={"node_id": node_id, "wait_seconds": 0})
        assert claim.status_code == 404, claim.text
        theirs = other.post(f"{API}/nodes/register", json=GOOD).json()["node_id"]
    assert theirs != node_id  # the same name under another token is another node
    with client(live, live.world.tokens["admin"]) as admin:
        assert admin.post(f"{API}/nodes/register", json=GOOD).status_code == 403


def test_organisers_and_admins_see_nodes_and_no_one_else(live):
    with client(live, live.world.tokens["worker"]) as worker:
        worker.post(f"{API}/nodes/register", json=GOOD).raise_for_status()
    for principal, status in (("admin", 200), ("organiser-a", 200), ("organiser-b", 200),
                              ("reviewer-a", 403), ("participant-a", 403), ("worker", 403),
                              ("anonymous", 401), ("revoked", 401)):
        token = live.world.tokens.get(principal)
        with client(live, token) as caller:
            answer = caller.get("/api/v1/nodes")
        assert answer.status_code == status, (principal, answer.text)
        if status == 200:
            (node,) = [n for n in answer.json()["items"] if n["name"] == "gpu-node-01"
                       and n["slots"]["gpu"] == 1][:1]
            assert node["gpus"][0]["model"] == "NVIDIA H200" and node["state"] == "active"


# -- heartbeats, GPU readings, lost nodes ----------------------------------------------


@pytest.fixture
def lossy(tmp_path):
    """A server whose nodes are lost after a second unheard (leases stay long: only the
    node registry can take a job back here)."""
    world = build_world(tmp_path, "postgres")
    server = start_server(world, ApiOptions(rate=FAST, worker_lease=timedelta(minutes=5),
                                            sweep_seconds=0.2,
                                            node_lost_after=timedelta(seconds=1)))
    yield server
    server.stop()


def test_a_silent_node_is_lost_its_job_requeued_and_it_comes_back_fenced(lossy):
    world = lossy.world
    submission_id = queued_submission(world, "ch-a", "team-a")
    with client(lossy, world.tokens["worker"]) as worker:
        node_id = worker.post(f"{API}/nodes/register", json=GOOD).json()["node_id"]
        claim = worker.post(f"{API}/jobs/claim", json={"node_id": node_id, "wait_seconds": 0})
        assert claim.status_code == 201, claim.text
        job_id = claim.json()["ticket"]["job_id"]
        fence = {"Epreuve-Attempt": "1", "Epreuve-Attempt-Token": claim.json()["attempt_token"]}
        beat = worker.post(f"{API}/jobs/{job_id}/heartbeat", headers=fence,
                           json={"node_id": node_id, "gpus": {GPU["uuid"]: SAMPLE}})
        assert beat.status_code == 200, beat.text
        with client(lossy, world.tokens["admin"]) as admin:
            (seen,) = admin.get("/api/v1/nodes").json()["items"]
        assert seen["jobs"] == [{"job": job_id, "submission": submission_id,
                                 "status": "leased"}]
        assert seen["gpus"][0]["sample"]["power_watts"] == 412.5
        exported = generate_latest(lossy.server.config.app.state.metrics_registry).decode()
        assert ('DCGM_FI_DEV_POWER_USAGE{Hostname="gpu-node-01",UUID="GPU-5d0c1f7e-test",'
                'gpu="0"} 412.5') in exported

        def job() -> JobRow:
            with world.sessions() as session:
                return session.get(JobRow, job_id)

        wait_for("the node to be lost", lambda: job().status == "queued")  # no heartbeat
        with world.sessions() as session:
            assert session.get(NodeRow, node_id).state == "lost"
            events = session.scalars(select(EventRow).where(
                EventRow.entity.in_(["node", "job"])).order_by(EventRow.id)).all()
        lost = [e for e in events if e.entity == "node" and e.to_state == "lost"]
        assert len(lost) == 1 and lost[0].entity_id == node_id and "1 job(s)" in lost[0].detail
        requeued = [e for e in events if e.entity == "job" and e.entity_id == job_id
                    and e.to_state == "queued"]
        assert "INFRASTRUCTURE" in requeued[-1].detail and "gpu-node-01" in requeued[-1].detail
        assert job().attempts == 1 and job().lease_owner is None
        exported = generate_latest(lossy.server.config.app.state.metrics_registry).decode()
        assert 'epreuve_nodes{state="lost"} 1.0' in exported
        assert 'epreuve_node_heartbeat_age_seconds{node="gpu-node-01",state="lost"}' in exported

        # back: its stale attempt is refused, and the node is active again
        stale = worker.post(f"{API}/jobs/{job_id}/heartbeat", headers=fence,
                            json={"node_id": node_id, "gpus": {}})
        assert stale.status_code == 409, stale.text
        done = worker.post(f"{API}/jobs/{job_id}/complete", headers=fence,
                           json={"result": {}, "gpu_usage": {}})
        assert done.status_code == 409, done.text
    with world.sessions() as session:
        assert session.get(NodeRow, node_id).state == "active"
        back = session.scalars(select(EventRow).where(
            EventRow.entity == "node", EventRow.to_state == "active",
            EventRow.from_state == "lost")).all()
        assert [e.entity_id for e in back] == [node_id]
        assert session.get(JobRow, job_id).status == "queued"  # never the late node's


def test_hostile_gpu_readings_are_refused_and_nothing_kept(lossy):
    world = lossy.world
    queued_submission(world, "ch-a", "team-a")
    with client(lossy, world.tokens["worker"]) as worker:
        node_id = worker.post(f"{API}/nodes/register", json=GOOD).json()["node_id"]
        claim = worker.post(f"{API}/jobs/claim", json={"node_id": node_id, "wait_seconds": 0})
        job_id = claim.json()["ticket"]["job_id"]
        fence = {"Epreuve-Attempt": "1", "Epreuve-Attempt-Token": claim.json()["attempt_token"]}
        answers = []
        for readings in ({"GPU-not-declared": SAMPLE},
                         {GPU["uuid"]: {**SAMPLE, "power_watts": -5}},
                         {GPU["uuid"]: {**SAMPLE, "power_watts": "lots"}},
                         {GPU["uuid"]: {**SAMPLE, "shell": "rm -rf /"}},
                         {f"GPU-{i}": SAMPLE for i in range(65)}):
            answer = worker.post(f"{API}/jobs/{job_id}/heartbeat", headers=fence,
                                 json={"node_id": node_id, "gpus": readings})
            # a body that is no heartbeat is 422; readings that do not validate are dropped,
            # and the lease is still renewed: bad telemetry never costs a job its lease
            assert answer.status_code in (200, 422), answer.text
            answers.append(answer.status_code)
            if answer.status_code == 200:
                assert answer.json()["status"] == "renewed"
        assert answers[0] == 200 and 422 in answers  # the undeclared GPU: dropped, renewed
        other = worker.post(f"{API}/jobs/{job_id}/heartbeat", headers=fence,
                            json={"node_id": node_id + 1000, "gpus": {}})
        assert other.json()["status"] == "renewed", other.text  # an unknown node: the same
    with world.sessions() as session:
        assert session.get(NodeRow, node_id).gpu_samples == {}


# -- a local worker registers through the database ---------------------------------------


@pytest.mark.docker
def test_a_local_worker_is_a_node_in_the_registry(tmp_path):
    from engine.db import session_factory
    from engine.worker import Worker
    from runners import make_runner
    from tests.engine_fixtures import sqlite_settings

    settings = sqlite_settings(tmp_path)
    sessions = session_factory(settings.database_url)
    runner = make_runner("docker", state_dir=settings.state_dir / "runs")
    agent = Worker(sessions, settings, runner, gpus=[], node_name="bench-07")
    assert agent.run_once() is False  # an idle claim: heard from, nothing to run
    with sessions() as session:
        (view,) = nodes.node_views(session)
        (registered,) = session.scalars(select(EventRow).where(EventRow.entity == "node"))
    assert (view["name"], view["state"], view["slots"]) == ("bench-07", "active",
                                                            {"gpu": 0, "cpu": 1})
    assert agent.coordinator.node_id == view["id"] and registered.detail == "registered"
    with sessions() as session:
        assert session.get(NodeRow, view["id"]).facts["docker"]["server_version"]


# -- a real remote agent process, stopped until its node is lost ---------------------------


@pytest.mark.docker
def test_a_stopped_remote_node_is_lost_its_job_runs_elsewhere_and_it_comes_back(
        tmp_path, slow_image):  # noqa: F811 - the fixture imported above
    """`epreuve worker --server` processes: node-a registers and runs the smoke job; it is
    SIGSTOPped (leases are long here: only the registry can take the job back); the server
    marks node-a lost and re-queues the job at once; node-b runs everything; on SIGCONT
    node-a is active again and its late reports are refused (409)."""
    world, submission_id, token = server_world(tmp_path / "server", slow_image,
                                               validation_cases=2)
    with world.sessions() as session:
        _, admin_token = create_token(session, role="admin")
        session.commit()
    server = start_server(world, ApiOptions(rate=FAST, worker_lease=timedelta(minutes=5),
                                            sweep_seconds=0.5,
                                            node_lost_after=timedelta(seconds=3)))
    stopped = worker_process(server.url, token, tmp_path / "node-a", "--max-jobs", "1",
                             "--node-name", "node-a")
    other = None

    def smoke() -> JobRow:
        with world.sessions() as session:
            return session.scalars(select(JobRow).where(JobRow.kind == "smoke")).one()

    def node(name: str) -> NodeRow:
        with world.sessions() as session:
            return session.scalars(select(NodeRow).where(NodeRow.name == name)).one()

    try:
        remote_wait("node-a to run the smoke job", lambda: smoke().status == "running")
        with client(server, admin_token) as admin:
            (seen,) = admin.get("/api/v1/nodes").json()["items"]
        assert (seen["name"], seen["state"]) == ("node-a", "active")
        assert [j["job"] for j in seen["jobs"]] == [smoke().id]
        os.kill(stopped.pid, signal.SIGSTOP)
        remote_wait("the server to mark node-a lost", lambda: node("node-a").state == "lost")
        assert (smoke().status, smoke().attempts, smoke().node_id) == (
            "queued", 1, node("node-a").id)
        other = worker_process(server.url, token, tmp_path / "node-b", "--until-idle",
                               "--node-name", "node-b")
        output_b, _ = other.communicate(timeout=600)
        assert other.returncode == 0, output_b
        assert submission_status(world, submission_id) == "succeeded", output_b
    finally:
        os.kill(stopped.pid, signal.SIGCONT)
    try:
        output_a, _ = stopped.communicate(timeout=300)
    finally:
        server.stop()
        for process in (stopped, other):
            if process is not None and process.poll() is None:
                process.kill()
    assert "was taken back" in output_a, output_a  # a 409: its container stopped
    assert node("node-a").state == "active"  # heard from again
    with world.sessions() as session:
        history = [(e.from_state, e.to_state) for e in session.scalars(
            select(EventRow).where(EventRow.entity == "node",
                                   EventRow.entity_id == node("node-a").id)
            .order_by(EventRow.id))]
        assert history == [(None, "active"), ("active", "lost"), ("lost", "active")]
        job = session.scalars(select(JobRow).where(JobRow.kind == "smoke")).one()
        assert (job.status, job.attempts, job.node_id) == ("succeeded", 2, node("node-b").id)
        rows = session.scalars(select(CaseResultRow).where(
            CaseResultRow.submission_id == submission_id)).all()
        assert sorted(r.case_id for r in rows) == ["case-001", "case-002"]  # one per case


# -- `epreuve nodes` ------------------------------------------------------------------------


def test_epreuve_nodes_reads_the_server_or_the_local_database(live, tmp_path):
    from tests.test_cli_client import Cli

    with client(live, live.world.tokens["worker"]) as worker:
        worker.post(f"{API}/nodes/register", json=GOOD).raise_for_status()
    organiser = Cli(tmp_path, EPREUVE_SERVER=live.url,
                    EPREUVE_TOKEN=live.world.tokens["organiser-a"])
    listed = json.loads(organiser("nodes", "--json").stdout)
    assert "gpu-node-01" in {node["name"] for node in listed}
    table = organiser("nodes").stdout
    assert "gpu-node-01" in table and "NVIDIA H200" in table and "active" in table
    participant = Cli(tmp_path, EPREUVE_SERVER=live.url,
                      EPREUVE_TOKEN=live.world.tokens["participant-a"])
    refused = participant("nodes", code=EXIT_REFUSED)
    assert "may not make this call" in refused.stdout + refused.stderr
    local = Cli(tmp_path, EPREUVE_DATABASE_URL=live.world.settings.database_url)
    assert "gpu-node-01" in {node["name"] for node in json.loads(local("nodes", "--json").stdout)}


def test_a_lost_nodes_job_being_scored_is_left_to_the_server(tmp_path):
    """Scoring happens on the server: losing the node that ran the job changes nothing."""
    from engine import queue

    world = build_world(tmp_path, "sqlite")
    scored, running = (queued_submission(world, "ch-a", "team-a"),
                       queued_submission(world, "ch-b", "team-c"))
    with world.sessions() as session:
        node = nodes.register(session, validated(GOOD), None, "test")
        jobs = {}
        for owner in ("owner-1", "owner-2"):  # fair share picks the order: map by submission
            job = queue.lease(session, owner)
            nodes.assign(session, job.id, node.id)
            jobs[job.submission_id] = job
        assert set(jobs) == {scored, running}
        queue.transition(session, jobs[scored], "scoring", jobs[scored].lease_owner)
        node.last_heartbeat -= timedelta(minutes=10)
        moved = nodes.sweep_lost(session, timedelta(minutes=3), "test sweeper")
        session.commit()
        assert moved == [jobs[running].id]
        assert session.get(NodeRow, node.id).state == "lost"
        assert session.get(JobRow, jobs[scored].id).status == "scoring"
        assert session.get(JobRow, jobs[running].id).status == "queued"


def test_a_job_leased_again_is_not_its_old_nodes(tmp_path):
    """Swept from node A and claimed by a worker naming no node, a job no longer points at
    A: losing A later must not take it back from where it runs now."""
    from engine import queue

    world = build_world(tmp_path, "sqlite")
    queued_submission(world, "ch-a", "team-a")
    with world.sessions() as session:
        node = nodes.register(session, validated(GOOD), None, "test")
        job = queue.lease(session, "owner-on-a")
        nodes.assign(session, job.id, node.id)
        session.commit()
        queue.sweep(session, "test", owner_dead=lambda owner: owner == "owner-on-a")
        session.commit()
        again = queue.lease(session, "owner-elsewhere")
        session.commit()
        assert again.id == job.id and again.node_id is None
        node.last_heartbeat -= timedelta(minutes=10)
        assert nodes.sweep_lost(session, timedelta(minutes=3), "test sweeper") == []
        session.commit()
        assert session.get(JobRow, job.id).status == "leased"


# -- retiring a node gone for good ----------------------------------------------------------


def _heartbeat_series(world) -> set[str]:
    from engine.db.models import utcnow
    from engine.metrics import node_families

    with world.sessions() as session:
        _, _, age = node_families(session, utcnow())
    return {sample.labels["node"] for sample in age.samples}


def test_an_admin_retires_a_node_and_it_leaves_the_list_and_the_alert(live):
    with client(live, live.world.tokens["worker"]) as worker:
        node_id = worker.post(f"{API}/nodes/register",
                              json={**GOOD, "name": "decommissioned-07"}).json()["node_id"]
    assert "decommissioned-07" in _heartbeat_series(live.world)
    with client(live, live.world.tokens["organiser-a"]) as organiser:
        refused = organiser.post(f"/api/v1/nodes/{node_id}/retire")
        assert refused.status_code == 403  # nodes are shared: an admin's call
    with client(live, live.world.tokens["admin"]) as admin:
        retired = admin.post(f"/api/v1/nodes/{node_id}/retire")
        assert retired.status_code == 200, retired.text
        assert (retired.json()["name"], retired.json()["state"]) == ("decommissioned-07",
                                                                      "retired")
        assert admin.post(f"/api/v1/nodes/{node_id}/retire").status_code == 200  # idempotent
        listed = {n["name"] for n in admin.get("/api/v1/nodes").json()["items"]}
        assert "decommissioned-07" not in listed
        everything = admin.get("/api/v1/nodes", params={"retired": "true"}).json()["items"]
        assert {"decommissioned-07": "retired"}.items() <= {
            n["name"]: n["state"] for n in everything}.items()
        missing = admin.post("/api/v1/nodes/999999/retire")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "NotFound"
    assert "decommissioned-07" not in _heartbeat_series(live.world)  # the alert clears

    with client(live, live.world.tokens["worker"]) as worker:  # the machine came back after all
        worker.post(f"{API}/nodes/register",
                    json={**GOOD, "name": "decommissioned-07"}).raise_for_status()
    with live.world.sessions() as session:
        assert session.get(NodeRow, node_id).state == "active"
        history = [(e.from_state, e.to_state) for e in session.scalars(
            select(EventRow).where(EventRow.entity == "node", EventRow.entity_id == node_id)
            .order_by(EventRow.id))]
    assert history == [(None, "active"), ("active", "retired"), ("retired", "active")]


def test_the_cli_retires_through_the_server_whichever_side_of_retire_its_options_are(
        live, tmp_path):
    from tests.test_cli_client import Cli

    with client(live, live.world.tokens["worker"]) as worker:
        ids = [worker.post(f"{API}/nodes/register", json={**GOOD, "name": name}).json()[
            "node_id"] for name in ("old-rack-1", "old-rack-2")]
    cli = Cli(tmp_path)  # no server in the environment: only the options name it
    admin = ("--server", live.url, "--token", live.world.tokens["admin"])
    assert "old-rack-1" in cli("nodes", *admin, "retire", str(ids[0])).stdout
    assert "old-rack-2" in cli("nodes", "retire", str(ids[1]), *admin).stdout
    with live.world.sessions() as session:
        assert {session.get(NodeRow, i).state for i in ids} == {"retired"}
    usage = cli("nodes", "--json", *admin, "retire", str(ids[0]), code=2)
    assert "without a subcommand" in usage.stdout + usage.stderr


def test_a_name_whose_newest_row_is_retired_has_no_heartbeat_series(tmp_path):
    """The same machine registered under an older token long ago (lost) and a newer one
    (retired): retiring the newer must not bring the older row's alert back."""
    world = build_world(tmp_path, "sqlite")
    with world.sessions() as session:
        _, old_token = create_token(session, role="worker")
        _, new_token = create_token(session, role="worker")
        session.commit()
    rows = []
    for token in (old_token, new_token):
        with world.sessions() as session:
            token_id = session.scalar(select(TokenRow.id).where(
                TokenRow.hash == hash_secret(token)))
            rows.append(nodes.register(session, validated({**GOOD, "name": "twice"}),
                                       token_id, "test").id)
            session.commit()
    with world.sessions() as session:
        session.get(NodeRow, rows[0]).state = "lost"
        nodes.retire(session, rows[1], "test")
        session.commit()
    assert "twice" not in _heartbeat_series(world)


def test_a_node_running_a_job_is_not_retired(tmp_path):
    """Retiring is for a machine gone for good: while its job is in hand the call is
    refused, naming the job, and nothing changes (the CLI's local path)."""
    from engine import queue
    from engine.node_description import validated
    from tests.test_cli_client import Cli

    world = build_world(tmp_path, "sqlite")
    queued_submission(world, "ch-a", "team-a")
    with world.sessions() as session:
        node = nodes.register(session, validated(GOOD), None, "test")
        job = queue.lease(session, "node-a", queue.DEFAULT_LEASE)
        nodes.assign(session, job.id, node.id)
        session.commit()
        node_id, job_id = node.id, job.id
    local = Cli(tmp_path, EPREUVE_DATABASE_URL=world.settings.database_url)
    refused = local("nodes", "retire", str(node_id), code=EXIT_REFUSED)
    assert f"runs job(s) {job_id}" in refused.stdout + refused.stderr
    assert "Traceback" not in refused.stdout + refused.stderr
    with world.sessions() as session:
        assert session.get(NodeRow, node_id).state == "active"
        queue.sweep(session, "test", now=session.get(JobRow, job_id).lease_expires_at
                    + timedelta(seconds=1))  # its worker is gone: the job goes back
        session.commit()
    assert "retired" in local("nodes", "retire", str(node_id)).stdout
    assert "gpu-node-01" not in local("nodes").stdout
    assert "gpu-node-01" in local("nodes", "--retired").stdout
