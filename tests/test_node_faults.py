"""Faults of a remote node's surroundings, with real processes: a server on loopback (real
PostgreSQL), `epreuve worker --server` processes with only a data dir of their own, real
containers. What fails under them is the platform's, never the team's:

- the node's Docker daemon (a private dockerd of the test's own) restarted mid-run, with and
  without --live-restore;
- PostgreSQL (a private cluster of the test's own) stopped and restarted under the server
  while the container runs and while the worker reports its completion;
- the disk of the node's image cache (a small tmpfs) too small for the image's archive.

Each ends with exactly one result per case and a worker that runs the next job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from engine.api.app import ApiOptions
from engine.api.ratelimit import Rate
from engine.db.models import CaseResultRow, EventRow, JobRow, SubmissionRow
from runners.docker import LABEL_MANAGED
from tests.api_fixtures import World, start_server
from tests.conftest import REPO
from tests.test_remote_worker_process import server_world, wait_for
from tests.test_runner_faults import SecondDaemon, _mounts_under

pytestmark = pytest.mark.docker
FAST_API = ApiOptions(rate=Rate(burst=10_000, per_second=1000.0))


def build_image(tmp_path: Path, name: str, entrypoint: str) -> str:
    """The threshold segmenter behind a shell prologue, under a tag of this test's own."""
    tag = f"epreuve-test/node-faults-{name}:{uuid.uuid4().hex[:8]}"
    context = tmp_path / f"image-{name}"
    context.mkdir()
    (context / "Dockerfile").write_text(
        "FROM epreuve-example/threshold:latest\n"
        f'ENTRYPOINT ["sh", "-c", "{entrypoint}; exec python3 /opt/algorithm/segment.py"]\n')
    subprocess.run(["docker", "build", "-q", "--network", "none", "-t", tag, str(context)],
                   check=True, capture_output=True,
                   env={"DOCKER_BUILDKIT": "0", "PATH": "/usr/bin:/usr/local/bin:/bin"})
    return tag


@pytest.fixture
def slow_image(tmp_path) -> Iterator[str]:
    """Long enough to restart a daemon or a database under the running container."""
    tag = build_image(tmp_path, "slow", "sleep 12")
    yield tag
    subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)


class NodeWorker:
    """`epreuve worker --server URL --token T` with its own data dir; its log in a file, read
    while it runs."""

    def __init__(self, url: str, token: str, data_dir: Path, *args: str,
                 env: dict[str, str] | None = None):
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        base = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "HOME": str(data_dir),
                "EPREUVE_DATA_DIR": str(data_dir)}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "engine.cli", "worker", "--server", url, "--token",
                 token, "--poll-seconds", "1", "--heartbeat-seconds", "0.5", *args],
                env={**base, **(env or {})}, cwd=data_dir, stdout=log,
                stderr=subprocess.STDOUT)

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM (the worker ends after its job) and its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        return self.process.returncode


def submission_of(world: World, submission_id: int) -> SubmissionRow:
    with world.sessions() as session:
        return session.get(SubmissionRow, submission_id)


def ended(world: World, submission_id: int) -> bool:
    return submission_of(world, submission_id).status in ("succeeded", "failed", "cancelled")


def smoke_job(world: World) -> JobRow:
    with world.sessions() as session:
        return session.scalars(select(JobRow).where(JobRow.kind == "smoke")).one()


def case_results(world: World, submission_id: int) -> list[str]:
    with world.sessions() as session:
        return sorted(session.scalars(select(CaseResultRow.case_id).where(
            CaseResultRow.submission_id == submission_id)).all())


def retries_of(world: World, job_id: int) -> list[str]:
    """The job's INFRASTRUCTURE retries, as the event history says them."""
    with world.sessions() as session:
        details = session.scalars(select(EventRow.detail).where(
            EventRow.entity == "job", EventRow.entity_id == job_id,
            EventRow.to_state == "queued").order_by(EventRow.id)).all()
    return [d for d in details if d and d.startswith("retry:")]


# -- the node's Docker daemon restarted mid-run ---------------------------------------------


@pytest.fixture(params=[False, True], ids=["plain", "live-restore"])
def node_daemon(request, docker_engine) -> Iterator[SecondDaemon]:
    """A dockerd of the test's own, holding no image: the node gets its images by digest."""
    root = Path(f"/tmp/epreuve-nf-{uuid.uuid4().hex[:8]}")  # short: a unix socket path
    root.mkdir(mode=0o700)
    daemon = SecondDaemon(root, *(("--live-restore",) if request.param else ()))
    daemon.live_restore = request.param
    try:
        daemon.start()
        yield daemon
    except (OSError, RuntimeError) as exc:
        pytest.fail(f"a second dockerd cannot start here: {exc}")
    finally:
        daemon.close()
        for mount in sorted(_mounts_under(root), reverse=True):
            subprocess.run(["umount", "-l", mount], check=False)
        subprocess.run(["rm", "-rf", str(root)], check=False)


def node_containers(daemon: SecondDaemon, *, running: bool = False) -> list[str]:
    """The engine's containers on the node's daemon (those running: started, not exited)."""
    which = ["--filter", "status=running"] if running else ["-a"]
    listing = subprocess.run(["docker", "-H", daemon.url, "ps", "-q", *which, "--filter",
                              f"label={LABEL_MANAGED}"], capture_output=True, text=True)
    return listing.stdout.split() if listing.returncode == 0 else []


def test_the_nodes_docker_daemon_restarted_mid_run_loses_nothing_and_blames_no_team(
        tmp_path, slow_image, node_daemon):
    world, submission_id, token = server_world(tmp_path / "server", slow_image,
                                               validation_cases=2)
    server = start_server(world, FAST_API)
    worker = NodeWorker(server.url, token, tmp_path / "node",
                        env={"DOCKER_HOST": node_daemon.url})
    try:
        wait_for("the smoke job's container on the node's daemon",
                 lambda: node_containers(node_daemon, running=True),
                 timeout=600)
        node_daemon.stop(signal.SIGTERM)  # a restart: stop, then start again
        node_daemon.start()
        wait_for("the submission to end", lambda: ended(world, submission_id), timeout=600)
        # the worker survived: it is still running, waiting for the next job
        assert worker.process.poll() is None, worker.output
    finally:
        status = worker.stop()
        server.stop()
    output = worker.output
    assert status == 0, output
    assert "Traceback" not in output, output

    submission = submission_of(world, submission_id)
    assert (submission.status, submission.reason) == ("succeeded", None), (
        submission.message, output)
    assert case_results(world, submission_id) == ["case-001", "case-002"]  # one per case
    smoke = smoke_job(world)
    retries = retries_of(world, smoke.id)
    if node_daemon.live_restore:  # the container outlived its daemon: the same attempt ends
        assert (smoke.attempts, retries) == (1, []), (retries, smoke.run_result, output)
    else:  # the daemon stopped the container: an INFRASTRUCTURE attempt, run again
        assert smoke.attempts == 2, output
        assert len(retries) == 1 and "not caused by your submission" in retries[0], retries
    assert node_containers(node_daemon) == []  # nothing leaked on the node
