"""A real server on loopback over a database of finished submissions (no containers).

Two challenges (ch-a, ch-b), each with a visible validation phase, a final (hidden)
phase and a closed phase (tests/engine_fixtures.CHALLENGE_YAML). Teams a and b submit
to ch-a, team c to ch-b. Results are written as the worker would (job, per-case rows,
aggregates) without running a container, so the whole API is exercised in seconds.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import uvicorn
from sqlalchemy import select

from engine.api.app import ApiOptions, create_app
from engine.api.ratelimit import Rate
from engine.config import Settings
from engine.datasets import seal
from engine.db import session_factory
from engine.db.models import (
    CaseResultRow,
    ImageRow,
    JobRow,
    PhaseRow,
    SubmissionRow,
    TeamRow,
    TokenRow,
    utcnow,
)
from engine.results import compute_aggregates, metric_keys
from engine.statuses import JobKind, JobStatus, SubmissionStatus
from engine.submissions import challenge_definition, get_or_create_team, register_challenge
from engine.synthetic import synth_dataset
from engine.tokens import create_token
from runners.base import FailureReason
from tests.engine_fixtures import CHALLENGE_YAML

SECRET_LOG = "SECRET-LOG-LINE"  # written in every job's log: must never reach a hidden reader
HIDDEN_CASE_MESSAGE = "case-002 of the final set: shape (31, 32, 32) differs from the input"


@dataclass
class World:
    root: Path
    settings: Settings
    sessions: object
    tokens: dict[str, str] = field(default_factory=dict)  # principal name -> secret
    submissions: dict[str, int] = field(default_factory=dict)
    teams: dict[str, int] = field(default_factory=dict)


@dataclass
class LiveServer:
    url: str
    world: World
    server: uvicorn.Server
    thread: threading.Thread

    def client(self, principal: str | None = None) -> httpx.Client:
        headers = {}
        if principal is not None:
            headers["Authorization"] = f"Bearer {self.world.tokens[principal]}"
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        state = self.server.config.app.state
        service = getattr(state, "worker_service", None)
        # no lifespan here: the sweeper (and scorer) would outlive the server and sweep the
        # next test's database with this one's lease and node-lost times
        if service is not None:
            service.stop_sweeper()
        if getattr(state, "sessions", None) is not None:  # nor its idle connections
            state.sessions.kw["bind"].dispose()


def challenge_yaml(challenge_id: str, dataset_prefix: str = "") -> str:
    text = CHALLENGE_YAML.format(id=challenge_id, quota=10, cases_per_run=1,
                                 scheme="aggregate-then-rank", time_per_case="60s")
    return text.replace("path: data/", f"path: {dataset_prefix}")


def database_url(backend: str, root: Path) -> str:
    if backend == "sqlite":
        return f"sqlite:///{root / 'state' / 'epreuve.db'}"
    from tests.conftest import postgres_sessions

    postgres_sessions()  # a clean schema, or a skip (a failure in CI) without PostgreSQL
    return os.environ["EPREUVE_TEST_POSTGRES_URL"]


def build_world(root: Path, backend: str) -> World:
    data = root / "data"
    synth_dataset(data / "validation", cases=3, seed=31, size=24)
    synth_dataset(data / "final", cases=3, seed=32, size=24)
    seal(data / "validation")
    seal(data / "final")
    settings = Settings(data_dir=root / "state", database_url=database_url(backend, root),
                        state_dir=root / "state" / "runner", datasets_dir_override=data)
    world = World(root, settings, session_factory(settings.database_url))
    with world.sessions() as session:
        for challenge_id in ("ch-a", "ch-b"):
            (root / f"{challenge_id}.yaml").write_text(challenge_yaml(challenge_id, "data/"))
            register_challenge(session, root / f"{challenge_id}.yaml")
        for name in ("team-a", "team-b", "team-c"):
            world.teams[name] = get_or_create_team(session, name).id
        image = ImageRow(image_id="sha256:" + "a" * 64, tar_sha256="b" * 64, layers=[],
                         reference="example/algorithm:1", architecture="amd64", user="1000",
                         size_bytes=1 << 20)
        session.add(image)
        session.flush()
        for key, (challenge_id, slug, team, failed) in {
            "a-validation": ("ch-a", "validation", "team-a", False),
            "a-final": ("ch-a", "final", "team-a", True),
            "b-validation": ("ch-a", "validation", "team-b", False),
            "c-validation": ("ch-b", "validation", "team-c", False),
        }.items():
            world.submissions[key] = finished_submission(session, challenge_id, slug, team,
                                                         image, failed=failed)
        _tokens(session, world)
        session.commit()
    return world


def _phase_row(session, challenge_id: str, slug: str) -> PhaseRow:
    return session.scalar(select(PhaseRow).where(PhaseRow.challenge_id == challenge_id,
                                                 PhaseRow.slug == slug))


def finished_submission(session, challenge_id: str, slug: str, team: str, image: ImageRow,
                        *, failed: bool) -> int:
    """A submission as the worker leaves it: one job, a row per case, aggregates. A failed
    one carries a case-level message (naming a case) and an invalid case."""
    phase = _phase_row(session, challenge_id, slug)
    team_row = session.scalar(select(TeamRow).where(TeamRow.name == team))
    now = utcnow()
    submission = SubmissionRow(phase=phase, team=team_row, image=image, created_at=now,
                               status=SubmissionStatus.FAILED if failed else
                               SubmissionStatus.SUCCEEDED, finished_at=now,
                               reason=FailureReason.OUTPUT_INVALID.value if failed else None,
                               message=HIDDEN_CASE_MESSAGE if failed else "evaluated")
    session.add(submission)
    session.flush()
    job = JobRow(submission=submission, kind=JobKind.MAIN, case_ids=list(phase.case_ids),
                 status=JobStatus.FAILED if failed else JobStatus.SUCCEEDED, attempts=1,
                 reason=submission.reason, message=submission.message,
                 started_at=now - timedelta(seconds=5), finished_at=now,
                 run_result={"log_tail": f"{SECRET_LOG} {team} {slug}\n", "log_truncated": False,
                             "wall_seconds": 5.0, "cpu_seconds": 4.0,
                             "peak_memory_bytes": 1 << 20})
    session.add(job)
    session.flush()
    keys = metric_keys(challenge_definition(phase.challenge))
    for index, case_id in enumerate(phase.case_ids):
        invalid = failed and index == 1
        session.add(CaseResultRow(
            submission_id=submission.id, job_id=job.id, case_id=case_id, valid=not invalid,
            reason=FailureReason.OUTPUT_INVALID.value if invalid else None,
            message=HIDDEN_CASE_MESSAGE if invalid else None,
            metrics={} if invalid else {k: 0.5 + 0.1 * index for k in keys},
            runtime_seconds=1.0 + index, runtime_exact=True, output_sha256={}))
    session.flush()
    compute_aggregates(session, submission)
    session.flush()
    return submission.id


def queued_submission(world: World, challenge_id: str, team: str) -> int:
    """A fresh queued submission with one queued smoke job (for cancel and re-run)."""
    from engine import queue

    with world.sessions() as session:
        phase = _phase_row(session, challenge_id, "validation")
        team_row = session.scalar(select(TeamRow).where(TeamRow.name == team))
        image = session.scalar(select(ImageRow))
        submission = SubmissionRow(phase=phase, team=team_row, image=image, created_at=utcnow())
        session.add(submission)
        session.flush()
        queue.enqueue(session, submission, [[phase.case_ids[0]]], kind=JobKind.SMOKE,
                      actor="test")
        session.commit()
        return submission.id


PRINCIPALS = ("anonymous", "admin", "organiser-a", "organiser-b", "reviewer-a",
              "participant-a", "participant-b", "worker", "revoked", "expired", "garbage")


def _tokens(session, world: World) -> None:
    made = {
        "admin": dict(role="admin"),
        "organiser-a": dict(role="organiser", challenges=["ch-a"]),
        "organiser-b": dict(role="organiser", challenges=["ch-b"]),
        "organiser-new": dict(role="organiser", challenges=["ch-new"]),
        "reviewer-a": dict(role="reviewer", challenges=["ch-a"]),
        "participant-a": dict(role="participant", team="team-a"),
        "participant-b": dict(role="participant", team="team-b"),
        "worker": dict(role="worker"),
        "revoked": dict(role="admin"),
        "expired": dict(role="admin", expires_in=timedelta(days=1)),
    }
    for name, arguments in made.items():
        row, secret = create_token(session, **arguments)
        world.tokens[name] = secret
        if name == "revoked":
            row.revoked_at = utcnow()
        if name == "expired":
            row.expires_at = utcnow() - timedelta(seconds=1)
    world.tokens["garbage"] = "epv_" + "x" * 43
    session.flush()


def start_server(world: World, options: ApiOptions | None = None, app=None) -> LiveServer:
    """uvicorn in a thread, on a socket bound to a free loopback port."""
    app = app or create_app(world.settings, options)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return LiveServer(f"http://127.0.0.1:{port}", world, server, thread)


def token_row(world: World, principal: str) -> TokenRow:
    from engine.tokens import hash_secret

    with world.sessions() as session:
        return session.scalar(select(TokenRow).where(
            TokenRow.hash == hash_secret(world.tokens[principal])))


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def live(request, module_tmp):
    world = build_world(module_tmp(f"api-{request.param}"), request.param)
    server = start_server(world, ApiOptions(rate=Rate(burst=10_000, per_second=1000.0)))
    yield server
    server.stop()
