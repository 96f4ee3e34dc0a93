"""The authorisation matrix, as a table: every route x every principal x own or other
team / challenge, on SQLite and on PostgreSQL, through a real server on loopback.

Rows are routes with a target; columns are principals. Another team's submission, or one
outside an organiser's scope, is 404 (never 403: ids do not leak); a revoked, expired or
unknown token is 401 everywhere a token is read; a worker token is 403 everywhere.
"""

from __future__ import annotations

import pytest

from tests.api_fixtures import (
    PRINCIPALS,
    challenge_yaml,
    live,  # noqa: F401  (the module's server fixture)
    queued_submission,
)

# principal order: anonymous admin org-a org-b rev-a part-a part-b worker revoked expired garbage
PUBLIC = (200, 200, 200, 200, 200, 200, 200, 403, 401, 401, 401)
HIDDEN_BOARD = (403, 200, 200, 403, 200, 403, 403, 403, 401, 401, 401)
SIGNED_IN = (401, 200, 200, 200, 200, 200, 200, 403, 401, 401, 401)
OWN_SUBMISSION = (401, 200, 200, 404, 200, 200, 404, 403, 401, 401, 401)
OWN_HIDDEN_DETAIL = (401, 200, 200, 404, 200, 403, 404, 403, 401, 401, 401)
OTHER_CHALLENGE = (401, 200, 404, 200, 404, 404, 404, 403, 401, 401, 401)
CANCEL = (401, 200, 200, 404, 403, 200, 404, 403, 401, 401, 401)
RERUN = (401, 201, 201, 404, 403, 403, 404, 403, 401, 401, 401)
CREATE = (401, 201, 403, 403, 403, 403, 403, 403, 401, 401, 401)
UPDATE = (401, 200, 200, 403, 403, 403, 403, 403, 401, 401, 401)
TEAM_A = (401, 200, 200, 404, 200, 200, 404, 403, 401, 401, 401)
PUBLISH = (401, 200, 200, 403, 403, 403, 403, 403, 401, 401, 401)

# (name, method, path with {placeholders}, expected statuses by principal)
ROUTES = [
    ("list challenges", "GET", "/api/v1/challenges", PUBLIC),
    ("one challenge", "GET", "/api/v1/challenges/ch-a", PUBLIC),
    ("visible leaderboard", "GET", "/api/v1/challenges/ch-a/phases/validation/leaderboard",
     PUBLIC),
    ("closed phase leaderboard", "GET", "/api/v1/challenges/ch-a/phases/closed/leaderboard",
     PUBLIC),
    ("final leaderboard", "GET", "/api/v1/challenges/ch-a/phases/final/leaderboard",
     HIDDEN_BOARD),
    ("list submissions", "GET", "/api/v1/submissions", SIGNED_IN),
    ("team a's submission", "GET", "/api/v1/submissions/{a-validation}", OWN_SUBMISSION),
    ("team a's status", "GET", "/api/v1/submissions/{a-validation}/status", OWN_SUBMISSION),
    ("team a's logs", "GET", "/api/v1/submissions/{a-validation}/logs", OWN_SUBMISSION),
    ("team a's cases", "GET", "/api/v1/submissions/{a-validation}/cases", OWN_SUBMISSION),
    ("team a's final submission", "GET", "/api/v1/submissions/{a-final}", OWN_SUBMISSION),
    ("team a's final status", "GET", "/api/v1/submissions/{a-final}/status", OWN_SUBMISSION),
    ("team a's final logs", "GET", "/api/v1/submissions/{a-final}/logs", OWN_HIDDEN_DETAIL),
    ("team a's final cases", "GET", "/api/v1/submissions/{a-final}/cases", OWN_HIDDEN_DETAIL),
    ("team c's submission (ch-b)", "GET", "/api/v1/submissions/{c-validation}",
     OTHER_CHALLENGE),
    ("team c's logs (ch-b)", "GET", "/api/v1/submissions/{c-validation}/logs",
     OTHER_CHALLENGE),
    ("list teams", "GET", "/api/v1/teams", SIGNED_IN),
    ("team a", "GET", "/api/v1/teams/{team-a}", TEAM_A),
    ("cancel team a's", "POST", "/api/v1/submissions/{queued}/cancel", CANCEL),
    ("re-run team a's", "POST", "/api/v1/submissions/{a-validation}/rerun", RERUN),
    ("create a challenge", "POST", "/api/v1/challenges", CREATE),
    ("update ch-a", "PUT", "/api/v1/challenges/ch-a", UPDATE),
    # after every read of the final board; unpublished last: the board ends hidden again
    ("publish ch-a final", "POST", "/api/v1/challenges/ch-a/phases/final/leaderboard/publish",
     PUBLISH),
    ("unpublish ch-a final", "POST",
     "/api/v1/challenges/ch-a/phases/final/leaderboard/unpublish", PUBLISH),
]
CASES = [pytest.param(route, principal, id=f"{route[0]}-{principal}")
         for route in ROUTES for principal in PRINCIPALS]


def _request(live, route, principal: str):  # noqa: F811
    _, method, path, _ = route
    world = live.world
    values = {**world.submissions, **{k: str(v) for k, v in world.teams.items()}}
    if "{queued}" in path:
        values["queued"] = queued_submission(world, "ch-a", "team-a")
    path = path.format_map({k: str(v) for k, v in values.items()})
    content, headers = None, {}
    if method in ("POST", "PUT") and "challenges" in path and "leaderboard" not in path:
        new_id = "ch-a" if path.endswith("ch-a") else f"ch-new-{principal}"
        content, headers = challenge_yaml(new_id), {"Content-Type": "application/yaml"}
    with live.client(None if principal == "anonymous" else principal) as client:
        return client.request(method, path, content=content, headers=headers)


@pytest.mark.parametrize(("route", "principal"), CASES)
def test_authorisation_matrix(live, route, principal):  # noqa: F811
    response = _request(live, route, principal)
    expected = route[3][PRINCIPALS.index(principal)]
    assert response.status_code == expected, response.text
    if expected >= 400:
        error = response.json()["error"]
        assert set(error) == {"type", "reason", "message"}
        assert error["message"]
    if expected == 401:
        assert error["type"] == "Unauthenticated"
    if expected == 403:
        assert error["type"] == "Forbidden"
    if expected == 404:
        assert error["type"] == "NotFound"
