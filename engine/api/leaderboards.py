"""/api/v1/challenges/{id}/phases/{phase}/leaderboard: public, as visibility allows.

A final phase's ranking is hidden until the phase closes or an organiser publishes it
(POST .../leaderboard/publish, .../leaderboard/unpublish: engine/publication.py), except
to those who oversee the challenge. Computing a ranking reads every team's per-case
results: rate limited.
"""

from __future__ import annotations

import math
from typing import Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from engine.api import ratelimit
from engine.api.access import (
    challenge_or_404,
    phase_of,
    published_phases,
    require_leaderboard_visible,
    require_manages,
)
from engine.api.auth import OPTIONAL_TOKEN, Principal, anonymous_allowed, authenticated
from engine.api.database import DbSession
from engine.api.errors import AUTH_RESPONSES, NOT_FOUND, ErrorBody
from engine.api.pagination import Limit, Offset, Page, Slug, page_of
from engine.leaderboard_cache import LeaderboardCache
from engine.publication import set_published

router = APIRouter(prefix="/api/v1/challenges", tags=["leaderboards"])
BOARDS = LeaderboardCache()  # per server process: recomputed only when its inputs change


class EntryOut(BaseModel):
    rank: int
    team: str
    submission_id: int
    scores: dict[str, float | None]  # None: not a finite number
    metric_ranks: dict[str, int]
    n_failed: int
    runtime_per_case: float | None
    prize_eligible: bool
    source_check: Literal["verified", "differs", "not checked"] = "not checked"  # prize check


@router.get("/{challenge_id}/phases/{phase}/leaderboard", response_model=Page[EntryOut],
            responses={**AUTH_RESPONSES, **NOT_FOUND, 429: {"model": ErrorBody}},
            openapi_extra=OPTIONAL_TOKEN)
def get_leaderboard(challenge_id: Slug, phase: Slug, request: Request, session: DbSession,
                    limit: Limit = 50, offset: Offset = 0,
                    principal: Principal | None = Depends(anonymous_allowed())) -> dict:
    row, challenge = challenge_or_404(session, challenge_id)
    require_leaderboard_visible(principal, challenge_id, phase_of(challenge, phase),
                                published=phase in published_phases(row))
    ratelimit.enforce(request, "leaderboard")
    entries = BOARDS.get(session, challenge_id, phase)
    shown = [EntryOut(rank=e.rank, team=e.team, submission_id=e.submission_id,
                      scores={k: _finite(v) for k, v in e.scores.items()},
                      metric_ranks=e.metric_ranks, n_failed=e.n_failed,
                      runtime_per_case=e.runtime_per_case, prize_eligible=e.prize_eligible,
                      source_check=e.source_check)
             for e in entries[offset:offset + limit]]
    return page_of(shown, len(entries), limit, offset)


class Publication(BaseModel):
    published: bool
    changed: bool  # False: it already was (the call is idempotent)


PUBLISH_RESPONSES = {**AUTH_RESPONSES, **NOT_FOUND, 409: {
    "model": ErrorBody, "description": "Not a final phase: its leaderboard is always public"}}


@router.post("/{challenge_id}/phases/{phase}/leaderboard/publish", response_model=Publication,
             responses=PUBLISH_RESPONSES)
def publish(challenge_id: Slug, phase: Slug, session: DbSession,
            principal: Principal = Depends(authenticated())) -> Publication:
    """Publish a final phase's leaderboard before it closes (its organisers, admins)."""
    return _publication(session, principal, challenge_id, phase, True)


@router.post("/{challenge_id}/phases/{phase}/leaderboard/unpublish",
             response_model=Publication, responses=PUBLISH_RESPONSES)
def unpublish(challenge_id: Slug, phase: Slug, session: DbSession,
              principal: Principal = Depends(authenticated())) -> Publication:
    """Hide it again until the phase closes (undoes an early publication only)."""
    return _publication(session, principal, challenge_id, phase, False)


def _publication(session, principal: Principal, challenge_id: str, phase: str,
                 published: bool) -> Publication:
    _, challenge = challenge_or_404(session, challenge_id)
    phase_of(challenge, phase)
    require_manages(principal, challenge_id, "publish a leaderboard")
    changed = set_published(session, challenge_id, phase, published, principal.actor)
    return Publication(published=published, changed=changed)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
