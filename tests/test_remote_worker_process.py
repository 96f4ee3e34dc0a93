"""Remote workers as real processes: a server on loopback (uvicorn on create_app, real
PostgreSQL), and `epreuve worker --server URL --token T` processes that have only a data
dir of their own. Real Docker, a real image, real scoring on the server's side.

- A submission runs on the remote worker and reaches the leaderboard; afterwards the
  worker's data dir holds no ground-truth file (walked, every file hashed).
- A worker SIGSTOPped past its lease: the job is re-queued on the server's clock and run
  by another worker; after SIGCONT its late reports are refused (409) and there is
  exactly one result per case.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from engine.api.app import ApiOptions
from engine.api.ratelimit import Rate
from engine.db.models import CaseResultRow, JobRow, SubmissionRow
from engine.leaderboard import leaderboard
from engine.store import open_store
from engine.submissions import register_challenge, submit
from engine.tokens import create_token
from tests.api_fixtures import World, start_server
from tests.conftest import REPO, postgres_sessions
from tests.engine_fixtures import make_scene, pin

pytestmark = pytest.mark.docker
SLOW_TAG = "epreuve-test/remote-slow:latest"


def server_world(root: Path, image: str, *, validation_cases: int = 3):
    postgres_sessions()  # a clean schema (or a skip without PostgreSQL)
    scene = make_scene(root, validation_cases=validation_cases,
                       database_url=os.environ["EPREUVE_TEST_POSTGRES_URL"])
    (root / "images").mkdir(parents=True)
    pinned = pin(image, root / "images", store=open_store(scene.settings.store_dir))
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        submission_id = submit(session, "test-liver", "validation", "remote-team", pinned).id
        _, token = create_token(session, role="worker")
        session.commit()
    return World(root, scene.settings, scene.sessions), submission_id, token


def worker_process(url: str, token: str, data_dir: Path, *args: str) -> subprocess.Popen:
    """`epreuve worker --server` with nothing but its own data dir: no database URL."""
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "HOME": str(data_dir),
           "EPREUVE_DATA_DIR": str(data_dir)}
    data_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "worker", "--server", url, "--token", token,
         "--poll-seconds", "1", "--heartbeat-seconds", "0.5", *args],
        env=env, cwd=data_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(what: str, check, timeout: float = 180.0):
    """Poll until `check()` is truthy (a deadline against hanging, not a timed assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"gave up waiting for {what}")


def submission_status(world: World, submission_id: int) -> str:
    with world.sessions() as session:
        return session.get(SubmissionRow, submission_id).status


def ground_truth_hashes(root: Path) -> set[str]:
    return {hashlib.sha256(path.read_bytes()).hexdigest()
            for path in (root / "data").rglob("ground_truth/**/*") if path.is_file()}


def test_a_remote_worker_runs_a_submission_to_the_leaderboard_and_keeps_no_ground_truth(
        tmp_path):
    world, submission_id, token = server_world(tmp_path / "server",
                                               "epreuve-example/threshold:latest")
    server = start_server(world, ApiOptions(rate=Rate(burst=10_000, per_second=1000.0)))
    node = tmp_path / "node"
    try:
        worker = worker_process(server.url, token, node, "--until-idle")
        output, _ = worker.communicate(timeout=600)
        assert worker.returncode == 0, output
    finally:
        server.stop()
    assert "after 3 job(s)" in output, output  # the smoke case, then two shards of one

    with world.sessions() as session:
        submission = session.get(SubmissionRow, submission_id)
        assert (submission.status, submission.reason) == ("succeeded", None), submission.message
        rows = session.scalars(select(CaseResultRow).where(
            CaseResultRow.submission_id == submission_id)).all()
        assert sorted((r.case_id, r.valid) for r in rows) == [
            ("case-001", True), ("case-002", True), ("case-003", True)]
        assert all(0.0 < r.metrics["dice[1]"] <= 1.0 for r in rows)
        (entry,) = leaderboard(session, "test-liver", "validation")
        assert entry.team == "remote-team"
        # each job's log came to the server while it ran (POST .../logs, engine/live_logs.py)
        from engine import live_logs

        for job in submission.jobs:
            live = live_logs.tail(world.settings.state_dir, job.id, job.attempts)
            assert f"{job.case_ids[0]}:" in live, (job.id, live)

    secrets = ground_truth_hashes(tmp_path / "server")
    assert len(secrets) == 7  # validation (3 cases) and final (4): any would be a leak
    node_files = [p for p in node.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any("inputs-cache" in p.parts for p in node_files)  # the inputs did come here
    for path in node_files:
        assert "ground_truth" not in path.parts, path
        assert hashlib.sha256(path.read_bytes()).hexdigest() not in secrets, path
    assert not (node / "outputs").exists() or not any((node / "outputs").rglob("*.nii.gz"))



def test_an_until_idle_worker_is_not_idle_while_its_runs_are_being_scored(tmp_path,
                                                                         monkeypatch):
    """The server answers a completion before scoring it, and the main jobs are queued only
    once the smoke job is scored. With scoring slower than a claim's wait, the node must
    not stop after the smoke job: each empty claim tells it how many of its runs are
    still being scored."""
    from engine.worker import scorer

    score_job = scorer.score_job

    def slow_score_job(*args, **kwargs):
        time.sleep(4)  # longer than the worker's claim waits (--poll-seconds 1)
        return score_job(*args, **kwargs)

    monkeypatch.setattr(scorer, "score_job", slow_score_job)  # the server's scorer thread
    world, submission_id, token = server_world(tmp_path / "server",
                                               "epreuve-example/threshold:latest")
    server = start_server(world, ApiOptions(rate=Rate(burst=10_000, per_second=1000.0)))
    try:
        worker = worker_process(server.url, token, tmp_path / "node", "--until-idle")
        output, _ = worker.communicate(timeout=600)
        assert worker.returncode == 0, output
        wait_for("the last run scored",
                 lambda: submission_status(world, submission_id) == "succeeded", 60)
    finally:
        server.stop()
    assert "after 3 job(s)" in output, output  # the smoke job, then both shards

@pytest.fixture
def slow_image(tmp_path):
    """The threshold segmenter after a pause: long enough to outlive a short lease."""
    context = tmp_path / "slow-image"
    context.mkdir()
    (context / "Dockerfile").write_text(
        "FROM epreuve-example/threshold:latest\n"
        'ENTRYPOINT ["sh", "-c", "sleep 6; exec python3 /opt/algorithm/segment.py"]\n')
    subprocess.run(["docker", "build", "-q", "--network", "none", "-t", SLOW_TAG, str(context)],
                   check=True, capture_output=True,
                   env={"DOCKER_BUILDKIT": "0", "PATH": "/usr/bin:/usr/local/bin:/bin"})
    return SLOW_TAG


def test_a_stopped_worker_loses_its_job_to_another_and_its_late_reports_are_refused(
        tmp_path, slow_image):
    world, submission_id, token = server_world(tmp_path / "server", slow_image,
                                               validation_cases=2)
    server = start_server(world, ApiOptions(rate=Rate(burst=10_000, per_second=1000.0),
                                            worker_lease=timedelta(seconds=3),
                                            sweep_seconds=0.5))
    stopped = worker_process(server.url, token, tmp_path / "node-a", "--max-jobs", "1")
    other = None
    try:
        def smoke() -> JobRow:
            with world.sessions() as session:
                return session.scalars(select(JobRow).where(JobRow.kind == "smoke")).one()

        wait_for("the first worker to run the smoke job", lambda: smoke().status == "running")
        os.kill(stopped.pid, signal.SIGSTOP)
        wait_for("the server to take the job back",
                 lambda: smoke().status == "queued" and smoke().attempts == 1)
        other = worker_process(server.url, token, tmp_path / "node-b", "--until-idle")
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
    assert "was taken back" in output_a, output_a  # a 409 stopped it: no second result

    with world.sessions() as session:
        job = session.scalars(select(JobRow).where(JobRow.kind == "smoke")).one()
        assert (job.status, job.attempts) == ("succeeded", 2)
        rows = session.scalars(select(CaseResultRow).where(
            CaseResultRow.submission_id == submission_id)).all()
        assert sorted(r.case_id for r in rows) == ["case-001", "case-002"]  # one per case
    refused = [line for line in _metrics(server).splitlines()
               if line.startswith("epreuve_http_requests_total") and 'status="409"' in line]
    assert refused, "the late worker's reports were never refused"


def _metrics(server) -> str:
    from prometheus_client import generate_latest

    return generate_latest(server.server.config.app.state.metrics_registry).decode()


def test_a_node_without_the_image_fetches_it_by_digest_verifies_it_and_loads_it_once(tmp_path):
    """The node's daemon lacks the pinned image (an image of this test's own, removed from
    the daemon after intake): the agent fetches the archive from the server by digest into
    its image cache, the daemon loads it, and a second job loads nothing."""
    import uuid

    from engine.evaluation import SandboxLimits
    from engine.worker.http import HttpCoordinator, RemoteAgent
    from engine.worker.protocol import JobTicket
    from runners import make_runner
    from tests.engine_fixtures import sqlite_settings

    marker, image_id = uuid.uuid4().hex[:12], None
    tag = f"epreuve-test/remote-fetch:{marker}"
    context = tmp_path / "fetch-image"
    context.mkdir()
    (context / "Dockerfile").write_text(
        f"FROM epreuve-example/threshold:latest\nLABEL org.epreuve.test=remote-{marker}\n")
    subprocess.run(["docker", "build", "-q", "--network", "none", "-t", tag, str(context)],
                   check=True, capture_output=True,
                   env={"DOCKER_BUILDKIT": "0", "PATH": "/usr/bin:/usr/local/bin:/bin"})
    try:
        world, _, token = server_world(tmp_path / "server", tag)
        with world.sessions() as session:
            from engine.db.models import ImageRow

            image = session.scalars(select(ImageRow)).one()
            image_id, digest = image.image_id, image.archive_sha256
        subprocess.run(["docker", "rmi", "-f", image_id], check=True, capture_output=True)
        server = start_server(world, ApiOptions(rate=Rate(burst=10_000, per_second=1000.0)))
        node = sqlite_settings(tmp_path / "node")
        runner = make_runner("docker", state_dir=node.state_dir / "runs")
        agent = RemoteAgent(HttpCoordinator(server.url, token), runner, node, gpus=[])
        ticket = JobTicket(job_id=1, attempt=1, kind="main", submission_id=1, case_ids=(),
                           image_id=image_id, image_user=None, image_archive_sha256=digest,
                           limits=SandboxLimits(1, 1, 1, 1, 1, 1, 1), gpus=0,
                           dataset_path="", dataset_version="")
        try:
            assert not runner.has_image(image_id)
            agent.prepare_image(ticket)
            assert runner.has_image(image_id)
            assert agent.store.has(digest) and agent.store.verify(digest)  # the node's cache
            agent.prepare_image(ticket)  # already there: nothing fetched or loaded again
            assert [d for d in agent.store.digests()] == [digest]
        finally:
            server.stop()
    finally:
        # only this test's own image: by its tag, and by its id once loaded again untagged
        for name in (tag, image_id):
            if name:
                subprocess.run(["docker", "rmi", "-f", name], capture_output=True)


def serve_process(world: World, port: int) -> subprocess.Popen:
    """`epreuve serve` on the scene's database and data dir, as its own process."""
    settings = world.settings
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO),
           "EPREUVE_DATA_DIR": str(settings.data_dir), "EPREUVE_STATE_DIR": str(settings.state_dir),
           "EPREUVE_DATABASE_URL": settings.database_url}
    process = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--port", str(port)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def answers() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_for("the server to answer", answers, timeout=60)
    return process


def test_a_server_killed_and_restarted_mid_job_loses_nothing(tmp_path, slow_image):
    """SIGKILL `epreuve serve` while the worker's container runs; start it again on the same
    port. The worker keeps the container running and retries its reports: the submission
    ends with one result per case."""
    world, submission_id, token = server_world(tmp_path / "server", slow_image,
                                               validation_cases=2)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = serve_process(world, port)
    worker = worker_process(f"http://127.0.0.1:{port}", token, tmp_path / "node", "--until-idle")
    try:
        def smoke_status() -> str:
            with world.sessions() as session:
                return session.scalars(select(JobRow.status).where(JobRow.kind == "smoke")).one()

        wait_for("the smoke job to run", lambda: smoke_status() == "running")
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
        server = serve_process(world, port)
        output, _ = worker.communicate(timeout=600)
        assert worker.returncode == 0, output
    finally:
        for process in (server, worker):
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
    assert "again in" in output, output  # a report met the dead server and was retried
    assert submission_status(world, submission_id) == "succeeded", output
    with world.sessions() as session:
        smoke = session.scalars(select(JobRow).where(JobRow.kind == "smoke")).one()
        assert smoke.attempts == 1  # the same attempt finished: nothing was run twice
        rows = session.scalars(select(CaseResultRow).where(
            CaseResultRow.submission_id == submission_id)).all()
        assert sorted(r.case_id for r in rows) == ["case-001", "case-002"]
