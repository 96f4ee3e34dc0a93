"""/api/v1/submissions: list your own, get one, its status, logs and per-case results;
cancel; re-run. (Creating one from an uploaded image is engine/api/uploads.py.)

What a participant reads follows the phase's visibility (engine/reports.py): in a phase
that hides them, no log, no per-case result, and messages that name no case; a
platform (INFRASTRUCTURE) failure is described without its detail. Another team's
submission does not exist for the caller (404).

Cancel: the submitting team, or an organiser of the challenge (or an admin).
Re-run: an organiser of the challenge (or an admin) queues a NEW submission of the same
image for the same team and phase (engine/reruns.py): it skips the phase window and
the quota and never counts against it; the original keeps its results.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload

from engine import lifecycle, queue
from engine.api import ratelimit
from engine.api.access import (
    participant_view,
    require_manages,
    restrict_submissions,
    shows_cases,
    shows_logs,
    visible_submission,
)
from engine.api.auth import Principal, authenticated
from engine.api.database import DbSession
from engine.api.errors import AUTH_RESPONSES, NOT_FOUND, ErrorBody
from engine.api.pagination import (
    Limit,
    Offset,
    Page,
    RowId,
    SlugFilter,
    page_of,
    paged_rows,
)
from engine.challenges import Challenge, Phase, challenge_definition
from engine.db.models import CaseResultRow, PhaseRow, SubmissionRow
from engine.reports import shown_message, submission_report
from engine.reruns import rerun
from engine.statuses import SubmissionStatus
from engine.tokens import Forbidden, Role

router = APIRouter(prefix="/api/v1/submissions", tags=["submissions"])
ONE = {**AUTH_RESPONSES, **NOT_FOUND}
MAX_LOG_CHARS = 4000


class QueueOut(BaseModel):
    jobs_ahead: int
    estimated_start_seconds: int | None


class SubmissionOut(BaseModel):
    id: int
    team: str
    challenge: str
    phase: str
    status: str
    reason: str | None
    message: str | None
    created_at: datetime
    finished_at: datetime | None
    prize_eligible: bool


class JobOut(BaseModel):
    job: int
    kind: str
    cases: int
    status: str
    attempts: int
    reason: str | None
    message: str | None
    wall_seconds: float | None
    cpu_seconds: float | None
    peak_memory_bytes: int | None
    provenance: dict[str, Any] | None = Field(
        None, description="What the last attempt ran and where (docs/provenance.md); for a "
        "participant without host paths, the test set's seal, or case names where the phase "
        "hides them")


class EventOut(BaseModel):
    at: datetime
    entity: str
    change: str
    actor: str
    detail: str | None


class SubmissionDetail(SubmissionOut):
    prize_note: str | None
    image: str
    queue: QueueOut | None
    jobs: list[JobOut]
    aggregates: dict[str, dict[str, Any]]
    logs_visible: bool
    cases_visible: bool
    events: list[EventOut] | None  # organisers, reviewers and admins only


class StatusOut(BaseModel):
    id: int
    status: str
    reason: str | None
    message: str | None
    queue: QueueOut | None


class LogOut(BaseModel):
    job: int
    kind: str
    status: str
    log_tail: str
    log_truncated: bool | None


class CaseOut(BaseModel):
    case_id: str
    valid: bool
    reason: str | None
    message: str | None
    metrics: dict[str, Any]
    runtime_seconds: float | None


def _definition(submission: SubmissionRow,
                cache: dict[str, Challenge] | None = None) -> tuple[Challenge, Phase]:
    """The submission's challenge and phase, parsed once per challenge for a whole page."""
    cache = {} if cache is None else cache
    challenge_id = submission.phase.challenge_id
    if challenge_id not in cache:
        cache[challenge_id] = challenge_definition(submission.phase.challenge)
    return cache[challenge_id], cache[challenge_id].phase(submission.phase.slug)


def _phase(submission: SubmissionRow) -> Phase:
    return _definition(submission)[1]


def _summary(submission: SubmissionRow, principal: Principal,
             cache: dict[str, Challenge] | None = None) -> SubmissionOut:
    challenge, phase = _definition(submission, cache)
    return SubmissionOut(
        id=submission.id, team=submission.team.name, challenge=submission.phase.challenge_id,
        phase=submission.phase.slug, status=submission.status, reason=submission.reason,
        message=shown_message(submission, challenge, phase,
                              participant=participant_view(principal)),
        created_at=submission.created_at, finished_at=submission.finished_at,
        prize_eligible=submission.prize_eligible)


def _queue(session: Session, submission: SubmissionRow) -> QueueOut | None:
    ahead = queue.position(session, submission)
    if ahead is None:
        return None
    wait = queue.estimated_wait(session, submission)
    return QueueOut(jobs_ahead=ahead, estimated_start_seconds=None if wait is None
                    else round(wait.total_seconds()))


def finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such a number is shown as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


@router.get("", response_model=Page[SubmissionOut], responses=AUTH_RESPONSES)
def list_submissions(session: DbSession, limit: Limit = 50, offset: Offset = 0,
                     challenge: SlugFilter = None, phase: SlugFilter = None,
                     status: SubmissionStatus | None = None,
                     principal: Principal = Depends(authenticated())) -> dict:
    """Newest first: a participant's own team's, an organiser's or reviewer's challenges'."""
    query = select(SubmissionRow).join(PhaseRow, SubmissionRow.phase_id == PhaseRow.id)
    query = restrict_submissions(query, principal)
    if challenge is not None:
        query = query.where(PhaseRow.challenge_id == challenge)
    if phase is not None:
        query = query.where(PhaseRow.slug == phase)
    if status is not None:
        query = query.where(SubmissionRow.status == status.value)
    query = query.order_by(SubmissionRow.created_at.desc(), SubmissionRow.id.desc()).options(
        joinedload(SubmissionRow.team), joinedload(SubmissionRow.phase))
    rows, total = paged_rows(session, query, limit, offset)
    challenges: dict[str, Challenge] = {}
    return page_of([_summary(r, principal, challenges) for r in rows], total, limit, offset)


@router.get("/{submission_id}", response_model=SubmissionDetail, responses=ONE)
def get_submission(submission_id: RowId, session: DbSession,
                   principal: Principal = Depends(authenticated())) -> SubmissionDetail:
    submission = visible_submission(session, principal, submission_id)
    participant = participant_view(principal)
    report = submission_report(session, submission.id, participant=participant)
    phase = _phase(submission)
    assert report is not None
    return SubmissionDetail(
        **_summary(submission, principal).model_dump(), prize_note=report["prize_note"],
        image=report["image"], queue=_queue(session, submission),
        jobs=[JobOut(**{k: v for k, v in job.items() if k in JobOut.model_fields})
              for job in report["jobs"]],
        aggregates=finite(report["aggregates"]),
        logs_visible=shows_logs(principal, phase), cases_visible=shows_cases(principal, phase),
        events=None if participant else [EventOut(**e) for e in report["events"]])


@router.get("/{submission_id}/status", response_model=StatusOut, responses=ONE)
def get_status(submission_id: RowId, session: DbSession,
               principal: Principal = Depends(authenticated())) -> StatusOut:
    """State, typed reason, queue position and estimated start."""
    submission = visible_submission(session, principal, submission_id)
    summary = _summary(submission, principal)
    return StatusOut(id=submission.id, status=summary.status, reason=summary.reason,
                     message=summary.message, queue=_queue(session, submission))


@router.get("/{submission_id}/logs", response_model=list[LogOut], responses=ONE)
def get_logs(submission_id: RowId, session: DbSession,
             principal: Principal = Depends(authenticated())) -> list[LogOut]:
    """The tail of each job's container log, where the phase shows logs."""
    submission = visible_submission(session, principal, submission_id)
    phase = _phase(submission)
    if not shows_logs(principal, phase):
        raise Forbidden(f"phase {phase.id} does not show logs to participants")
    return [LogOut(job=job.id, kind=job.kind, status=job.status,
                   log_tail=str((job.run_result or {}).get("log_tail") or "")[-MAX_LOG_CHARS:],
                   log_truncated=(job.run_result or {}).get("log_truncated"))
            for job in submission.jobs]


@router.get("/{submission_id}/cases", response_model=Page[CaseOut], responses=ONE)
def get_cases(submission_id: RowId, session: DbSession, limit: Limit = 50, offset: Offset = 0,
              principal: Principal = Depends(authenticated())) -> dict:
    """Per-case results, where the phase shows them, by case id."""
    submission = visible_submission(session, principal, submission_id)
    phase = _phase(submission)
    if not shows_cases(principal, phase):
        raise Forbidden(f"phase {phase.id} does not show per-case results to participants")
    rows, total = paged_rows(session, select(CaseResultRow).where(
        CaseResultRow.submission_id == submission.id).order_by(CaseResultRow.case_id),
        limit, offset)
    cases = [CaseOut(case_id=r.case_id, valid=r.valid, reason=r.reason, message=r.message,
                     metrics=finite(r.metrics), runtime_seconds=finite(r.runtime_seconds))
             for r in rows]
    return page_of(cases, total, limit, offset)


@router.post("/{submission_id}/cancel", response_model=SubmissionOut,
             responses={**ONE, 409: {"model": ErrorBody, "description": "Already ended"}})
def cancel(submission_id: RowId, session: DbSession,
           principal: Principal = Depends(authenticated())) -> SubmissionOut:
    submission = visible_submission(session, principal, submission_id)
    if principal.role != Role.PARTICIPANT:
        require_manages(principal, submission.phase.challenge_id, "cancel a submission")
    lifecycle.cancel(session, submission.id, principal.actor)
    return _summary(submission, principal)


@router.post("/{submission_id}/rerun", response_model=SubmissionOut, status_code=201,
             responses={**ONE, 429: {"model": ErrorBody}})
def rerun_submission(submission_id: RowId, request: Request, session: DbSession,
                     principal: Principal = Depends(authenticated())) -> SubmissionOut:
    """Queue a new submission of the same image (organisers): the original is untouched."""
    submission = visible_submission(session, principal, submission_id)
    require_manages(principal, submission.phase.challenge_id, "re-run a submission")
    ratelimit.enforce(request, "rerun")
    return _summary(rerun(session, submission.id, principal.actor), principal)
