"""/api/v1/challenges: read the public parts; organisers create or update from YAML text.

A challenge is sent as its YAML text (the same file `epreuve challenge create` reads).
Its datasets are named by paths on the server: relative to the server's datasets folder
(Settings.datasets_dir), and refused anywhere else, so a challenge cannot point at files
outside it. The datasets must already be sealed there.

Who may write: an admin creates or updates any challenge; an organiser updates the
challenges in its token's scope, and creates a new one only if its token was scoped to
that id beforehand (an admin hands out `token create --role organiser --challenge NEW`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from engine.api import ratelimit
from engine.api.access import challenge_or_404
from engine.api.auth import OPTIONAL_TOKEN, Principal, anonymous_allowed, require_role
from engine.api.database import DbSession
from engine.api.errors import AUTH_RESPONSES, NOT_FOUND, ErrorBody
from engine.api.pagination import Limit, Offset, Page, Slug, page_of, paged_rows
from engine.challenges import MAX_FILE_BYTES, Challenge, ChallengeError, load_challenge_text
from engine.db.models import ChallengeRow
from engine.errors import Conflict
from engine.submissions import challenge_definition, register_loaded
from engine.tokens import Forbidden

router = APIRouter(prefix="/api/v1/challenges", tags=["challenges"])
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/plain")
YAML_BODY = {"requestBody": {"required": True, "content": {
    kind: {"schema": {"type": "string", "maxLength": MAX_FILE_BYTES}} for kind in YAML_TYPES}}}


class QuotaOut(BaseModel):
    submissions: int
    per_seconds: float


class VisibilityOut(BaseModel):
    logs: bool
    per_case: bool


class PhaseOut(BaseModel):
    id: str
    title: str
    opens: datetime | None
    closes: datetime | None
    open_now: bool
    final: bool
    cases: int
    sample_cases: list[str]
    quota: QuotaOut
    visibility: VisibilityOut
    time_per_case_seconds: float
    gpus: int
    leaderboard_published: bool


class ChallengeOut(BaseModel):
    id: str
    title: str
    task: str
    output: dict[str, Any]
    ranking: dict[str, Any]
    phases: list[PhaseOut]
    # the whole stored definition (server paths included): to those who oversee it
    definition: dict[str, Any] | None = None


def challenge_out(row: ChallengeRow, principal: Principal | None) -> ChallengeOut:
    from engine.api.access import leaderboard_hidden, published_phases

    challenge = challenge_definition(row)
    cases = {p.slug: len(p.case_ids) for p in row.phases}
    now = datetime.now(UTC)
    published = published_phases(row)
    phases = [PhaseOut(
        id=p.id, title=p.title, opens=p.opens, closes=p.closes, open_now=p.is_open(now),
        final=p.final, cases=cases.get(p.id, 0), sample_cases=list(p.sample_cases),
        quota=QuotaOut(submissions=p.quota.submissions, per_seconds=p.quota_period
                       .total_seconds()),
        visibility=VisibilityOut(logs=p.visibility.logs and not p.final,
                                 per_case=p.visibility.per_case and not p.final),
        time_per_case_seconds=p.limits.time_per_case, gpus=p.limits.gpus,
        leaderboard_published=not leaderboard_hidden(
            p, now, published=p.id in published)) for p in challenge.phases]
    return ChallengeOut(
        id=challenge.id, title=challenge.title, task=challenge.task,
        output=challenge.output.model_dump(mode="json"),
        ranking=challenge.ranking.model_dump(mode="json"), phases=phases,
        definition=row.definition if principal and principal.oversees(row.id) else None)


@router.get("", response_model=Page[ChallengeOut], responses=AUTH_RESPONSES,
            openapi_extra=OPTIONAL_TOKEN)
def list_challenges(session: DbSession, limit: Limit = 50, offset: Offset = 0,
                    principal: Principal | None = Depends(anonymous_allowed())) -> dict:
    rows, total = paged_rows(session, select(ChallengeRow).order_by(ChallengeRow.id),
                             limit, offset)
    return page_of([challenge_out(r, principal) for r in rows], total, limit, offset)


@router.get("/{challenge_id}", response_model=ChallengeOut,
            responses={**AUTH_RESPONSES, **NOT_FOUND}, openapi_extra=OPTIONAL_TOKEN)
def get_challenge(challenge_id: Slug, session: DbSession,
                  principal: Principal | None = Depends(anonymous_allowed())) -> ChallengeOut:
    row, _ = challenge_or_404(session, challenge_id)
    return challenge_out(row, principal)


WRITE_RESPONSES = {**AUTH_RESPONSES, 409: {"model": ErrorBody}, 413: {"model": ErrorBody},
                   422: {"model": ErrorBody, "description": "The challenge is not valid"},
                   429: {"model": ErrorBody}}


@router.post("", response_model=ChallengeOut, status_code=201, openapi_extra=YAML_BODY,
             responses=WRITE_RESPONSES)
async def create_challenge(request: Request, session: DbSession,
                           principal: Principal = Depends(require_role("admin", "organiser"))
                           ) -> ChallengeOut:
    """Create a challenge from its YAML text; 409 if its id exists (PUT updates)."""
    ratelimit.enforce(request, "challenge-write")
    body = await request.body()

    def create() -> ChallengeOut:
        challenge, locator = _parse(request, body)
        _may_write(principal, challenge.id)
        if session.get(ChallengeRow, challenge.id) is not None:
            raise Conflict(f"challenge {challenge.id} exists: PUT /api/v1/challenges/"
                           f"{challenge.id} to update it")
        row = register_loaded(session, challenge, locator, principal.actor)
        return challenge_out(row, principal)

    return await run_in_threadpool(create)  # reads datasets, may pin an image: off the loop


@router.put("/{challenge_id}", response_model=ChallengeOut, openapi_extra=YAML_BODY,
            responses=WRITE_RESPONSES)
async def put_challenge(challenge_id: Slug, request: Request, session: DbSession,
                        force: bool = Query(False, description="apply a change to a challenge "
                                            "that has submissions (recorded in its history)"),
                        principal: Principal = Depends(require_role("admin", "organiser"))
                        ) -> ChallengeOut:
    """Create or update a challenge from its YAML text; its `id` must be the path's."""
    ratelimit.enforce(request, "challenge-write")
    _may_write(principal, challenge_id)
    body = await request.body()

    def update() -> ChallengeOut:
        challenge, locator = _parse(request, body)
        if challenge.id != challenge_id:
            raise ChallengeError(f"the file's id is {challenge.id!r}, the path's "
                                 f"{challenge_id!r}")
        row = register_loaded(session, challenge, locator, principal.actor, force=force)
        return challenge_out(row, principal)

    return await run_in_threadpool(update)


def _may_write(principal: Principal, challenge_id: str) -> None:
    if not principal.manages(challenge_id):
        raise Forbidden(f"this {principal.role} token is not scoped to challenge "
                        f"{challenge_id[:64]!r}")


def _parse(request: Request, body: bytes) -> tuple[Challenge, Any]:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in YAML_TYPES:
        raise UnsupportedChallengeBody(f"send the challenge's YAML text as one of "
                                       f"{', '.join(YAML_TYPES)}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ChallengeError("challenge.yaml: not UTF-8 text") from None
    root: Path = request.app.state.settings.datasets_dir.resolve()
    challenge, locator = load_challenge_text(text, "challenge.yaml", root)
    for index, phase in enumerate(challenge.phases):
        if not Path(phase.dataset.path).resolve().is_relative_to(root):
            raise ChallengeError(locator.describe(
                ("phases", index, "dataset", "path"), f"phase {phase.id}: a dataset must be "
                "sealed in the server's datasets folder: give its path relative to that "
                "folder"))
    return challenge, locator


class UnsupportedChallengeBody(ChallengeError):
    http_status = 415
