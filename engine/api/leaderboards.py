"""/api/v1/challenges/{id}/phases/{phase}/leaderboard: public, as visibility allows.

A final phase's ranking is hidden until the phase closes, except to those who oversee
the challenge. Computing a ranking reads every team's per-case results: rate limited.
"""

from __future__ import annotations

import math
from typing import Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from engine.api import ratelimit
from engine.api.access import challenge_or_404, phase_of, require_leaderboard_visible
from engine.api.auth import OPTIONAL_TOKEN, Principal, anonymous_allowed
from engine.api.database import DbSession
from engine.api.errors import AUTH_RESPONSES, NOT_FOUND, ErrorBody
from engine.api.pagination import Limit, Offset, Page, Slug, page_of
from engine.leaderboard_cache import LeaderboardCache

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
    _, challenge = challenge_or_404(session, challenge_id)
    require_leaderboard_visible(principal, challenge_id, phase_of(challenge, phase))
    ratelimit.enforce(request, "leaderboard")
    entries = BOARDS.get(session, challenge_id, phase)
    shown = [EntryOut(rank=e.rank, team=e.team, submission_id=e.submission_id,
                      scores={k: _finite(v) for k, v in e.scores.items()},
                      metric_ranks=e.metric_ranks, n_failed=e.n_failed,
                      runtime_per_case=e.runtime_per_case, prize_eligible=e.prize_eligible,
                      source_check=e.source_check)
             for e in entries[offset:offset + limit]]
    return page_of(shown, len(entries), limit, offset)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
