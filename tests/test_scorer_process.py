"""Scoring on the trusted side, as its own step: real `epreuve serve --no-scorer` and
`epreuve scorer` processes on real PostgreSQL, a node spoken by hand over HTTP.

- A remote completion is answered (202, "scoring") before anything is scored: with no
  scorer running the job waits in SCORING with its outcome stored; a repeated completion
  is answered, a forged attempt refused; `epreuve scorer` then writes one result per case.
- A scorer SIGKILLed while the organisers' (slow) evaluation image scores a job: another
  scorer takes the stored outcome, the run is never repeated, one result per case.
- A scorer that stalls past its lease writes nothing; the job is scored once, by the next.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select, update

from engine import queue
from engine.api.app import ApiOptions
from engine.api.ratelimit import Rate
from engine.db.models import CaseResultRow, EventRow, JobRow, utcnow
from engine.errors import LeaseLost
from engine.submissions import register_challenge
from engine.worker.scorer import Scorer, Scoring, score_job, sweep
from tests.api_fixtures import World, build_world, queued_submission, start_server
from tests.conftest import REPO, build_image
from tests.test_worker_http import Node, mask_tar, succeeded

SLOW_EVALUATOR = "epreuve-test/slow-evaluator:latest"
EVAL_CHALLENGE = """
id: ch-eval
title: Scored by the organisers' own (slow) image
task: segmentation
output: {kind: segmentation, filename: mask.nii.gz, labels: [0, 1, 2, 3]}
metrics:
  evaluation_image: EVALUATOR
  evaluator_metrics:
    - {name: dice, larger_is_better: true, worst: 0.0}
    - {name: false_positive_ml, larger_is_better: false, worst: 1000.0}
ranking: {metrics: [{metric: dice}, {metric: false_positive_ml}]}
phases:
  - id: validation
    dataset: {path: data/validation}
    cases_per_run: 3
    limits: {memory: 1g, time_per_case: 60s, output_quota: 64m}
""".replace("EVALUATOR", SLOW_EVALUATOR)


@dataclass
class Remote:
    """The server process, as the hand-driven Node of test_worker_http sees a server."""

    url: str
    world: World

    def client(self, principal: str | None = None) -> httpx.Client:
        headers = {} if principal is None else {
            "Authorization": f"Bearer {self.world.tokens[principal]}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


def environment(world: World) -> dict[str, str]:
    settings = world.settings
    return {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "HOME": str(world.root),
            "EPREUVE_DATA_DIR": str(settings.data_dir),
            "EPREUVE_DATABASE_URL": settings.database_url,
            "EPREUVE_STATE_DIR": str(settings.state_dir),
            "EPREUVE_DATASETS_DIR": str(world.root / "data")}


def epreuve(world: World, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine.cli", *args], env=environment(world),
                            cwd=world.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server_apart(tmp_path):
    """`epreuve serve --no-scorer` on PostgreSQL: the API, and no scorer in it."""
    world = build_world(tmp_path, "postgres")
    port = free_port()
    process = epreuve(world, "serve", "--port", str(port), "--no-scorer")
    remote = Remote(f"http://127.0.0.1:{port}", world)
    try:
        wait_for("the server to answer", lambda: _answers(remote, process), timeout=60)
        yield remote
    finally:
        process.terminate()
        process.communicate(timeout=30)


def _answers(remote: Remote, process: subprocess.Popen) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"the server exited: {process.communicate()[0]}")
    try:
        return httpx.get(f"{remote.url}/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def wait_for(what: str, check, timeout: float = 180.0):
    """Poll until `check()` is truthy (a deadline against hanging, not a timed assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"gave up waiting for {what}")


def job_of(world: World, job_id: int) -> JobRow:
    with world.sessions() as session:
        return session.get(JobRow, job_id)


def results_of(world: World, submission_id: int) -> list[tuple[str, bool]]:
    with world.sessions() as session:
        return sorted((r.case_id, r.valid) for r in session.scalars(
            select(CaseResultRow).where(CaseResultRow.submission_id == submission_id)))


def completed_remotely(remote: Remote, submission_id: int) -> Node:
    """A node claims the submission's job, runs it (a mask per case, sent as a tar) and
    completes it: the answer is checked by the caller."""
    node = Node(remote)
    assert node.claim().status_code == 201
    assert node.post("start").status_code == 200
    assert node.upload(mask_tar(remote, node.ticket["case_ids"])).status_code == 200
    return node


def test_a_completion_is_answered_at_once_and_a_scorer_apart_scores_it(server_apart):
    world = server_apart.world
    submission_id = queued_submission(world, "ch-a", "team-a")
    node = completed_remotely(server_apart, submission_id)
    job_id = node.ticket["job_id"]

    answer = node.complete(succeeded(1))
    assert (answer.status_code, answer.json()) == (202, {"status": "scoring", "repeated": False})
    waiting = job_of(world, job_id)  # no scorer anywhere: it can only wait
    assert (waiting.status, waiting.lease_owner) == ("scoring", None)
    assert waiting.outcome["result"]["status"] == "succeeded"
    assert Path(waiting.outcome["output_dir"]).is_dir()
    assert results_of(world, submission_id) == []
    again = node.complete(succeeded(1))  # its answer was lost: answered, not applied twice
    assert (again.status_code, again.json()) == (200, {"status": "scoring", "repeated": True})
    assert node.post("heartbeat").status_code == 409  # the node is done with it: next job
    forged = Node(server_apart)
    forged.ticket, forged.token = node.ticket, "x" * 43
    refused = forged.complete(succeeded(1))
    assert refused.status_code == 409 and refused.json()["error"]["type"] == "StaleAttempt"

    scorer = epreuve(world, "scorer", "--until-idle")
    output, _ = scorer.communicate(timeout=300)
    assert scorer.returncode == 0, output
    assert "after 1 job(s)" in output, output
    done = job_of(world, job_id)
    assert (done.status, done.outcome, done.lease_owner, done.attempts) == (
        "succeeded", None, None, 1)
    assert done.run_result["provenance"]  # the attempt's record, as a local run keeps it
    assert results_of(world, submission_id) == [("case-001", True)]
    last = node.complete(succeeded(1))
    assert (last.status_code, last.json()) == (200, {"status": "succeeded", "repeated": True})
    assert results_of(world, submission_id) == [("case-001", True)]


@pytest.fixture
def slow_evaluator(docker_engine, tmp_path):
    """The example evaluation image after a pause: a scorer can be killed while it runs."""
    build_image(REPO / "images" / "examples" / "evaluator", "epreuve-test/evaluator:latest")
    context = tmp_path / "slow-evaluator"
    context.mkdir()
    (context / "Dockerfile").write_text(
        "FROM epreuve-test/evaluator:latest\n"
        'ENTRYPOINT ["sh", "-c", "sleep 8; exec python3 /opt/evaluator/evaluate.py"]\n')
    subprocess.run(["docker", "build", "-q", "--network", "none", "-t", SLOW_EVALUATOR,
                    str(context)], check=True, capture_output=True,
                   env={"DOCKER_BUILDKIT": "0", "PATH": "/usr/bin:/usr/local/bin:/bin"})
    yield SLOW_EVALUATOR
    left = subprocess.run(["docker", "ps", "-aq", "--filter", f"ancestor={SLOW_EVALUATOR}"],
                          capture_output=True, text=True).stdout.split()
    if left:  # this test's own containers only (its own image)
        subprocess.run(["docker", "rm", "-f", *left], capture_output=True)


def evaluating_containers() -> list[str]:
    return subprocess.run(["docker", "ps", "-q", "--filter", f"ancestor={SLOW_EVALUATOR}"],
                          capture_output=True, text=True, check=True).stdout.split()


@pytest.mark.docker
def test_a_scorer_killed_mid_scoring_leaves_the_outcome_to_the_next_and_one_result_per_case(
        server_apart, slow_evaluator):
    world = server_apart.world
    (world.root / "ch-eval.yaml").write_text(EVAL_CHALLENGE)
    with world.sessions() as session:
        register_challenge(session, world.root / "ch-eval.yaml")
        session.commit()
    submission_id = queued_submission(world, "ch-eval", "team-a")
    node = completed_remotely(server_apart, submission_id)
    job_id = node.ticket["job_id"]
    assert node.complete(succeeded(1)).status_code == 202

    first = epreuve(world, "scorer", "--lease-seconds", "5")
    try:
        wait_for("the first scorer's evaluation image to run",
                 lambda: evaluating_containers() or first.poll() is not None
                 or job_of(world, job_id).status != "scoring")
        held = job_of(world, job_id)
        assert held.status == "scoring" and held.lease_owner.startswith("scorer:")
        os.kill(first.pid, signal.SIGKILL)
    finally:
        first.kill()
        output, _ = first.communicate(timeout=30)
    assert first.returncode == -signal.SIGKILL, output
    assert results_of(world, submission_id) == []  # killed mid-scoring: nothing written

    second = epreuve(world, "scorer", "--until-idle", "--lease-seconds", "5")
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 0, output
    done = job_of(world, job_id)
    assert (done.status, done.attempts, done.scorings) == ("succeeded", 1, 2), output
    rows = results_of(world, submission_id)
    assert [case for case, _ in rows] == ["case-001"]  # exactly one result per case
    with world.sessions() as session:
        metrics = session.scalars(select(CaseResultRow.metrics).where(
            CaseResultRow.submission_id == submission_id)).one()
        assert set(metrics) == {"dice", "false_positive_ml"}  # the evaluation image's
        scorers = session.scalars(select(EventRow.actor).where(
            EventRow.entity == "job", EventRow.entity_id == job_id,
            EventRow.detail == "scoring the stored outcome").order_by(EventRow.id)).all()
        assert len(scorers) == 2 and scorers[0] != scorers[1]
        reruns = session.scalar(select(func.count()).select_from(EventRow).where(
            EventRow.entity == "job", EventRow.entity_id == job_id,
            EventRow.to_state == "leased"))
        assert reruns == 1  # scored again, never run again on a node


class PausedPastItsLease(Scoring):
    """A scorer that stalls mid-scoring (after it read the outcome, before it writes) for
    longer than its lease: meanwhile the lease ends, the sweep hands the outcome on and the
    next scorer scores it."""

    def __init__(self, world: World, job_id: int):
        super().__init__(world.settings)
        self.world, self.job_id = world, job_id
        self.swept: list[int] = []

    def runner_for(self, challenge):
        with self.world.sessions() as session:
            session.execute(update(JobRow).where(JobRow.id == self.job_id).values(
                lease_expires_at=utcnow() - timedelta(seconds=1)))
            session.commit()
        self.swept = sweep(self.world.sessions, "test sweeper")
        assert job_of(self.world, self.job_id).status == "scoring"  # not re-queued for a node
        assert Scorer(self.world.sessions, self.world.settings).score_next() == self.job_id
        return super().runner_for(challenge)


def test_a_scorer_whose_lease_expired_writes_nothing_and_the_next_scores_once(tmp_path):
    world = build_world(tmp_path, "postgres")
    submission_id = queued_submission(world, "ch-a", "team-a")
    live = start_server(world, ApiOptions(rate=Rate(burst=10_000, per_second=1000.0),
                                          scorer=False))
    try:
        node = completed_remotely(live, submission_id)
        assert node.complete(succeeded(1)).status_code == 202
    finally:
        live.stop()
    job_id = node.ticket["job_id"]

    stalled = Scorer(world.sessions, world.settings, scoring=PausedPastItsLease(world, job_id))
    with world.sessions() as session:
        assert queue.lease_scoring(session, stalled.owner, stalled.lease).id == job_id
        session.commit()
    with pytest.raises(LeaseLost):  # its write is fenced: the lease is another's now
        score_job(world.sessions, job_id, stalled.owner, stalled.scoring)
    assert stalled.scoring.swept == [job_id]
    assert results_of(world, submission_id) == [("case-001", True)]  # once, by the next
    done = job_of(world, job_id)
    assert (done.status, done.attempts, done.scorings) == ("succeeded", 1, 2)
