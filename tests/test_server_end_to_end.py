"""The server's whole path with real processes only: `epreuve challenge create`, `epreuve token
create`, `epreuve serve`, a local `epreuve worker` on the same data dir, and `epreuve submit
--server` from a participant's shell; the submission goes from upload to the leaderboard,
read back through the API. On the embedded default (SQLite) and on PostgreSQL.

Nothing here is in process: every command is the installed `epreuve` entry point, with its
own environment (a fresh data dir), as an organiser and a participant would run it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.datasets import seal
from engine.statuses import SubmissionStatus
from engine.synthetic import synth_dataset
from tests.conftest import REPO, build_image, postgres_sessions
from tests.engine_fixtures import CHALLENGE_YAML
from tests.upload_server import free_port

pytestmark = pytest.mark.docker

EPREUVE = str(Path(sys.executable).parent / "epreuve")
CHALLENGE = "server-liver"
WAIT_SECONDS = 600  # a submission's smoke job and main job, on a busy machine
ENDED = {SubmissionStatus.SUCCEEDED, SubmissionStatus.FAILED, SubmissionStatus.CANCELLED}
ID_LABELS = {"id", "submission", "submission_id", "job", "job_id", "intake", "intake_id"}


@pytest.fixture(scope="module")
def threshold_image(docker_engine) -> str:
    return build_image(REPO / "images/examples/threshold", "epreuve-example/threshold:latest")


class Shell:
    """One machine's environment: every `epreuve` command and process shares its data dir
    (and its database: the embedded SQLite there, or PostgreSQL by URL)."""

    def __init__(self, root: Path, database_url: str | None):
        self.root = root
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("EPREUVE_") or k.startswith("EPREUVE_TEST_")}
        env.update(EPREUVE_DATA_DIR=str(root / "data-dir"), COLUMNS="250",
                   PYTHONPATH=str(REPO))
        if database_url:
            env["EPREUVE_DATABASE_URL"] = database_url
        self.env = env
        self.processes: list[tuple[subprocess.Popen, Path]] = []

    def run(self, *args: str) -> str:
        proc = subprocess.run([EPREUVE, *args], env=self.env, cwd=self.root, text=True,
                              capture_output=True, timeout=WAIT_SECONDS)
        assert proc.returncode == 0, (args, proc.stdout[-3000:], proc.stderr[-3000:])
        assert "Traceback" not in proc.stderr
        return proc.stdout

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        with open(log, "ab") as handle:  # the child keeps its own descriptor
            process = subprocess.Popen([EPREUVE, *args], env=self.env, cwd=self.root,
                                       stdout=handle, stderr=subprocess.STDOUT)
        self.processes.append((process, log))
        return process

    def logs(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}"
                         for _, log in self.processes)

    def stop_all(self) -> None:
        for process, _ in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process, _ in self.processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def write_challenge(root: Path) -> Path:
    """A demo-like challenge beside its sealed datasets (paths relative to the file)."""
    data = root / "data"
    synth_dataset(data / "validation", cases=3, seed=41, size=32)
    synth_dataset(data / "final", cases=2, seed=42, size=32)
    seal(data / "validation")
    seal(data / "final")
    path = root / f"{CHALLENGE}.yaml"
    path.write_text(CHALLENGE_YAML.format(id=CHALLENGE, quota=5, cases_per_run=2,
                                          scheme="rank-then-aggregate", time_per_case="60s"))
    return path


def new_token(shell: Shell, team: str) -> str:
    """`epreuve token create`: the secret is the last line printed."""
    out = shell.run("token", "create", "--role", "participant", "--team", team)
    secret = out.strip().splitlines()[-1]
    assert secret.startswith("epv_"), out
    return secret


def wait_until_serving(url: str, server: subprocess.Popen, shell: Shell) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert server.poll() is None, f"the server exited\n{shell.logs()}"
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the server never answered\n{shell.logs()}")


def wait_until_ended(api: httpx.Client, submission_id: int, shell: Shell) -> dict:
    """Poll the status route (a condition, not a timing assertion)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        response = api.get(f"/api/v1/submissions/{submission_id}/status")
        assert response.status_code == 200, response.text
        status = response.json()
        if status["status"] in ENDED:
            return status
        time.sleep(1)
    raise AssertionError(f"submission {submission_id} never ended: {status}\n{shell.logs()}")


def samples(metrics_text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(metrics_text)
            for sample in family.samples]


@pytest.fixture(params=["sqlite", "postgres"])
def shell(request, tmp_path):
    url = None
    if request.param == "postgres":
        postgres_sessions()  # a clean schema, or a skip (a failure in CI) without PostgreSQL
        url = os.environ["EPREUVE_TEST_POSTGRES_URL"]
    shell = Shell(tmp_path, url)
    yield shell
    shell.stop_all()


def test_a_participant_takes_an_image_from_upload_to_the_leaderboard(shell, threshold_image):
    challenge_file = write_challenge(shell.root)
    assert not (shell.root / "data-dir").exists()  # a fresh data dir: the commands make it
    created = shell.run("challenge", "create", challenge_file.name)
    assert created.startswith(f"challenge {CHALLENGE}: "), created
    own, other = new_token(shell, "lab-a"), new_token(shell, "lab-b")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = shell.start("server", "serve", "--port", str(port))
    shell.start("worker", "worker", "--heartbeat-seconds", "2")
    wait_until_serving(url, server, shell)

    submitted = shell.run("submit", threshold_image, "-c", CHALLENGE, "-p", "validation",
                          "--server", url, "--token", own)
    found = re.search(r"submission (\d+) (queued|running|succeeded)", submitted)
    assert found, submitted
    submission_id = int(found.group(1))

    with httpx.Client(base_url=url, timeout=30,
                      headers={"Authorization": f"Bearer {own}"}) as api:
        status = wait_until_ended(api, submission_id, shell)
        assert (status["status"], status["reason"]) == ("succeeded", None), \
            f"{status}\n{shell.logs()}"
        board = api.get(f"/api/v1/challenges/{CHALLENGE}/phases/validation/leaderboard")
        assert board.status_code == 200, board.text
        (entry,) = board.json()["items"]
        assert (entry["rank"], entry["team"], entry["submission_id"]) == (1, "lab-a",
                                                                           submission_id)
        dice = entry["scores"]["dice[1]"]
        assert dice is not None and 0.5 < dice <= 1.0  # the threshold segmenter works
        detail = api.get(f"/api/v1/submissions/{submission_id}").json()
        assert (detail["team"], detail["challenge"], detail["phase"]) == (
            "lab-a", CHALLENGE, "validation")

    with httpx.Client(base_url=url, timeout=30,
                      headers={"Authorization": f"Bearer {other}"}) as stranger:
        for path in ("", "/status", "/cases", "/logs"):
            response = stranger.get(f"/api/v1/submissions/{submission_id}{path}")
            assert response.status_code == 404, (path, response.text)
            assert "lab-a" not in response.text
        assert stranger.get("/api/v1/submissions").json()["items"] == []

    metrics = httpx.get(f"{url}/metrics", timeout=30)
    assert metrics.status_code == 200
    scraped = samples(metrics.text)
    counted = {labels["state"]: value for name, labels, value in scraped
               if name == "epreuve_submissions_total" and labels["reason"] == "none"}
    assert counted["queued"] == 1 and counted["succeeded"] == 1, counted
    for name, labels, _ in scraped:
        assert not ID_LABELS & set(labels), (name, labels)
        for value in labels.values():  # routes are counted by template, never by path
            assert f"/{submission_id}/" not in f"{value}/", (name, labels)
    routes = {labels.get("route") for name, labels, _ in scraped
              if name.startswith("epreuve_http_requests")}
    assert "/api/v1/submissions/{submission_id}/status" in routes, routes
