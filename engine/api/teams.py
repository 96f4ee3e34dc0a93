"""/api/v1/teams: admins list all; organisers and reviewers the teams that submitted to
their challenges; a participant sees its own team only."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends
from pydantic import BaseModel
from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from engine.api.auth import Principal, authenticated
from engine.api.database import DbSession
from engine.api.errors import AUTH_RESPONSES, NOT_FOUND
from engine.api.pagination import Limit, Offset, Page, RowId, page_of, paged_rows
from engine.db.models import PhaseRow, SubmissionRow, TeamRow
from engine.errors import NotFound
from engine.tokens import Role

router = APIRouter(prefix="/api/v1/teams", tags=["teams"])


class TeamOut(BaseModel):
    id: int
    name: str
    created_at: datetime


def _visible_teams(principal: Principal) -> Select:
    query = select(TeamRow)
    if principal.role == Role.PARTICIPANT:
        return query.where(TeamRow.id == principal.team_id)
    if principal.role == Role.ADMIN:
        return query
    submitted = (select(SubmissionRow.team_id).join(PhaseRow, SubmissionRow.phase_id == PhaseRow.id)
                 .where(PhaseRow.challenge_id.in_(sorted(principal.challenge_ids))))
    return query.where(TeamRow.id.in_(submitted))


@router.get("", response_model=Page[TeamOut], responses=AUTH_RESPONSES)
def list_teams(session: DbSession, limit: Limit = 50, offset: Offset = 0,
               principal: Principal = Depends(authenticated())) -> dict:
    rows, total = paged_rows(session, _visible_teams(principal).order_by(TeamRow.id),
                             limit, offset)
    return page_of([_out(r) for r in rows], total, limit, offset)


@router.get("/{team_id}", response_model=TeamOut, responses={**AUTH_RESPONSES, **NOT_FOUND})
def get_team(team_id: RowId, session: DbSession,
             principal: Principal = Depends(authenticated())) -> TeamOut:
    return _out(_team(session, principal, team_id))


def _team(session: Session, principal: Principal, team_id: int) -> TeamRow:
    row = session.scalar(_visible_teams(principal).where(TeamRow.id == team_id))
    if row is None:
        raise NotFound(f"no team {team_id}")
    return row


def _out(row: TeamRow) -> TeamOut:
    return TeamOut(id=row.id, name=row.name, created_at=row.created_at)
