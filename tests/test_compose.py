"""The compose stack, exactly as the README's "The stack with docker-compose" runs it: `scripts/
compose up` (images built offline, cached), a dataset synthesised and sealed in the server, the
challenge sent with the admin token, a participant token, `epreuve submit --server` from the
host, and the submission on the leaderboard, run by the compose worker; Prometheus scraped the
server; the worker's disk holds no ground truth; then `down -v`.

The stack has its own compose project name, host ports, data dirs and env file: it never meets
another stack. Images the test built are removed afterwards (a tag it moved is put back); images
that were there before are kept. Slow (minutes; the first build of the service images more).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from engine.statuses import SubmissionStatus
from tests.conftest import REPO, build_image
from tests.upload_server import free_port

pytestmark = pytest.mark.docker

COMPOSE = str(REPO / "scripts" / "compose")
EPREUVE = str(Path(sys.executable).parent / "epreuve")
SERVICE_IMAGES = ("epreuve/epreuve:compose", "epreuve/postgres:15", "epreuve/prometheus:2")
CHALLENGE, PHASE, TEAM = "compose-liver", "validation", "lab-a"
BUILD_SECONDS = 3600   # a fresh machine debootstraps PostgreSQL and Prometheus
WAIT_SECONDS = 600     # a submission's smoke job and main job, on a busy machine
ENDED = {SubmissionStatus.SUCCEEDED, SubmissionStatus.FAILED, SubmissionStatus.CANCELLED}
DEV_ONLY_MODULES = ("pytest", "ruff", "hypothesis", "torch", "monai", "schemathesis",
                    "playwright", "sklearn", "importlinter")


def image_id(tag: str) -> str | None:
    found = subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", tag],
                           capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 else None


def put_images_back(before: dict[str, str | None]) -> None:
    """Remove the service images this test built; a tag that named another image before
    names it again."""
    for tag, old in before.items():
        new = image_id(tag)
        if new is None or new == old:
            continue
        if old is not None:
            subprocess.run(["docker", "tag", old, tag], capture_output=True)
        else:
            subprocess.run(["docker", "image", "rm", tag], capture_output=True)
        subprocess.run(["docker", "image", "rm", new], capture_output=True)


class Stack:
    """One compose project, driven through scripts/compose with its own settings."""

    def __init__(self, root: Path):
        suffix = uuid.uuid4().hex[:8]
        self.root = root
        self.project = f"epreuve-test-{suffix}"
        self.worker_name = f"compose-worker-{suffix}"
        self.server_dir = root / "server"
        self.worker_dir = root / "worker"
        self.http_port = free_port()
        self.prometheus_port = free_port()
        while self.prometheus_port == self.http_port:   # each call binds port 0 afresh
            self.prometheus_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("EPREUVE_", "COMPOSE_")) or k.startswith("EPREUVE_TEST_")}
        env.update(COMPOSE_PROJECT_NAME=self.project, EPREUVE_COMPOSE_ENV=str(root / "env"),
                   EPREUVE_HTTP_PORT=str(self.http_port),
                   EPREUVE_PROMETHEUS_PORT=str(self.prometheus_port),
                   EPREUVE_SERVER_DIR=str(self.server_dir),
                   EPREUVE_WORKER_DIR=str(self.worker_dir),
                   EPREUVE_WORKER_NAME=self.worker_name)
        self.env = env
        self.token = ""   # the participant's, once the organiser made it

    def compose(self, *args: str, timeout: float = WAIT_SECONDS,
                check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([COMPOSE, *args], env=self.env, cwd=REPO, text=True,
                              capture_output=True, timeout=timeout)
        if check:
            assert done.returncode == 0, (args, done.stdout[-3000:], done.stderr[-3000:])
        return done

    def epreuve(self, *args: str) -> str:
        """The CLI client on the host, as a participant runs it."""
        env = {**self.env, "EPREUVE_DATA_DIR": str(self.root / "client"), "COLUMNS": "250",
               "PYTHONPATH": str(REPO)}
        done = subprocess.run([EPREUVE, *args, "--server", self.url, "--token", self.token],
                              env=env, cwd=self.root, text=True, capture_output=True,
                              timeout=WAIT_SECONDS)
        assert done.returncode == 0, (args, done.stdout[-3000:], done.stderr[-3000:])
        assert "Traceback" not in done.stderr
        return done.stdout

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "60", check=False).stdout

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()


@pytest.fixture(scope="module")
def threshold_image(docker_engine) -> str:
    return build_image(REPO / "images/examples/threshold", "epreuve-example/threshold:latest")


@pytest.fixture
def stack(tmp_path, docker_engine):
    before = {tag: image_id(tag) for tag in SERVICE_IMAGES}
    stack = Stack(tmp_path)
    try:
        stack.compose("up", timeout=BUILD_SECONDS)
        yield stack
    finally:
        stack.compose("down", "-v", "--remove-orphans", check=False)
        put_images_back(before)
        # the containers wrote as root and as the participant's user: the test is root here
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_the_compose_files_validate_and_keep_their_secrets_out_of_git(tmp_path):
    no_env_file = tmp_path / "empty.env"   # never a .env this checkout may hold
    no_env_file.write_text("")
    compose = ["docker-compose", "--project-directory", str(REPO), "--env-file",
               str(no_env_file)]
    env = {**os.environ, "EPREUVE_POSTGRES_PASSWORD": "not-a-secret",
           "EPREUVE_WORKER_DIR": str(tmp_path / "worker")}
    for files in (["-f", "docker-compose.yml"],
                  ["-f", "docker-compose.yml", "-f", "docker-compose.gpu.yml"]):
        done = subprocess.run([*compose, *files, "config"], cwd=REPO, env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        services = yaml.safe_load(done.stdout)["services"]
        # the worker's data dir is the same path on both sides of its bind mount
        worker_dir = str(tmp_path / "worker")
        assert f"{worker_dir}:{worker_dir}:rw" in services["worker"]["volumes"]
        # published on loopback only; the database not at all, nor on the worker's network
        published = [port for service in services.values() for port in service.get("ports", [])]
        assert published and all(str(port).startswith("127.0.0.1:") for port in published)
        assert "ports" not in services["postgres"]
        assert "backend" not in services["worker"]["networks"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu", "utility"]}]
    # no password, no default one: without it, compose refuses to start
    unset = {k: v for k, v in os.environ.items() if k != "EPREUVE_POSTGRES_PASSWORD"}
    refused = subprocess.run([*compose, "config"], cwd=REPO, env=unset, capture_output=True,
                             text=True)
    assert refused.returncode != 0 and "EPREUVE_POSTGRES_PASSWORD" in refused.stderr
    ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", ".env"])
    assert ignored.returncode == 0, "the env file with the database password must be ignored"


def test_a_submission_runs_on_the_compose_worker_and_reaches_the_leaderboard(
        stack, threshold_image):
    env_file = Path(stack.env["EPREUVE_COMPOSE_ENV"])
    assert env_file.stat().st_mode & 0o077 == 0, "the env file holds the database password"
    password = re.search(r"^EPREUVE_POSTGRES_PASSWORD=(\S+)$", env_file.read_text(),
                         re.MULTILINE).group(1)

    # the organiser, as the README says
    stack.compose("exec", "-T", "server", "epreuve", "dataset", "synth", "liver/validation",
                  "--cases", "3")
    stack.compose("exec", "-T", "server", "epreuve", "dataset", "seal", "liver/validation")
    admin = stack.compose("admin-token").stdout.strip()
    assert admin.startswith("epv_")
    created = httpx.post(f"{stack.url}/api/v1/challenges",
                         content=(REPO / "challenges" / f"{CHALLENGE}.yaml").read_bytes(),
                         headers={"Authorization": f"Bearer {admin}",
                                  "Content-Type": "application/yaml"}, timeout=120)
    assert created.status_code == 201, created.text
    printed = stack.compose("exec", "-T", "server", "epreuve", "token", "create", "--role",
                            "participant", "--team", TEAM).stdout
    stack.token = printed.strip().splitlines()[-1]
    assert stack.token.startswith("epv_"), printed

    # the participant, from the host
    submitted = stack.epreuve("submit", threshold_image, "-c", CHALLENGE, "-p", PHASE)
    found = re.search(r"submission (\d+) (queued|running|succeeded)", submitted)
    assert found, submitted
    submission_id = int(found.group(1))
    status = wait_until_ended(stack, submission_id)
    assert (status["status"], status["reason"]) == ("succeeded", None), \
        f"{status}\n{stack.logs()}"
    board = json.loads(stack.epreuve("leaderboard", CHALLENGE, PHASE, "--format", "json"))
    (entry,) = board["entries"]
    assert (entry["rank"], entry["team"], entry["submission_id"]) == (1, TEAM, submission_id)
    assert 0.5 < entry["scores"]["dice[1]"] <= 1.0   # the threshold segmenter works

    # every job ran on the compose worker: its provenance names that node
    detail = httpx.get(f"{stack.url}/api/v1/submissions/{submission_id}", timeout=30,
                       headers={"Authorization": f"Bearer {admin}"}).json()
    assert detail["jobs"] and all(job["provenance"]["node_name"] == stack.worker_name
                                  for job in detail["jobs"]), detail["jobs"]

    assert_prometheus_scraped_the_server(stack)
    assert_no_ground_truth_on_the_worker(stack)
    assert_the_worker_cannot_reach_the_database(stack, password)
    assert_images_hold_no_secret_and_no_dev_dependency((password, admin, stack.token))


def wait_until_ended(stack: Stack, submission_id: int) -> dict:
    """Poll the status route (a condition, not a timing assertion)."""
    deadline = time.monotonic() + WAIT_SECONDS
    with httpx.Client(base_url=stack.url, timeout=30,
                      headers={"Authorization": f"Bearer {stack.token}"}) as api:
        while time.monotonic() < deadline:
            response = api.get(f"/api/v1/submissions/{submission_id}/status")
            assert response.status_code == 200, response.text
            status = response.json()
            if status["status"] in ENDED:
                return status
            time.sleep(1)
    raise AssertionError(f"submission {submission_id} never ended: {status}\n{stack.logs()}")


def assert_prometheus_scraped_the_server(stack: Stack) -> None:
    """Prometheus (on loopback) holds the server's count of succeeded submissions."""
    query = 'sum(epreuve_submissions_total{job="epreuve", state="succeeded"})'
    deadline = time.monotonic() + 120   # a few scrape intervals
    result: list = []
    while time.monotonic() < deadline:
        answer = httpx.get(f"http://127.0.0.1:{stack.prometheus_port}/api/v1/query",
                           params={"query": query}, timeout=10).json()
        assert answer["status"] == "success", answer
        result = answer["data"]["result"]
        if result and float(result[0]["value"][1]) >= 1:
            return
        time.sleep(2)
    raise AssertionError(f"Prometheus never saw the submission: {result}\n{stack.logs()}")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_no_ground_truth_on_the_worker(stack: Stack) -> None:
    """No file on the worker's disk has the bytes of a ground-truth file, nor its name."""
    truth_dir = stack.server_dir / "datasets" / "liver" / "validation" / "ground_truth"
    truth = {sha256(p) for p in truth_dir.rglob("*") if p.is_file()}
    assert len(truth) == 3, truth_dir   # the test looks where the ground truth really is
    on_worker = [p for p in stack.worker_dir.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.name == "ct.nii.gz" for p in on_worker), "the inputs were fetched here"
    assert not [p for p in on_worker if sha256(p) in truth]
    assert not [p for p in stack.worker_dir.rglob("*") if "ground_truth" in p.name]


def assert_the_worker_cannot_reach_the_database(stack: Stack, password: str) -> None:
    resolve = stack.compose("exec", "-T", "worker", "python3", "-c",
                            "import socket; socket.getaddrinfo('postgres', 5432)", check=False)
    assert resolve.returncode != 0, "the worker's network has the database on it"
    inspected = subprocess.run(["docker", "inspect", stack.container("worker")],
                               capture_output=True, text=True, check=True).stdout
    assert password not in inspected
    (worker,) = json.loads(inspected)
    assert str(stack.server_dir) not in {m["Source"] for m in worker["Mounts"]}


def assert_images_hold_no_secret_and_no_dev_dependency(secrets: tuple[str, ...]) -> None:
    for tag in SERVICE_IMAGES:
        described = subprocess.run(["docker", "image", "inspect", tag], capture_output=True,
                                   text=True, check=True).stdout
        history = subprocess.run(["docker", "history", "--no-trunc", tag],
                                 capture_output=True, text=True, check=True).stdout
        for secret in secrets:
            assert secret not in described and secret not in history, tag
    probe = ("import importlib.util as u, json; "
             f"print(json.dumps([m for m in {list(DEV_ONLY_MODULES)!r} if u.find_spec(m)]))")
    found = subprocess.run(["docker", "run", "--rm", "--network", "none", SERVICE_IMAGES[0],
                            "python3", "-c", probe], capture_output=True, text=True, check=True)
    assert json.loads(found.stdout) == []
    present = subprocess.run(["docker", "run", "--rm", "--network", "none", SERVICE_IMAGES[0],
                              "python3", "-c", "import engine, runners, gpu"])
    assert present.returncode == 0   # the probe above looks in the right environment
