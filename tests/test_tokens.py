"""API tokens: random, stored hashed, shown once, revocable, expiring; the CLI around them;
and `epreuve serve` answering on loopback."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import select

from engine.db import session_factory
from engine.db.models import TeamRow, TokenRow, utcnow
from engine.tokens import (
    SECRET_PREFIX,
    TokenRefused,
    Unauthenticated,
    authenticate,
    create_token,
    revoke_token,
)
from tests.conftest import REPO


@pytest.fixture
def sessions(tmp_path):
    return session_factory(f"sqlite:///{tmp_path / 'epreuve.db'}")


def test_a_secret_is_random_prefixed_and_only_its_hash_is_kept(sessions):
    with sessions() as session:
        row, secret = create_token(session, "participant", team="team one")
        _, other = create_token(session, "participant", team="team one")
        session.commit()
        assert secret.startswith(SECRET_PREFIX) and len(secret) >= 40 and secret != other
        assert row.hash == hashlib.sha256(secret.encode()).hexdigest()
        stored = [str(getattr(row, column.name)) for column in TokenRow.__table__.columns]
        assert not any(secret in value for value in stored)
        assert row.prefix == secret[:12] and row.team.name == "team one"
        assert authenticate(session, secret).id == row.id
        assert session.scalar(select(TeamRow).where(TeamRow.name == "team one")) is not None


def test_revoked_expired_and_unknown_tokens_are_refused(sessions):
    with sessions() as session:
        revoked, revoked_secret = create_token(session, "admin")
        _, expiring = create_token(session, "admin", expires_in=timedelta(hours=1))
        revoke_token(session, revoked.id)
        for secret in (revoked_secret, "epv_unknown", "", "x" * 10_000, "épv_ünicode"):
            with pytest.raises(Unauthenticated):
                authenticate(session, secret)
        assert authenticate(session, expiring).id
        with pytest.raises(Unauthenticated, match="expired"):
            authenticate(session, expiring, now=utcnow() + timedelta(hours=2))


@pytest.mark.parametrize(("role", "arguments", "why"), [
    ("participant", {}, "belongs to a team"),
    ("participant", {"team": "bad\x1bname"}, "control or invisible"),
    ("participant", {"team": " padded "}, "surrounding spaces"),
    ("organiser", {}, "scoped to challenges"),
    ("organiser", {"team": "t", "challenges": ["c"]}, "belongs to no team"),
    ("reviewer", {"challenges": ["does-not-exist"]}, "existing challenges"),
    ("worker", {"challenges": ["c"]}, "no challenge scope"),
    ("root", {}, "unknown role"),
    ("admin", {"expires_in": timedelta(seconds=-1)}, "in the future"),
])
def test_a_token_is_refused_when_its_role_and_binding_disagree(sessions, role, arguments,
                                                                why):
    with sessions() as session, pytest.raises(Exception, match=why) as refused:
        create_token(session, role, **arguments)
    assert isinstance(refused.value, TokenRefused) or "team name" in str(refused.value)


def _cli(tmp_path, *args):
    env = {**os.environ, "EPREUVE_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(REPO)}
    env.pop("EPREUVE_DATABASE_URL", None)
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=120)


def test_the_cli_prints_a_secret_once_as_the_last_line_and_never_lists_it(tmp_path):
    created = _cli(tmp_path, "token", "create", "--role", "participant", "--team", "Équipe",
                   "--expires", "30d")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip().splitlines()[-1]
    assert secret.startswith(SECRET_PREFIX)
    listed = _cli(tmp_path, "token", "list", "--json")
    rows = json.loads(listed.stdout)
    assert rows[0]["team"] == "Équipe" and rows[0]["expires_at"]
    assert secret not in listed.stdout and secret[12:] not in _cli(tmp_path, "token",
                                                                   "list").stdout
    assert _cli(tmp_path, "token", "revoke", str(rows[0]["id"])).returncode == 0
    assert json.loads(_cli(tmp_path, "token", "list", "--json").stdout)[0]["revoked_at"]
    missing = _cli(tmp_path, "token", "revoke", "999")
    assert missing.returncode == 1 and "no token 999" in missing.stderr
    refused = _cli(tmp_path, "token", "create", "--role", "participant")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr


def test_epreuve_serve_answers_on_loopback(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "EPREUVE_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(REPO)}
    env.pop("EPREUVE_DATABASE_URL", None)
    server = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--port",
                               str(port)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    try:
        health = None
        deadline = time.monotonic() + 60
        while health is None and time.monotonic() < deadline and server.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz")
            except httpx.TransportError:
                time.sleep(0.2)
        assert health is not None and health.json() == {"status": "ok", "database": "ok"}
        assert httpx.get(f"http://127.0.0.1:{port}/api/v1/challenges").json()["total"] == 0
        assert (tmp_path / "data" / "epreuve.db").exists()  # the embedded default
    finally:
        server.terminate()
        server.wait(timeout=30)
