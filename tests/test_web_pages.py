"""The browser pages (engine/web) in a real chromium against a real server on loopback.

What each role sees and does not see, the same rules as the API (engine/api/access.py);
a hostile team name and log rendered as text; the console free of errors; axe-core
finds no serious or critical accessibility violation; keyboard sign-in; CSRF and CSP.
"""

from __future__ import annotations

import re
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import select

from engine.api.app import ApiOptions
from engine.api.ratelimit import Rate
from engine.db.models import CaseResultRow, ImageRow, JobRow, PhaseRow, SubmissionRow, utcnow
from engine.results import compute_aggregates, metric_keys
from engine.statuses import JobStatus, SubmissionStatus
from engine.submissions import challenge_definition
from engine.web import create_site
from runners.base import FailureReason
from tests.api_fixtures import (
    HIDDEN_CASE_MESSAGE,
    SECRET_LOG,
    build_world,
    finished_submission,
    queued_submission,
    start_server,
)
from tests.web_fixtures import (
    browser,  # noqa: F401  (the module's chromium fixture)
    serious_violations,
    sign_in,
    watched_page,
)

# ruff: noqa: F811  (pytest fixtures as arguments)

HOSTILE_TEAM = "<script>alert(1)</script>"
HOSTILE_LOG = '<img src=x onerror="alert(2)"> RUNNING-LOG-LINE'


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def site(request, module_tmp):
    world = build_world(module_tmp(f"web-{request.param}"), request.param)
    with world.sessions() as session:
        image = session.scalar(select(ImageRow))
        from engine.submissions import get_or_create_team

        world.teams[HOSTILE_TEAM] = get_or_create_team(session, HOSTILE_TEAM).id
        world.submissions["hostile"] = finished_submission(
            session, "ch-a", "validation", HOSTILE_TEAM, image, failed=False)
        session.commit()
    world.submissions["running"] = _running(world, HOSTILE_TEAM)
    options = ApiOptions(rate=Rate(burst=10_000, per_second=1000.0))
    server = start_server(world, app=create_site(world.settings, options))
    yield server
    server.stop()


def _running(world, team: str) -> int:
    """A submission whose smoke job a worker holds now, with a hostile log tail."""
    submission_id = queued_submission(world, "ch-a", team)
    with world.sessions() as session:
        job = session.scalar(select(JobRow).where(JobRow.submission_id == submission_id))
        now = utcnow()
        job.status, job.lease_owner = JobStatus.RUNNING, "node-1/worker-7"
        job.started_at, job.heartbeat_at = now - timedelta(seconds=75), now
        job.lease_expires_at = now + timedelta(minutes=5)
        job.run_result = {"log_tail": HOSTILE_LOG}
        job.submission.status = SubmissionStatus.RUNNING
        session.commit()
    return submission_id


def _log_tail(world, submission_id: int, text: str) -> None:
    with world.sessions() as session:
        job = session.scalar(select(JobRow).where(JobRow.submission_id == submission_id))
        job.run_result = {"log_tail": text}
        session.commit()


def _finish(world, submission_id: int) -> None:
    """What the worker's coordinator leaves: jobs done, a row per case, aggregates."""
    with world.sessions() as session:
        submission = session.get(SubmissionRow, submission_id)
        keys = metric_keys(challenge_definition(submission.phase.challenge))
        now = utcnow()
        for job in submission.jobs:
            job.status, job.finished_at = JobStatus.SUCCEEDED, now
            job.started_at = now - timedelta(seconds=3)
            job.run_result = {"log_tail": "done\n", "wall_seconds": 3.0,
                              "provenance": {"format": 1, "node_name": "gpu-node-secret",
                                             "engine": {"version": "0.1"},
                                             "dataset": {"version": "seal-secret"}}}
        for index, case_id in enumerate(submission.case_ids):
            session.add(CaseResultRow(
                submission_id=submission.id, job_id=submission.jobs[0].id, case_id=case_id,
                valid=True, metrics={k: 0.9 + 0.01 * index for k in keys},
                runtime_seconds=1.0, runtime_exact=True, output_sha256={}))
        session.flush()
        compute_aggregates(session, submission)
        submission.status, submission.finished_at = SubmissionStatus.SUCCEEDED, now
        session.commit()


def _text(watched) -> str:
    return watched.page.inner_text("main")


def _accessible(watched) -> None:
    assert serious_violations(watched.page) == []


# -- public pages ---------------------------------------------------------------------------

@pytest.mark.browser
def test_public_challenge_and_leaderboard(site, browser):
    watched = watched_page(browser, site.url)
    page = watched.page
    page.goto("/")
    page.click("a[href='/challenges/ch-a']")
    page.wait_for_url("**/challenges/ch-a")
    phases = page.inner_text("#phases")
    assert "validation" in phases and "final" in phases
    assert "published when the phase closes" in phases  # the final phase's board
    assert "per-case results" in phases  # what participants of validation see
    _accessible(watched)
    page.click("a[href='/challenges/ch-a/phases/validation']")
    board = page.inner_text("#leaderboard")
    assert "team-a" in board and "team-b" in board
    assert re.search(r"\[\d\.\d{4}, \d\.\d{4}\]", board)  # a confidence interval
    assert "failed cases" in board and "GPU energy (J)" in board
    assert "team-c" not in board  # ch-b's team
    assert page.locator("figure svg").count() == 1
    _accessible(watched)
    watched.goto_refused("/challenges/ch-a/phases/final", 403)
    assert "published when the phase closes" in _text(watched)
    assert "team-a" not in page.content()
    watched.assert_quiet()


@pytest.mark.browser
def test_keyboard_sign_in_keeps_the_token_from_scripts(site, browser):
    watched = watched_page(browser, site.url)
    page = watched.page
    page.goto("/sign-in")
    for _ in range(12):  # skip link, brand, the nav's links, then the field
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "token":
            break
    assert page.evaluate("document.activeElement.id") == "token"
    page.keyboard.type(site.world.tokens["participant-a"])
    page.keyboard.press("Enter")
    page.wait_for_url("**/submissions")
    cookie = next(c for c in page.context.cookies() if c["name"] == "epreuve_token")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert "epv_" not in page.evaluate("document.cookie")
    _accessible(watched)
    page.click("text=Sign out")
    page.wait_for_url(site.url + "/")
    watched.goto_refused("/submissions", 401)
    watched.assert_quiet()


@pytest.mark.browser
def test_a_wrong_token_is_refused_on_the_form(site, browser):
    watched = watched_page(browser, site.url)
    sign_in(watched, site.world.tokens["garbage"])
    assert "not valid" in watched.page.inner_text("#signin-problem")
    sign_in(watched, site.world.tokens["worker"])
    assert watched.page.locator("#signin-problem").count() == 1
    _accessible(watched)


# -- a participant --------------------------------------------------------------------------

@pytest.mark.browser
def test_participant_sees_its_own_submissions_only(site, browser):
    world = site.world
    watched = watched_page(browser, site.url)
    page = watched.page
    sign_in(watched, world.tokens["participant-a"])
    listing = page.inner_text("#submissions")
    assert "team-a" in listing and "team-b" not in listing and HOSTILE_TEAM not in listing
    for other in ("b-validation", "c-validation", "hostile"):
        watched.goto_refused(f"/submissions/{world.submissions[other]}", 404)
        assert "team-b" not in page.content() and SECRET_LOG not in page.content()
    watched.goto_refused("/dashboard", 403)
    # a visible phase: logs, per-case results and their distribution
    page.goto(f"/submissions/{world.submissions['a-validation']}")
    assert SECRET_LOG in page.inner_text("pre.log")
    assert page.locator("#cases tbody tr").count() == 3
    assert page.locator("figure svg").count() >= 1
    _accessible(watched)
    # the final (hidden) phase: no log, no per-case result, no message naming a case
    page.goto(f"/submissions/{world.submissions['a-final']}")
    content = page.content()
    assert SECRET_LOG not in content and HIDDEN_CASE_MESSAGE not in content
    assert "case-002" not in content and page.locator("#cases").count() == 0
    assert "does not show logs" in page.inner_text("#logs-hidden")
    assert page.inner_text("#reason") == FailureReason.OUTPUT_INVALID.value  # typed reason
    watched.assert_quiet()


@pytest.mark.browser
def test_participant_follows_a_submission_from_queued_to_ranked(site, browser):
    world = site.world
    submission_id = queued_submission(world, "ch-a", "team-a")
    watched = watched_page(browser, site.url)
    page = watched.page
    sign_in(watched, world.tokens["participant-a"])
    page.goto(f"/submissions/{submission_id}")
    assert page.inner_text("#status") == "queued"
    assert "job(s) ahead" in page.inner_text("#queue")
    _accessible(watched)
    _finish(world, submission_id)
    # the page's script sees the state move and reloads by itself
    page.wait_for_selector("#rank", timeout=30_000)
    assert page.inner_text("#status") == "succeeded"
    assert re.fullmatch(r"#\d+ on the leaderboard", page.inner_text("#rank"))
    provenance = page.inner_text(".provenance")
    assert "engine.version" in provenance
    assert "gpu-node-secret" not in provenance and "seal-secret" not in provenance
    page.click("#rank a")
    assert f"{submission_id}" in page.inner_text("#leaderboard")
    watched.assert_quiet()


# -- organisers -----------------------------------------------------------------------------

@pytest.mark.browser
def test_organiser_watches_the_queue_reads_a_failure_cancels_and_reruns(site, browser):
    world = site.world
    queued = queued_submission(world, "ch-a", "team-b")
    other = queued_submission(world, "ch-b", "team-c")
    watched = watched_page(browser, site.url)
    page = watched.page
    sign_in(watched, world.tokens["organiser-a"])
    page.wait_for_url("**/dashboard")
    queue_row = page.locator("#queue tr", has_text="validation").first.inner_text()
    assert "ch-a" in queue_row
    assert "ch-b" not in page.inner_text("#queue")  # another challenge's organisers'
    running = page.inner_text("#running")
    assert "node-1/worker-7" in running and "RUNNING-LOG-LINE" in running
    assert re.search(r"\b[1-9]\d*m \d\ds", running)  # elapsed time: a minute or more
    assert "node-1/worker-7" in page.inner_text("#workers")
    assert FailureReason.OUTPUT_INVALID.value in page.inner_text("#failures")
    assert page.locator(f"#recent-{other}").count() == 0
    _accessible(watched)
    # the live part refreshes the running jobs from the JSON route
    _log_tail(world, world.submissions["running"], "LATER-LOG-LINE")
    page.locator("#running pre.log", has_text="LATER-LOG-LINE").wait_for(timeout=20_000)
    # read a failure in full (organisers see the message that names the case)
    page.click(f"#recent-{world.submissions['a-final']} a")
    assert HIDDEN_CASE_MESSAGE in page.inner_text("#message")
    assert SECRET_LOG in page.inner_text("pre.log")
    # cancel a queued submission
    page.goto("/dashboard")
    page.locator(f"#recent-{queued} button", has_text="Cancel").click()
    page.wait_for_url(f"**/submissions/{queued}")
    assert page.inner_text("#status") == "cancelled"
    # re-run it: a new submission, queued
    page.click("#rerun")
    page.wait_for_url(re.compile(r".*/submissions/\d+$"))
    assert not page.url.endswith(f"/{queued}")
    assert page.inner_text("#status") == "queued"
    # another challenge's submission does not exist here; the final board is visible
    watched.goto_refused(f"/submissions/{other}", 404)
    assert page.goto("/challenges/ch-a/phases/final").status == 200
    assert "not published yet" in _text(watched)
    watched.assert_quiet()


# -- hostile text ---------------------------------------------------------------------------

@pytest.mark.browser
def test_a_hostile_team_name_and_log_render_as_text(site, browser):
    world = site.world
    watched = watched_page(browser, site.url)
    page = watched.page
    page.goto("/challenges/ch-a/phases/validation")
    assert HOSTILE_TEAM in page.inner_text("#leaderboard")
    sign_in(watched, world.tokens["admin"])
    for path in ("/dashboard", f"/submissions/{world.submissions['hostile']}",
                 f"/submissions/{world.submissions['running']}", "/submissions"):
        page.goto(path)
        assert HOSTILE_TEAM in _text(watched), path
        # the only scripts are this server's files; no element came from a name or a log
        sources = page.eval_on_selector_all("script", "nodes => nodes.map(n => n.src)")
        assert all(source.startswith(site.url + "/static/") for source in sources), sources
        assert page.locator("main img").count() == 0
    page.goto("/dashboard")
    _log_tail(world, world.submissions["running"], HOSTILE_LOG + " LIVE")
    page.locator("#running pre.log", has_text="LIVE").wait_for(timeout=20_000)
    assert HOSTILE_LOG + " LIVE" in page.inner_text("#running")  # set by the script, as text
    assert HOSTILE_TEAM in page.inner_text("#running")
    assert page.locator("main img").count() == 0
    watched.assert_quiet()


# -- without a browser: CSRF, CSP, cookies --------------------------------------------------

def _signed_in_client(site, principal: str) -> tuple[httpx.Client, str]:
    client = httpx.Client(base_url=site.url, timeout=30)
    form = client.get("/sign-in").text
    nonce = re.search(r'name="csrf" value="([^"]+)"', form).group(1)
    answer = client.post("/sign-in", data={"token": site.world.tokens[principal],
                                           "csrf": nonce})
    assert answer.status_code == 303
    page = client.get("/submissions").text
    return client, re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def _status(site, submission_id: int) -> str:
    with site.world.sessions() as session:
        return session.get(SubmissionRow, submission_id).status


def test_a_forged_post_is_refused_and_changes_nothing(site):
    queued = queued_submission(site.world, "ch-a", "team-a")
    client, csrf = _signed_in_client(site, "organiser-a")
    one_digit_off = csrf[:-1] + ("1" if csrf.endswith("0") else "0")  # never the token itself
    for forged in ({}, {"csrf": ""}, {"csrf": "x" * 64}, {"csrf": one_digit_off}):
        answer = client.post(f"/submissions/{queued}/cancel", data=forged)
        assert answer.status_code == 403, forged
        assert "text/html" in answer.headers["content-type"]
        answer = client.post(f"/submissions/{queued}/rerun", data=forged)
        assert answer.status_code == 403, forged
    assert _status(site, queued) == SubmissionStatus.QUEUED
    # another session's token does not pass for this one's
    _, other_csrf = _signed_in_client(site, "admin")
    assert client.post(f"/submissions/{queued}/cancel",
                       data={"csrf": other_csrf}).status_code == 403
    assert _status(site, queued) == SubmissionStatus.QUEUED
    answer = client.post(f"/submissions/{queued}/cancel", data={"csrf": csrf})
    assert answer.status_code == 303
    assert _status(site, queued) == SubmissionStatus.CANCELLED



def test_an_admin_retires_a_lost_node_from_the_dashboard_and_no_one_else_may(site):
    """A machine gone for good: its Retire button is an admin's, on a lost node with no
    job; the form carries the session's CSRF token; the node then leaves the table."""
    from engine import nodes
    from engine.db.models import NodeRow
    from engine.node_description import validated
    from tests.test_nodes import GOOD

    with site.world.sessions() as session:
        node = nodes.register(session, validated({**GOOD, "name": "gone-rack-9"}), None, "test")
        node.state = "lost"
        session.commit()
        node_id = node.id
    action = f'action="/nodes/{node_id}/retire"'

    organiser, organiser_csrf = _signed_in_client(site, "organiser-a")
    page = organiser.get("/dashboard").text
    assert "gone-rack-9" in page and action not in page
    refused = organiser.post(f"/nodes/{node_id}/retire", data={"csrf": organiser_csrf})
    assert refused.status_code == 403 and "only an admin" in refused.text

    admin, csrf = _signed_in_client(site, "admin")
    assert action in admin.get("/dashboard").text
    assert admin.post(f"/nodes/{node_id}/retire", data={"csrf": "x" * 64}).status_code == 403
    with site.world.sessions() as session:
        assert session.get(NodeRow, node_id).state == "lost"
    retired = admin.post(f"/nodes/{node_id}/retire", data={"csrf": csrf})
    assert retired.status_code == 303 and retired.headers["location"] == "/dashboard#nodes"
    with site.world.sessions() as session:
        assert session.get(NodeRow, node_id).state == "retired"
    assert "gone-rack-9" not in admin.get("/dashboard").text

def test_sign_in_without_its_nonce_is_refused(site):
    client = httpx.Client(base_url=site.url, timeout=30)
    answer = client.post("/sign-in", data={"token": site.world.tokens["admin"]})
    assert answer.status_code == 403 and "epreuve_token" not in answer.headers.get(
        "set-cookie", "")
    answer = client.post("/sign-in", data={"token": site.world.tokens["admin"],
                                           "csrf": "guessed"})
    assert answer.status_code == 403


def test_a_participant_cannot_rerun_or_cancel_another_teams(site):
    queued = queued_submission(site.world, "ch-a", "team-b")
    client, csrf = _signed_in_client(site, "participant-a")
    assert client.post(f"/submissions/{queued}/cancel",
                       data={"csrf": csrf}).status_code == 404
    own = queued_submission(site.world, "ch-a", "team-a")
    assert client.post(f"/submissions/{own}/rerun", data={"csrf": csrf}).status_code == 403
    assert _status(site, queued) == _status(site, own) == SubmissionStatus.QUEUED


def test_pages_carry_a_policy_without_inline_script(site):
    client = httpx.Client(base_url=site.url, timeout=30)
    assert "set-cookie" not in client.get("/").headers  # no form, no cookie for the public
    for path in ("/", "/challenges/ch-a", "/sign-in", "/submissions/1"):
        answer = client.get(path)
        policy = answer.headers["content-security-policy"]
        assert len(answer.headers.get_list("content-security-policy")) == 1
        script = next(p for p in policy.split(";") if p.strip().startswith("script-src"))
        assert script.split()[1:] == ["'self'"]
        assert "frame-ancestors 'none'" in policy
        assert answer.headers["x-frame-options"] == "DENY"
        assert "<script>" not in answer.text  # no inline script in any template
    api = client.get("/api/v1/challenges")
    assert api.headers["content-security-policy"].startswith("default-src 'none'")


def test_a_revoked_token_signs_its_browser_out(site):
    from engine.tokens import create_token

    with site.world.sessions() as session:
        row, secret = create_token(session, role="participant", team="team-a")
        session.commit()
    client = httpx.Client(base_url=site.url, timeout=30, cookies={"epreuve_token": secret})
    assert client.get("/submissions").status_code == 200
    with site.world.sessions() as session:
        session.get(type(row), row.id).revoked_at = utcnow()
        session.commit()
    answer = client.get("/submissions")
    assert answer.status_code == 401
    assert 'epreuve_token=""' in answer.headers.get("set-cookie", "")


def _live(site, submission_id: int, slug: str, text: str) -> None:
    """The submission's job is running in phase `slug` and its node sent `text` so far."""
    from engine import live_logs

    with site.world.sessions() as session:
        submission = session.get(SubmissionRow, submission_id)
        submission.phase = session.scalar(select(PhaseRow).where(
            PhaseRow.challenge_id == "ch-a", PhaseRow.slug == slug))
        submission.status = SubmissionStatus.RUNNING
        job = submission.jobs[0]
        job.status, job.attempts = JobStatus.RUNNING, 1
        session.commit()
        live_logs.append(site.world.settings.state_dir, job.id, job.attempts, text)


def test_a_live_log_reaches_a_team_only_where_its_phase_shows_logs(site):
    shown_here = queued_submission(site.world, "ch-a", "team-a")
    _live(site, shown_here, "validation", "LIVE-VALIDATION \x1b[31m<b>x</b>\n")
    final = queued_submission(site.world, "ch-a", "team-a")
    _live(site, final, "final", "LIVE-FINAL-SECRET\n")
    client, _ = _signed_in_client(site, "participant-a")
    state = client.get(f"/submissions/{shown_here}/status.json").json()
    assert list(state["logs"].values()) == ["LIVE-VALIDATION \\x1b[31m<b>x</b>\n"]
    page = client.get(f"/submissions/{shown_here}").text
    assert "LIVE-VALIDATION \\x1b[31m&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page
    assert client.get(f"/submissions/{final}/status.json").json()["logs"] == {}
    assert "LIVE-FINAL-SECRET" not in client.get(f"/submissions/{final}").text
    organiser, _ = _signed_in_client(site, "organiser-a")  # organisers read every log
    assert "LIVE-FINAL-SECRET" in organiser.get(f"/submissions/{final}").text
    assert "LIVE-FINAL-SECRET" in organiser.get("/dashboard/live.json").text
