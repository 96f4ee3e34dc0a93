"""The CLI as an API client: with EPREUVE_SERVER and EPREUVE_TOKEN (or --server and
--token), `status`, `leaderboard` and `cancel` go through a real server on loopback, as a
participant; without them, the same commands read the local engine as before.

The `epreuve` process runs with a local data directory of its own, empty: whatever it
prints about the server's submissions can only have come through the API."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from engine.api.app import ApiOptions
from engine.api.ratelimit import Rate
from tests.api_fixtures import HIDDEN_CASE_MESSAGE, build_world, queued_submission, start_server

EPREUVE = str(Path(sys.executable).parent / "epreuve")


@pytest.fixture(scope="module")
def live(module_tmp):
    world = build_world(module_tmp("cli-client"), "sqlite")
    server = start_server(world, ApiOptions(rate=Rate(burst=10_000, per_second=1000.0)))
    yield server
    server.stop()


class Cli:
    def __init__(self, root: Path, **extra: str):
        self.env = {**os.environ, "EPREUVE_DATA_DIR": str(root / "data-dir"),
                    "EPREUVE_DATABASE_URL": f"sqlite:///{root / 'local.db'}",
                    "EPREUVE_STATE_DIR": str(root / "state"), "COLUMNS": "200",
                    "PYTHONPATH": str(Path(__file__).resolve().parent.parent), **extra}
        for name in ("EPREUVE_SERVER", "EPREUVE_TOKEN"):
            if name not in extra:
                self.env.pop(name, None)
        self.root = root

    def __call__(self, *args: str, code: int = 0) -> subprocess.CompletedProcess:
        proc = subprocess.run([EPREUVE, *args], env=self.env, cwd=self.root,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == code, (args, proc.stdout[-2000:], proc.stderr[-2000:])
        assert "Traceback" not in proc.stdout + proc.stderr
        return proc


@pytest.fixture
def team_a(live, tmp_path) -> Cli:
    return Cli(tmp_path, EPREUVE_SERVER=live.url,
               EPREUVE_TOKEN=live.world.tokens["participant-a"])


def test_status_of_the_teams_own_submission_comes_from_the_server(live, team_a):
    own = live.world.submissions["a-validation"]
    report = json.loads(team_a("status", str(own), "--json").stdout)
    assert (report["submission"], report["team"], report["status"]) == (own, "team-a",
                                                                        "succeeded")
    assert report["challenge"] == "ch-a" and report["jobs"][0]["kind"] == "main"
    assert "events" not in report  # the organisers' history is not a team's
    table = team_a("status", str(own)).stdout
    assert f"submission {own} (team-a, ch-a/validation): succeeded" in table


def test_a_final_phase_is_shown_as_the_server_cuts_it(live, team_a):
    final = live.world.submissions["a-final"]
    shown = team_a("status", str(final), "--format", "tsv").stdout
    assert f"submission {final} (team-a, ch-a/final): failed: OUTPUT_INVALID" in shown
    assert HIDDEN_CASE_MESSAGE not in shown


def test_another_teams_submission_is_not_found(live, team_a):
    theirs = live.world.submissions["b-validation"]
    refused = team_a("status", str(theirs), code=1)
    assert f"not found: no submission {theirs}" in refused.stderr
    assert refused.stdout == ""
    refused = team_a("cancel", str(theirs), code=1)
    assert "not found" in refused.stderr


def test_leaderboard_through_the_api_in_every_format(live, team_a):
    board = json.loads(team_a("leaderboard", "ch-a", "validation", "--json").stdout)
    assert board["challenge"] == "ch-a" and board["phase"] == "validation"
    assert sorted(e["team"] for e in board["entries"]) == ["team-a", "team-b"]
    assert [e["rank"] for e in board["entries"]] == sorted(e["rank"] for e in board["entries"])
    tsv = team_a("leaderboard", "ch-a", "validation", "--format", "tsv").stdout
    rows = [line.split("\t") for line in tsv.splitlines() if "\t" in line]
    assert rows[0][:3] == ["rank", "team", "submission"]
    assert sorted(row[1] for row in rows[1:]) == ["team-a", "team-b"]
    refused = team_a("leaderboard", "ch-a", "no-such-phase", code=1)
    assert "not found" in refused.stderr


def test_cancel_through_the_api(live, team_a):
    queued = queued_submission(live.world, "ch-a", "team-a")
    assert team_a("cancel", str(queued)).stdout.strip() == f"submission {queued} cancelled"
    report = json.loads(team_a("status", str(queued), "--json").stdout)
    assert report["status"] == "cancelled"
    again = team_a("cancel", str(queued), code=1)  # already ended: the server says so
    assert again.stderr.startswith("error:")


def test_flags_name_the_server_and_token_too(live, tmp_path):
    cli = Cli(tmp_path)
    own = live.world.submissions["a-validation"]
    shown = cli("status", str(own), "--server", live.url, "--token",
                live.world.tokens["participant-a"], "--json").stdout
    assert json.loads(shown)["submission"] == own
    refused = cli("status", str(own), "--server", live.url, code=2)
    assert "needs a token" in refused.stderr
    refused = cli("status", str(own), "--server", live.url, "--token", "epv_" + "x" * 43,
                  code=1)
    assert refused.stderr.startswith("error:")


def test_an_unreachable_server_is_said_plainly(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    cli = Cli(tmp_path, EPREUVE_SERVER=f"http://127.0.0.1:{port}", EPREUVE_TOKEN="epv_x")
    refused = cli("status", "1", code=3)
    assert "no answer from" in refused.stderr


def test_without_a_server_the_commands_are_local(live, tmp_path):
    """The local database here is empty: the server's submission is unknown locally."""
    cli = Cli(tmp_path)
    own = live.world.submissions["a-validation"]
    refused = cli("status", str(own), code=1)
    assert f"no submission {own}" in refused.stderr and "not found" not in refused.stderr
