"""Publishing a final phase's leaderboard before it closes (engine/publication.py), through
a real server on loopback: the API routes and the leaderboard page's form.

Organisers publish (and hide again); the public then reads the board; a second call changes
nothing and records nothing; participants, reviewers and another challenge's organisers
cannot (403) and see no button; a forged form changes nothing; a phase that is not final
is refused (409). The leaderboard cache serves the published board at once.
"""

from __future__ import annotations

import re

import httpx
import pytest
from sqlalchemy import select

from engine.api.app import ApiOptions
from engine.api.ratelimit import Rate
from engine.db.models import EventRow, ImageRow, PhaseRow
from engine.web import create_site
from tests.api_fixtures import build_world, finished_submission, start_server

FINAL = "/api/v1/challenges/ch-a/phases/final/leaderboard"
FINAL_PAGE = "/challenges/ch-a/phases/final"


@pytest.fixture(params=["sqlite", "postgres"])
def site(request, tmp_path):
    world = build_world(tmp_path, request.param)
    with world.sessions() as session:  # a team ranked on the final phase
        finished_submission(session, "ch-a", "final", "team-b",
                            session.scalar(select(ImageRow)), failed=False)
        session.commit()
    server = start_server(world, app=create_site(world.settings, ApiOptions(
        rate=Rate(burst=10_000, per_second=1000.0))))
    yield server
    server.stop()


def _events(site) -> list[tuple[str, str, str]]:
    with site.world.sessions() as session:
        phase = session.scalar(select(PhaseRow.id).where(PhaseRow.challenge_id == "ch-a",
                                                         PhaseRow.slug == "final"))
        return [(e.from_state, e.to_state, e.actor) for e in session.scalars(
            select(EventRow).where(EventRow.entity == "phase", EventRow.entity_id == phase)
            .order_by(EventRow.id))]


def _board(site, principal: str | None = None) -> httpx.Response:
    with site.client(principal) as client:
        return client.get(FINAL)


def test_an_organiser_publishes_and_the_public_reads_it(site):
    before = _board(site, "organiser-a")  # the organiser's read fills the leaderboard cache
    assert before.status_code == 200
    assert _board(site).status_code == 403
    with site.client("organiser-a") as client:
        answer = client.post(FINAL + "/publish")
        assert answer.status_code == 200 and answer.json() == {"published": True,
                                                               "changed": True}
        again = client.post(FINAL + "/publish")
        assert again.json() == {"published": True, "changed": False}  # idempotent
    public = _board(site)
    assert public.status_code == 200
    assert public.json()["items"] == before.json()["items"]
    assert public.json()["items"], "the board has teams"
    with site.client() as client:
        phases = client.get("/api/v1/challenges/ch-a").json()["phases"]
    assert {p["id"]: p["leaderboard_published"] for p in phases}["final"] is True
    events = _events(site)
    assert len(events) == 1 and events[0][:2] == ("hidden", "published")
    assert "organiser" in events[0][2]


def test_hiding_it_again_takes_it_from_the_public(site):
    with site.client("admin") as client:
        assert client.post(FINAL + "/publish").status_code == 200
        assert _board(site).status_code == 200
        assert client.post(FINAL + "/unpublish").json() == {"published": False,
                                                            "changed": True}
        assert client.post(FINAL + "/unpublish").json()["changed"] is False
    assert _board(site).status_code == 403
    assert _board(site, "reviewer-a").status_code == 200  # those who oversee still read it
    assert [e[:2] for e in _events(site)] == [("hidden", "published"),
                                               ("published", "hidden")]


def test_who_may_not_publish_changes_nothing(site):
    for principal in ("participant-a", "reviewer-a", "organiser-b"):
        with site.client(principal) as client:
            answer = client.post(FINAL + "/publish")
        assert answer.status_code == 403, principal
        assert answer.json()["error"]["type"] == "Forbidden"
    assert _board(site).status_code == 403 and _events(site) == []


def test_a_phase_that_is_not_final_or_does_not_exist_is_refused(site):
    with site.client("organiser-a") as client:
        answer = client.post("/api/v1/challenges/ch-a/phases/validation/leaderboard/publish")
        assert answer.status_code == 409
        assert "not a final phase" in answer.json()["error"]["message"]
        assert client.post("/api/v1/challenges/ch-a/phases/nope/leaderboard/publish"
                           ).status_code == 404
        assert client.post("/api/v1/challenges/nope/phases/final/leaderboard/publish"
                           ).status_code == 404
    assert _events(site) == []


# -- the page's form -------------------------------------------------------------------------

def test_the_form_publishes_with_its_csrf_token_only(site):
    client, csrf = _browser(site, "organiser-a")
    page = client.get(FINAL_PAGE).text
    assert 'id="publish"' in page and "not published yet" in page
    for forged in ({}, {"csrf": ""}, {"csrf": csrf[:-1] + ("0" if csrf[-1] != "0" else "1")}):
        answer = client.post(FINAL_PAGE + "/publish", data=forged)
        assert answer.status_code == 403 and "text/html" in answer.headers["content-type"]
    assert _events(site) == [] and _board(site).status_code == 403
    answer = client.post(FINAL_PAGE + "/publish", data={"csrf": csrf})
    assert answer.status_code == 303 and answer.headers["location"] == FINAL_PAGE
    public = httpx.get(site.url + FINAL_PAGE)
    assert public.status_code == 200 and 'id="leaderboard"' in public.text
    assert 'id="publish"' not in public.text and 'id="unpublish"' not in public.text
    page = client.get(FINAL_PAGE).text
    assert 'id="unpublish"' in page and 'id="published-early"' in page
    assert client.post(FINAL_PAGE + "/unpublish", data={"csrf": csrf}).status_code == 303
    assert httpx.get(site.url + FINAL_PAGE).status_code == 403


def test_no_button_and_no_publishing_for_those_who_may_not(site):
    for principal in ("reviewer-a", "participant-a"):
        client, csrf = _browser(site, principal)
        page = client.get(FINAL_PAGE)
        assert 'id="publish"' not in page.text, principal
        answer = client.post(FINAL_PAGE + "/publish", data={"csrf": csrf})
        assert answer.status_code == 403, principal
    assert _events(site) == [] and _board(site).status_code == 403


def _browser(site, principal: str) -> tuple[httpx.Client, str]:
    """A signed-in cookie session and its CSRF token, as a browser holds them."""
    client = httpx.Client(base_url=site.url, timeout=30)
    nonce = re.search(r'name="csrf" value="([^"]+)"', client.get("/sign-in").text).group(1)
    client.post("/sign-in", data={"token": site.world.tokens[principal], "csrf": nonce})
    page = client.get("/submissions").text
    return client, re.search(r'name="csrf" value="([^"]+)"', page).group(1)
