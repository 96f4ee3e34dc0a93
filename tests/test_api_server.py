"""The server's behaviour through a real uvicorn on loopback, on SQLite and PostgreSQL:
phase visibility on every route, one error body, headers, metrics, the commit at the
edge, challenges from YAML text, cancel and re-run, pagination and rate limits."""

from __future__ import annotations

import re
import socket

import httpx
from sqlalchemy import select

from engine.api.app import ApiOptions, create_app
from engine.api.ratelimit import Rate
from engine.db.models import SubmissionRow
from engine.tokens import create_token
from tests.api_fixtures import (
    HIDDEN_CASE_MESSAGE,
    SECRET_LOG,
    build_world,
    challenge_yaml,
    live,  # noqa: F401  (the module's server fixture)
    queued_submission,
    start_server,
    token_row,
)

# ruff: noqa: F811  (pytest fixtures as arguments)


def _get(live, principal, path, **params):
    with live.client(principal) as client:
        return client.get(path, params=params)


def test_a_hidden_phase_shows_participants_no_log_case_or_case_message(live):
    final = live.world.submissions["a-final"]
    every_route = [f"/api/v1/submissions/{final}", f"/api/v1/submissions/{final}/status",
                   f"/api/v1/submissions/{final}/logs", f"/api/v1/submissions/{final}/cases",
                   "/api/v1/submissions"]
    for path in every_route:
        text = _get(live, "participant-a", path).text
        assert SECRET_LOG not in text, path
        assert "case-0" not in text, path  # no case id, nor the stored case-level message
        assert "(31, 32, 32)" not in text, path
    detail = _get(live, "participant-a", f"/api/v1/submissions/{final}").json()
    assert detail["status"] == "failed" and detail["reason"] == "OUTPUT_INVALID"
    assert detail["message"] and "not valid" in detail["message"]
    assert (detail["logs_visible"], detail["cases_visible"], detail["events"]) == (
        False, False, None)
    # the organiser of the challenge reads everything
    organiser = _get(live, "organiser-a", f"/api/v1/submissions/{final}").json()
    assert organiser["message"] == HIDDEN_CASE_MESSAGE and organiser["events"] is not None
    logs = _get(live, "organiser-a", f"/api/v1/submissions/{final}/logs").json()
    assert SECRET_LOG in logs[0]["log_tail"]


def test_a_visible_phase_shows_the_team_its_logs_and_cases(live):
    own = live.world.submissions["a-validation"]
    logs = _get(live, "participant-a", f"/api/v1/submissions/{own}/logs").json()
    assert logs and SECRET_LOG in logs[0]["log_tail"] and "team-a" in logs[0]["log_tail"]
    cases = _get(live, "participant-a", f"/api/v1/submissions/{own}/cases", limit=2).json()
    assert cases["total"] == 3 and len(cases["items"]) == 2 and cases["next_offset"] == 2
    rest = _get(live, "participant-a", f"/api/v1/submissions/{own}/cases", offset=2).json()
    assert len(rest["items"]) == 1 and rest["next_offset"] is None


def test_a_team_lists_only_its_own_submissions(live):
    world = live.world
    for principal, team in (("participant-a", "team-a"), ("participant-b", "team-b")):
        listed = _get(live, principal, "/api/v1/submissions", limit=200).json()
        assert listed["items"] and {s["team"] for s in listed["items"]} == {team}
        text = str(listed)
        others = [k for k in world.submissions if not k.startswith(team[-1])]
        assert all(s["id"] != world.submissions[k] for s in listed["items"] for k in others)
        assert SECRET_LOG not in text
    scoped = _get(live, "organiser-b", "/api/v1/submissions", limit=200).json()
    assert {s["challenge"] for s in scoped["items"]} == {"ch-b"}
    teams = _get(live, "participant-b", "/api/v1/teams").json()
    assert [t["name"] for t in teams["items"]] == ["team-b"]


def test_leaderboards_rank_teams_and_paginate(live):
    board = _get(live, None, "/api/v1/challenges/ch-a/phases/validation/leaderboard").json()
    assert board["total"] == 2 and {e["team"] for e in board["items"]} == {"team-a", "team-b"}
    assert sorted(e["rank"] for e in board["items"]) == [1, 1] or \
        sorted(e["rank"] for e in board["items"]) == [1, 2]
    page = _get(live, None, "/api/v1/challenges/ch-a/phases/validation/leaderboard",
                limit=1).json()
    assert len(page["items"]) == 1 and page["next_offset"] == 1
    unknown = _get(live, None, "/api/v1/challenges/ch-a/phases/nope/leaderboard")
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "NotFound"


def test_public_challenge_views_name_no_server_path(live):
    public = _get(live, None, "/api/v1/challenges/ch-a").json()
    assert public["definition"] is None
    assert str(live.world.root) not in str(public)
    phases = {p["id"]: p for p in public["phases"]}
    assert phases["final"]["leaderboard_published"] is False
    assert phases["final"]["visibility"] == {"logs": False, "per_case": False}
    assert phases["closed"]["open_now"] is False and phases["validation"]["cases"] == 3
    overseen = _get(live, "reviewer-a", "/api/v1/challenges/ch-a").json()
    assert overseen["definition"]["id"] == "ch-a"


def test_every_failure_has_one_error_body(live):
    with live.client("admin") as client:
        failures = {
            404: client.get("/api/v1/nothing-here"),
            405: client.delete("/api/v1/challenges"),
            422: client.get("/api/v1/submissions", params={"limit": 0}),
            415: client.post("/api/v1/challenges", content=b"id: x",
                             headers={"Content-Type": "application/json"}),
            413: client.post("/api/v1/challenges", content=b"#" * (2 << 20),
                             headers={"Content-Type": "application/yaml"}),
        }
        chunked = client.post("/api/v1/challenges", content=iter([b"#" * (1 << 19)] * 3),
                              headers={"Content-Type": "application/yaml"})
    failures[413.1] = chunked  # no Content-Length: counted while read
    types = {404: "NotFound", 405: "MethodNotAllowed", 422: "RequestInvalid",
             415: "UnsupportedChallengeBody", 413: "PayloadTooLarge", 413.1: "PayloadTooLarge"}
    for status, response in failures.items():
        assert response.status_code == int(status), response.text
        assert response.json() == {"error": {"type": types[status], "reason": None,
                                             "message": response.json()["error"]["message"]}}
        assert response.json()["error"]["message"]


def test_an_unexpected_failure_is_a_500_without_host_detail(live):
    app = create_app(live.world.settings)

    def boom() -> None:
        raise RuntimeError(f"cannot open {live.world.root}/secret.key")

    app.add_api_route("/boom", boom)
    server = start_server(live.world, app=app)
    try:
        response = httpx.get(f"{server.url}/boom")
    finally:
        server.stop()
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "InternalError" and error["reason"] is None
    assert str(live.world.root) not in response.text and "Traceback" not in response.text


def test_security_headers_no_store_and_no_cors(live):
    with live.client("participant-a") as client:
        signed = client.get("/api/v1/submissions", headers={"Origin": "https://evil.example"})
    anonymous = httpx.get(f"{live.url}/api/v1/challenges",
                          headers={"Origin": "https://evil.example"})
    for response in (signed, anonymous):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        assert response.headers["referrer-policy"] == "no-referrer"
        assert "access-control-allow-origin" not in response.headers
    assert signed.headers["cache-control"] == "no-store"


def test_openapi_docs_health_and_metrics_by_route_template(live):
    assert httpx.get(f"{live.url}/healthz").json() == {"status": "ok", "database": "ok"}
    spec = httpx.get(f"{live.url}/openapi.json").json()
    assert "/api/v1/submissions/{submission_id}/status" in spec["paths"]
    assert httpx.get(f"{live.url}/docs").headers["content-type"].startswith("text/html")
    own = live.world.submissions["a-validation"]
    _get(live, "participant-a", f"/api/v1/submissions/{own}")
    _get(live, None, f"/api/v1/not-a-route/{own}")
    text = httpx.get(f"{live.url}/metrics").text
    assert re.search(r'epreuve_http_requests_total\{method="GET",route="/api/v1/submissions/'
                     r'\{submission_id\}",status="200"\} [1-9]', text)
    assert 'route="unmatched"' in text
    labels = re.findall(r'route="([^"]*)"', text)
    assert labels and not any(re.search(r"/\d", label) for label in labels)


def test_a_tokens_use_is_recorded_at_once_even_when_the_request_fails(live):
    """Authentication commits the token's last use apart from the request's own unit of
    work: a long request (a worker's claim long-poll) never holds that write open."""
    with live.world.sessions() as session:
        _, secret = create_token(session, "admin")
        session.commit()
    live.world.tokens["fresh"] = secret
    with live.client("fresh") as client:
        assert client.get("/api/v1/submissions/987654").status_code == 404
        assert token_row(live.world, "fresh").last_used_at is not None


def test_an_organiser_creates_only_the_challenge_its_token_names(live):
    yaml_type = {"Content-Type": "application/yaml"}
    with live.client("organiser-new") as client:
        created = client.post("/api/v1/challenges", content=challenge_yaml("ch-new"),
                              headers=yaml_type)
        assert created.status_code == 201, created.text
        assert [p["id"] for p in created.json()["phases"]] == ["validation", "final", "closed"]
        other = client.post("/api/v1/challenges", content=challenge_yaml("ch-other"),
                            headers=yaml_type)
        assert other.status_code == 403
        again = client.post("/api/v1/challenges", content=challenge_yaml("ch-new"),
                            headers=yaml_type)
        assert again.status_code == 409 and again.json()["error"]["type"] == "Conflict"
        mismatch = client.put("/api/v1/challenges/ch-new", content=challenge_yaml("ch-a"),
                              headers=yaml_type)
        assert mismatch.status_code == 422
    assert httpx.get(f"{live.url}/api/v1/challenges/ch-other").status_code == 404


def test_a_challenge_cannot_name_a_dataset_outside_the_servers_folder(live):
    escapes = {"parent": challenge_yaml("ch-escape", "../"),
               "absolute": challenge_yaml("ch-escape", f"{live.world.root}/data/"),
               "etc": challenge_yaml("ch-escape").replace("path: validation", "path: /etc"),
               "nul": challenge_yaml("ch-escape").replace("path: validation",
                                                          'path: "val\\0idation"')}
    with live.client("admin") as client:
        for name, text in escapes.items():
            response = client.post("/api/v1/challenges", content=text,
                                   headers={"Content-Type": "application/yaml"})
            if name == "absolute":  # inside the folder, written absolutely: accepted
                assert response.status_code == 201, response.text
                continue
            assert response.status_code == 422, (name, response.text)
            assert response.json()["error"]["type"] == "ChallengeError"
        aliases = client.post("/api/v1/challenges", content="a: &x [1]\nb: *x\n",
                              headers={"Content-Type": "text/yaml"})
    assert aliases.status_code == 422 and "aliases" in aliases.json()["error"]["message"]


def test_cancel_then_cancel_again_and_rerun(live):
    queued = queued_submission(live.world, "ch-a", "team-a")
    with live.client("participant-a") as client:
        status = client.get(f"/api/v1/submissions/{queued}/status").json()
        assert status["status"] == "queued" and status["queue"]["jobs_ahead"] >= 0
        cancelled = client.post(f"/api/v1/submissions/{queued}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        again = client.post(f"/api/v1/submissions/{queued}/cancel")
        assert again.status_code == 409 and again.json()["error"]["type"] == "SubmissionRefused"
    original = live.world.submissions["a-validation"]
    with live.client("organiser-a") as client:
        rerun = client.post(f"/api/v1/submissions/{original}/rerun")
    assert rerun.status_code == 201 and rerun.json()["id"] != original
    assert rerun.json()["team"] == "team-a" and rerun.json()["status"] == "queued"
    with live.world.sessions() as session:
        new = session.get(SubmissionRow, rerun.json()["id"])
        old = session.get(SubmissionRow, original)
        assert new.counts_against_quota is False and new.image_pk == old.image_pk
        assert old.status == "succeeded"
        assert session.scalar(select(SubmissionRow.id).where(
            SubmissionRow.id == new.id)) is not None


def test_expensive_routes_are_rate_limited_per_token(live):
    server = start_server(live.world, ApiOptions(rate=Rate(burst=2, per_second=0.01)))
    board = "/api/v1/challenges/ch-a/phases/validation/leaderboard"
    try:
        with httpx.Client(base_url=server.url, headers={
                "Authorization": f"Bearer {live.world.tokens['participant-a']}"}) as client:
            statuses = [client.get(board).status_code for _ in range(3)]
            limited = client.get(board)
        other = httpx.get(f"{server.url}{board}", headers={
            "Authorization": f"Bearer {live.world.tokens['participant-b']}"})
    finally:
        server.stop()
    assert statuses == [200, 200, 429]
    assert limited.json()["error"]["type"] == "RateLimited"
    assert int(limited.headers["retry-after"]) >= 1
    assert other.status_code == 200  # another token has its own bucket


def test_hostile_ids_are_refused_never_a_server_error(live):
    paths = ["/api/v1/challenges/%00", "/api/v1/challenges/ch-a/phases/%00x/leaderboard",
             "/api/v1/challenges/" + "a" * 5000, "/api/v1/submissions?challenge=%00",
             "/api/v1/submissions?phase=%E2%80%AE", "/api/v1/submissions/99999999999999999999",
             "/api/v1/submissions/-1/status", "/api/v1/teams/2147483648",
             "/api/v1/submissions?limit=100000000000000000000"]
    with live.client("admin") as client:
        for path in paths:
            response = client.get(path)
            assert response.status_code in (404, 422), (path, response.text)
            assert response.json()["error"]["type"] in ("NotFound", "RequestInvalid")


def test_worker_routes_take_only_worker_tokens(live):
    from fastapi import Depends

    from engine.api.auth import authenticated

    app = create_app(live.world.settings)
    app.add_api_route("/api/v1/worker/ping", lambda: {"pong": True},
                      dependencies=[Depends(authenticated(worker=True))])
    server = start_server(live.world, app=app)
    try:
        statuses = {name: httpx.get(f"{server.url}/api/v1/worker/ping", headers={
            "Authorization": f"Bearer {live.world.tokens[name]}"}).status_code
            for name in ("worker", "admin", "participant-a", "revoked")}
    finally:
        server.stop()
    assert statuses == {"worker": 200, "admin": 403, "participant-a": 403, "revoked": 401}


def test_a_database_that_stops_answering_is_503_with_the_one_body(tmp_path):
    """A request whose database is gone (a PostgreSQL restart, a pool with no free
    connection) gets 503 and Retry-After in the one error body: the platform's state, not a
    500 and not the client's fault."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker

    world = build_world(tmp_path / "world", "sqlite")
    server = start_server(world)
    try:
        with socket.socket() as probe:  # a loopback port where nothing listens
            probe.bind(("127.0.0.1", 0))
            dead_port = probe.getsockname()[1]
        gone = create_engine(f"postgresql+psycopg://epreuve@127.0.0.1:{dead_port}/gone",
                             connect_args={"connect_timeout": 2})
        server.server.config.app.state.sessions = sessionmaker(gone)
        response = httpx.get(f"{server.url}/api/v1/challenges", timeout=30)
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        assert response.json() == {"error": {
            "type": "Unavailable", "reason": None,
            "message": "the server's database is busy or unreachable; try again in a few "
                       "seconds"}}
    finally:
        server.stop()
