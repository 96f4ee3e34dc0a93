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

import glob
import io
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select, update

from benchmarks.harness import free_port
from engine.api.app import ApiOptions
from engine.api.ratelimit import Rate
from engine.db.models import CaseResultRow, EventRow, JobRow, SubmissionRow
from runners.docker import LABEL_MANAGED, LABEL_OWNER, owner_token
from tests.api_fixtures import World, start_server
from tests.conftest import REPO
from tests.test_remote_worker_process import serve_process, server_world, wait_for
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


# -- PostgreSQL restarted under the server ----------------------------------------------------


class PrivateCluster:
    """A PostgreSQL cluster of the test's own (initdb in a temp dir, a free port), run as the
    `postgres` user as scripts/start-postgres does: stopping it disturbs no one else."""

    def __init__(self, root: Path):
        self.root, self.data = root, root / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://epreuve@127.0.0.1:{self.port}/epreuve_test"

    def create(self) -> None:
        if subprocess.run(["id", "postgres"], capture_output=True).returncode != 0:
            subprocess.run(["useradd", "--system", "--no-create-home", "postgres"], check=True)
        subprocess.run(["chown", "postgres", str(self.root)], check=True)
        self._as_owner(_pg_bin("initdb"), "-D", str(self.data), "-U", "epreuve",
                       "--auth=trust")
        self.start()
        self._as_owner(_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
                       "epreuve", "epreuve_test")

    def start(self) -> None:
        self._pg_ctl("-l", str(self.root / "server.log"), "-w", "-t", "60", "-o",
                     f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                     "-c fsync=off", "start")

    def stop(self) -> None:
        self._pg_ctl("-w", "-t", "60", "-m", "fast", "stop")

    def restart(self) -> None:
        self._pg_ctl("-l", str(self.root / "server.log"), "-w", "-t", "60", "-m", "fast",
                     "restart")

    def close(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(["runuser", "-u", "postgres", "--", _pg_bin("pg_ctl"), "-D",
                            str(self.data), "-m", "immediate", "-w", "stop"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _pg_ctl(self, *args: str) -> None:
        self._as_owner(_pg_bin("pg_ctl"), "-D", str(self.data), *args)

    def _as_owner(self, *command: str) -> None:
        """Its output to a file, never a pipe: a server it starts would hold the pipe open."""
        with open(self.root / "commands.log", "ab") as log:
            done = subprocess.run(["runuser", "-u", "postgres", "--", *command], cwd=self.root,
                                  stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise RuntimeError((self.root / "commands.log").read_text()[-2000:])


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or max(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                                      default=None)
    if found is None:
        pytest.fail(f"no PostgreSQL server binary {name}: scripts/start-postgres installs them")
    return found


@pytest.fixture
def private_cluster(monkeypatch) -> Iterator[PrivateCluster]:
    root = Path(f"/tmp/epreuve-pg-{uuid.uuid4().hex[:8]}")  # the postgres user must reach it
    root.mkdir(mode=0o700)
    cluster = PrivateCluster(root)
    try:
        cluster.create()
        monkeypatch.setenv("EPREUVE_TEST_POSTGRES_URL", cluster.url)  # server_world's database
        yield cluster
    finally:
        cluster.close()
        shutil.rmtree(root, ignore_errors=True)


def health(url: str) -> int:
    try:
        return httpx.get(f"{url}/healthz", timeout=10).status_code
    except httpx.TransportError:
        return 0


def reports_retried(worker: NodeWorker, what: str) -> bool:
    """The worker's log says a report of that kind met a 503 and was sent again."""
    return any(what in line and "HTTP 503" in line and "again in" in line
               for line in worker.output.splitlines())


def test_postgresql_restarted_under_the_server_loses_nothing(tmp_path, slow_image,
                                                             private_cluster):
    world, submission_id, token = server_world(tmp_path / "server", slow_image,
                                               validation_cases=2)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = serve_process(world, port)
    worker = NodeWorker(url, token, tmp_path / "node")
    owner = {"label": f"{LABEL_OWNER}={owner_token(worker.process.pid)}"}
    try:
        wait_for("the smoke job's container", lambda: ours_running(owner), timeout=600)
        private_cluster.stop()  # down while the container runs, and while the worker reports
        assert health(url) == 503
        wait_for("the worker's completion to meet the database down",
                 lambda: reports_retried(worker, "/outputs/")
                 or reports_retried(worker, "/complete"), timeout=300)
        assert health(url) == 503
        private_cluster.start()
        wait_for("the server to answer again, not restarted", lambda: health(url) == 200)
        wait_for("a main job's container", lambda: ours_running(owner)
                 and smoke_job(world).status == "succeeded", timeout=600)
        private_cluster.restart()  # and restarted while the next container runs
        wait_for("the submission to end", lambda: ended(world, submission_id), timeout=600)
        assert server.poll() is None  # the same server process throughout
        assert worker.process.poll() is None, worker.output
    finally:
        status = worker.stop()
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=60)
    output = worker.output
    assert status == 0, output
    submission = submission_of(world, submission_id)
    assert (submission.status, submission.reason) == ("succeeded", None), (
        submission.message, output)
    assert case_results(world, submission_id) == ["case-001", "case-002"]  # one per case
    with world.sessions() as session:
        jobs = session.scalars(select(JobRow)).all()
        assert [(j.status, j.attempts) for j in jobs] == [("succeeded", 1)] * len(jobs), output


def ours_running(owner_filter: dict[str, str]) -> bool:
    """A container of that worker runs (it is started, not only created)."""
    import docker

    client = docker.APIClient()
    try:
        return bool(client.containers(filters={**owner_filter, "status": "running"}))
    finally:
        client.close()


# -- the disk of the node's image cache too small ---------------------------------------------


@pytest.fixture
def own_image(tmp_path) -> Iterator[str]:
    """An image of this test's own (a label makes its id unique): the test may remove it
    from the daemon, so that the node must fetch it from the server."""
    marker = uuid.uuid4().hex[:12]
    tag = f"epreuve-test/node-faults-disk:{marker}"
    context = tmp_path / "disk-image"
    context.mkdir()
    (context / "Dockerfile").write_text(
        f"FROM epreuve-example/threshold:latest\nLABEL org.epreuve.test=node-faults-{marker}\n")
    subprocess.run(["docker", "build", "-q", "--network", "none", "-t", tag, str(context)],
                   check=True, capture_output=True,
                   env={"DOCKER_BUILDKIT": "0", "PATH": "/usr/bin:/usr/local/bin:/bin"})
    image_id = subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", tag],
                              check=True, capture_output=True, text=True).stdout.strip()
    yield tag
    for name in (tag, image_id):  # by its tag, and by its id once loaded again untagged
        subprocess.run(["docker", "rmi", "-f", name], capture_output=True)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A tmpfs mount point; the test mounts it (its size), the fixture always unmounts."""
    point = tmp_path / "node" / "image-cache"
    point.mkdir(parents=True)
    yield point
    while point.is_mount():
        subprocess.run(["umount", "-l", str(point)], check=False)


def mount_tmpfs(point: Path, size: int, *, remount: bool = False) -> None:
    options = f"{'remount,' if remount else ''}size={size}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], check=True)


def test_an_image_cache_too_small_is_the_platforms_failure_and_recovers_once_freed(
        tmp_path, own_image, small_disk):
    from engine.db.models import ImageRow
    from engine.store import DirectoryStore

    world, submission_id, token = server_world(tmp_path / "server", own_image,
                                               validation_cases=2)
    with world.sessions() as session:
        image = session.scalars(select(ImageRow)).one()
        image_id, digest = image.image_id, image.archive_sha256
        session.execute(update(JobRow).values(max_attempts=10))  # no race with the freeing
        session.commit()
    archive_size = (world.settings.store_dir / "sha256" / digest[:2] / digest).stat().st_size
    subprocess.run(["docker", "rmi", "-f", image_id], check=True, capture_output=True)

    # half the archive's size, holding an older archive that the cache may evict
    mount_tmpfs(small_disk, archive_size // 2)
    cache = DirectoryStore(small_disk)
    old = cache.put(io.BytesIO(os.urandom(8 << 20)))
    os.utime(cache.path(old.sha256), (1, 1))
    server = start_server(world, FAST_API)
    worker = NodeWorker(server.url, token, tmp_path / "node")
    try:
        smoke = wait_for("the smoke job's first attempt to fail on the node",
                         lambda: retries_of(world, smoke_job(world).id) and smoke_job(world),
                         timeout=600)
        detail = smoke.run_result["infrastructure_detail"]
        assert "CacheDiskFull" in detail and str(small_disk) in detail, detail
        assert f"sha256:{digest}" in detail and "MiB" in detail, detail  # the need, in size
        assert "not caused by your submission" in retries_of(world, smoke.id)[0]
        assert not cache.has(old.sha256)  # evicted first: it was not enough
        assert not cache.has(digest)  # nothing partial passes as the archive
        assert not any(cache.incoming.iterdir())
        assert worker.process.poll() is None, worker.output

        mount_tmpfs(small_disk, archive_size + (64 << 20), remount=True)  # space freed
        wait_for("the submission to end", lambda: ended(world, submission_id), timeout=600)
        assert worker.process.poll() is None, worker.output
    finally:
        status = worker.stop()
        server.stop()
    output = worker.output
    assert status == 0, output
    submission = submission_of(world, submission_id)
    assert (submission.status, submission.reason) == ("succeeded", None), (
        submission.message, output)
    assert case_results(world, submission_id) == ["case-001", "case-002"]
    assert cache.has(digest) and cache.verify(digest)


# -- a container filling the node's disk with outputs -----------------------------------------


@pytest.fixture
def node_disk(tmp_path) -> Iterator[Path]:
    """The node's data disk: a 96 MiB tmpfs, always unmounted."""
    point = tmp_path / "node-disk"
    point.mkdir()
    mount_tmpfs(point, 96 << 20)
    yield point
    while point.is_mount():
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_container_writing_without_end_never_fills_the_nodes_disk(docker_engine, node_disk):
    """The output quota is a tmpfs of its own: writes past it fail inside the container, the
    run ends OUTPUT_QUOTA (the team's limit), and the node's disk, holding the runner's state
    and the collected outputs, never holds more than the quota; the next run goes on."""
    from runners.base import FailureReason, RunSpec
    from runners.docker import DockerRunner

    quota = 8 << 20
    runner = DockerRunner(state_dir=node_disk / "state" / "runs")
    inputs = node_disk / "input"
    inputs.mkdir()
    spec = RunSpec(image="epreuve/base:3.11", input_dir=inputs,
                   output_dir=node_disk / "outputs" / "job-1", output_quota_bytes=quota,
                   timeout_seconds=120, labels={"org.epreuve.test": "node-faults-disk"},
                   command=("sh", "-c", "mkdir -p /output/case-001; i=0; while true; do "
                            "head -c 1048576 /dev/zero > /output/case-001/part-$i || true; "
                            "i=$((i+1)); done"))
    result = runner.run(spec)
    assert result.reason is FailureReason.OUTPUT_QUOTA, result.message
    used = shutil.disk_usage(node_disk).used
    assert used <= quota, used  # at most what the quota allows was ever collected here
    after = runner.run(RunSpec(image="epreuve/base:3.11", command=("true",)))
    assert after.succeeded, after.message
