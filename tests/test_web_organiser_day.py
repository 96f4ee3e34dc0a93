"""The organiser's day and a participant's submission, in a real browser, end to end.

A real server on loopback, a real local worker running real containers (Docker), real
chromium. The organiser signs in with a token and watches the queue; a team's container
runs and its live log reaches the dashboard (and that team's own page) while it runs; the
organiser cancels it from the dashboard, reads a failure's typed reason, and publishes the
final phase's leaderboard, which the public then reads. A participant follows its own
submission from upload to rank: status, queue position and estimate, then its rank. Each
role sees what it may and nothing more; the console stays quiet; axe finds no serious
violation on the pages the day uses.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from engine.api.app import ApiOptions
from engine.api.ratelimit import Rate
from engine.db.models import SubmissionRow
from engine.statuses import SubmissionStatus
from engine.submissions import register_challenge, submit
from engine.tokens import create_token
from engine.web import create_site
from engine.worker import Worker
from runners.base import FailureReason
from runners.docker import DockerRunner
from tests.api_fixtures import World, start_server
from tests.engine_fixtures import build_examples, make_scene, pin
from tests.web_fixtures import (
    browser,  # noqa: F401  (the module's chromium fixture)
    serious_violations,
    sign_in,
    watched_page,
)

# ruff: noqa: F811  (pytest fixtures as arguments)

pytestmark = [pytest.mark.docker, pytest.mark.browser]
CHALLENGE = "test-liver"
# a team's container that talks until it is stopped; its log is hostile markup and escapes
CHATTY = """\
import sys, time
for n in range(600):
    print(f"CHATTY-LINE {n} \\x1b[31m<img src=x onerror=alert(3)>", flush=True)
    time.sleep(1)
"""


@pytest.fixture(scope="module")
def images(docker_engine, module_tmp):
    root = module_tmp("day-images")
    built = build_examples(root)
    built["chatty"] = _entrypoint_image(built["threshold"], CHATTY, "epreuve-test/chatty:latest",
                                        root / "chatty")
    return built


def _entrypoint_image(base: str, script: str, tag: str, context: Path) -> str:
    """`script` as the image's entrypoint (the base's own entrypoint replaced), offline."""
    context.mkdir(parents=True, exist_ok=True)
    (context / "script.py").write_text(script)
    (context / "Dockerfile").write_text(f"FROM {base}\nCOPY script.py /opt/script.py\n"
                                        'ENTRYPOINT ["python3", "/opt/script.py"]\nCMD []\n')
    subprocess.run(["docker", "build", "-q", "--network", "none", "-t", tag, str(context)],
                   check=True, capture_output=True,
                   env={"DOCKER_BUILDKIT": "0", "PATH": "/usr/bin:/usr/local/bin:/bin"})
    return tag


@pytest.fixture
def day(tmp_path, images):
    """The challenge, four submissions (queued in this order), the tokens, the server and a
    worker that runs the queue in the background."""
    scene = make_scene(tmp_path, time_per_case="600s")
    tars = tmp_path / "tars"
    tars.mkdir()
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        ids = {
            "chatty": submit(session, CHALLENGE, "validation", "team-b",
                             pin(images["chatty"], tars)).id,
            "broken": submit(session, CHALLENGE, "validation", "team-c",
                             pin(images["broken"], tars)).id,
            "ours": submit(session, CHALLENGE, "validation", "team-a",
                           pin(images["threshold"], tars)).id,
            "final": submit(session, CHALLENGE, "final", "team-a",
                            pin(images["threshold"], tars)).id,
        }
        tokens = {name: create_token(session, **arguments)[1] for name, arguments in {
            "organiser": dict(role="organiser", challenges=[CHALLENGE]),
            "team-a": dict(role="participant", team="team-a"),
            "team-b": dict(role="participant", team="team-b"),
        }.items()}
        session.commit()
    world = World(tmp_path, scene.settings, scene.sessions, tokens=tokens, submissions=ids)
    server = start_server(world, app=create_site(scene.settings, ApiOptions(
        rate=Rate(burst=10_000, per_second=1000.0))))
    worker = Worker(scene.sessions, scene.settings,
                    DockerRunner(state_dir=scene.settings.state_dir / "runs"),
                    scoring_workers=1, heartbeat_seconds=1.0)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, kwargs={"stop": stop, "idle_seconds": 0.5},
                              daemon=True)
    thread.start()
    yield server
    stop.set()
    thread.join(timeout=120)
    server.stop()


def _status(world, submission_id: int) -> str:
    with world.sessions() as session:
        return session.scalar(select(SubmissionRow.status).where(
            SubmissionRow.id == submission_id))


def _until(check: Callable[[], bool], what: str, timeout: float = 240.0) -> None:
    """Wait for the worker (real containers on a shared machine): a bound, not a measure."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting for {what}")
        time.sleep(0.5)


def _accessible(watched) -> None:
    assert serious_violations(watched.page) == []


def test_the_organisers_day_and_a_participant_from_upload_to_rank(day, browser):
    world = day.world
    ids = world.submissions
    organiser = watched_page(browser, day.url)
    team_a = watched_page(browser, day.url)
    team_b = watched_page(browser, day.url)
    public = watched_page(browser, day.url)
    page = organiser.page

    # the organiser signs in and watches the queue: team b's container runs, talking
    sign_in(organiser, world.tokens["organiser"])
    page.wait_for_url("**/dashboard")
    assert "validation" in page.inner_text("#queue")
    page.locator("#running pre.log", has_text="CHATTY-LINE").wait_for(timeout=120_000)
    running = page.inner_text("#running")
    assert f"#{ids['chatty']}" in running and "team-b" in running
    assert re.search(r"\b\d+m \d\ds\b", running)  # the elapsed time
    assert "\\x1b[31m<img src=x onerror=alert(3)>" in running  # the log, as inert text
    assert page.locator("main img").count() == 0
    _accessible(organiser)

    # team b follows its own running submission's live log; team a cannot see it
    sign_in(team_b, world.tokens["team-b"])
    team_b.page.goto(f"/submissions/{ids['chatty']}")
    live = team_b.page.locator("pre[data-job]")
    first = live.inner_text()
    team_b.page.wait_for_function(
        "([selector, before]) => document.querySelector(selector).textContent !== before",
        arg=["pre[data-job]", first], timeout=60_000)  # the page's script refreshed it
    assert "CHATTY-LINE" in live.inner_text() and team_b.page.locator("main img").count() == 0
    _accessible(team_b)

    # team a uploaded (the API's intake is tested elsewhere) and waits: position, estimate
    sign_in(team_a, world.tokens["team-a"])
    team_a.goto_refused(f"/submissions/{ids['chatty']}", 404)  # another team's
    team_a.page.goto(f"/submissions/{ids['ours']}")
    assert team_a.page.inner_text("#status") == "queued"
    waiting = team_a.page.inner_text("#queue")
    assert re.search(r"[1-9]\d* job\(s\) ahead; (starts in about \d+m \d\ds|no estimate yet)",
                     waiting), waiting
    assert team_a.page.locator("#cancel").count() == 1  # its own: a team may cancel
    assert team_a.page.locator("#rerun").count() == 0  # re-running is the organisers'
    _accessible(team_a)

    # the organiser cancels team b's running submission from the dashboard
    page.goto("/dashboard")
    page.locator(f"#recent-{ids['chatty']} button", has_text="Cancel").click()
    page.wait_for_url(f"**/submissions/{ids['chatty']}")
    assert page.inner_text("#status") == "cancelled"
    team_b.page.wait_for_selector("#status.status-cancelled", timeout=30_000)  # it follows

    # a failure with its typed reason, read from the dashboard
    _until(lambda: _status(world, ids["broken"]) == SubmissionStatus.FAILED, "the failure")
    page.goto("/dashboard")
    assert FailureReason.NONZERO_EXIT.value in page.inner_text("#failures")
    page.click(f"#recent-{ids['broken']} a")
    assert page.inner_text("#reason") == FailureReason.NONZERO_EXIT.value
    assert page.locator("pre.log").count() >= 1  # the organiser reads the log

    # team a's page follows it to its rank by itself
    team_a.page.wait_for_selector("#rank", timeout=240_000)
    assert team_a.page.inner_text("#status") == "succeeded"
    assert team_a.page.inner_text("#rank").startswith("#1 on the leaderboard")
    _accessible(team_a)

    # the final phase's board: hidden from the public until the organiser publishes it
    _until(lambda: _status(world, ids["final"]) == SubmissionStatus.SUCCEEDED, "the final run")
    board = f"/challenges/{CHALLENGE}/phases/final"
    public.goto_refused(board, 403)
    team_a.goto_refused(board, 403)
    page.goto(board)
    assert "not published yet" in page.inner_text("main")
    _accessible(organiser)
    page.click("#publish")
    page.wait_for_url(f"**{board}")
    assert page.locator("#unpublish").count() == 1
    public.page.goto(board)
    assert "team-a" in public.page.inner_text("#leaderboard")
    assert public.page.locator("#publish, #unpublish").count() == 0
    _accessible(public)
    team_a.page.goto(board)
    assert "team-a" in team_a.page.inner_text("#leaderboard")
    assert team_a.page.locator("form[action$='/publish']").count() == 0
    public.page.goto(f"/challenges/{CHALLENGE}")
    assert "not published yet" not in public.page.inner_text("#phases")

    for watched in (organiser, team_a, team_b, public):
        watched.assert_quiet()
