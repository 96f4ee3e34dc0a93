"""/dashboard: the organisers' view of their challenges (admins: all of them).

The queue by phase and state, the jobs in hand with their elapsed time and log tail
(a small script polls /dashboard/live.json), failures by reason and day, the nodes
(engine/nodes.py: slots, GPUs and their readings, state, last heartbeat, jobs; organisers
and admins), the workers holding leases and the GPUs heard from
(engine/metrics.GPU_SAMPLES), and the recent submissions with cancel and re-run. Reviewers
read it without the buttons; participants are refused (403 page). Admins may retire a lost
node (a machine gone for good: it leaves the list and the node-lost alert).
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session, joinedload

from engine import live_logs
from engine.api.auth import Principal
from engine.api.database import DbSession
from engine.api.pagination import RowId
from engine.db.models import JobRow, PhaseRow, SubmissionRow, utcnow
from engine.metrics import GPU_SAMPLES, QUEUE_STATES
from engine.nodes import node_views, retire
from engine.statuses import ACTIVE_JOB_STATES, SubmissionStatus
from engine.tokens import Forbidden, Role
from engine.web.rendering import page, render
from engine.web.session import Viewer, check_csrf, signed_in

router = APIRouter(include_in_schema=False)
RECENT = 50
LOG_TAIL_CHARS = 2000
FAILURE_DAYS = 14


def organiser(principal: Principal | None) -> Principal:
    reader = signed_in(principal)
    if reader.role not in (Role.ADMIN, Role.ORGANISER, Role.REVIEWER):
        raise Forbidden("the dashboard is for a challenge's organisers and reviewers")
    return reader


def _scoped(query: Select, reader: Principal) -> Select:
    if reader.role == Role.ADMIN:
        return query
    return query.where(PhaseRow.challenge_id.in_(sorted(reader.challenge_ids)))


def _as_utc(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def queue_by_phase(session: Session, reader: Principal) -> list[dict[str, Any]]:
    """Jobs waiting or in hand per (challenge, phase, state): every phase in scope listed."""
    phases = session.execute(_scoped(select(PhaseRow.challenge_id, PhaseRow.slug), reader)
                             .order_by(PhaseRow.challenge_id, PhaseRow.slug)).all()
    counts = Counter({(c, p, s): n for c, p, s, n in session.execute(_scoped(
        select(PhaseRow.challenge_id, PhaseRow.slug, JobRow.status, func.count())
        .select_from(JobRow).join(SubmissionRow, SubmissionRow.id == JobRow.submission_id)
        .join(PhaseRow, PhaseRow.id == SubmissionRow.phase_id)
        .where(JobRow.status.in_(QUEUE_STATES)), reader)
        .group_by(PhaseRow.challenge_id, PhaseRow.slug, JobRow.status))})
    return [{"challenge": c, "phase": p,
             "states": {s.value: counts[c, p, s.value] for s in QUEUE_STATES}}
            for c, p in phases]


def running_jobs(session: Session, reader: Principal, state_dir: Path
                 ) -> list[dict[str, Any]]:
    """The jobs in hand, each with its elapsed time and the tail of its live log (what the
    node sent while it runs: engine/live_logs.py; before any came, the recorded tail)."""
    now = utcnow()
    jobs = session.scalars(_scoped(
        select(JobRow).join(SubmissionRow, SubmissionRow.id == JobRow.submission_id)
        .join(PhaseRow, PhaseRow.id == SubmissionRow.phase_id)
        .where(JobRow.status.in_(ACTIVE_JOB_STATES)), reader)
        .order_by(JobRow.id).options(joinedload(JobRow.submission))).all()
    rows = []
    for job in jobs:
        since = _as_utc(job.started_at or job.heartbeat_at or job.created_at)
        tail = (live_logs.tail(state_dir, job.id, job.attempts)
                or str((job.run_result or {}).get("log_tail") or ""))[-LOG_TAIL_CHARS:]
        rows.append({"job": job.id, "submission": job.submission_id,
                     "team": job.submission.team.name,
                     "challenge": job.submission.phase.challenge_id,
                     "phase": job.submission.phase.slug, "status": job.status,
                     "worker": job.lease_owner or "",
                     "elapsed_seconds": max(0, round((_as_utc(now) - since).total_seconds()))
                     if since else None,
                     "log_tail": tail})
    return rows


def failures_by_day(session: Session, reader: Principal) -> dict[str, Any]:
    """Failed submissions per day (UTC) and typed reason, the last FAILURE_DAYS days seen."""
    rows = session.execute(_scoped(
        select(SubmissionRow.finished_at, SubmissionRow.reason)
        .join(PhaseRow, PhaseRow.id == SubmissionRow.phase_id)
        .where(SubmissionRow.status == SubmissionStatus.FAILED), reader)).all()
    counts: Counter[tuple[str, str]] = Counter()
    for finished, reason in rows:
        day = _as_utc(finished).strftime("%Y-%m-%d") if finished else "unknown"
        counts[day, reason or "none"] += 1
    days = sorted({d for d, _ in counts}, reverse=True)[:FAILURE_DAYS]
    reasons = sorted({r for _, r in counts})
    return {"days": days, "reasons": reasons,
            "counts": {d: {r: counts[d, r] for r in reasons} for d in days}}


def workers(session: Session, reader: Principal) -> list[dict[str, Any]]:
    """Lease owners of active jobs (every challenge's: a node is shared), newest heartbeat."""
    rows = session.execute(
        select(JobRow.lease_owner, func.count(), func.max(JobRow.heartbeat_at),
               func.sum(JobRow.gpus))
        .where(JobRow.status.in_(ACTIVE_JOB_STATES), JobRow.lease_owner.is_not(None))
        .group_by(JobRow.lease_owner).order_by(JobRow.lease_owner)).all()
    return [{"worker": owner, "jobs": n, "heartbeat_at": _as_utc(beat), "gpus": gpus or 0}
            for owner, n, beat, gpus in rows]


def nodes_in_view(session: Session, reader: Principal) -> list[dict[str, Any]] | None:
    """The node registry for organisers and admins (reviewers: None, not shown); an
    organiser sees its challenges' jobs on each node, the others counted."""
    if reader.role not in (Role.ADMIN, Role.ORGANISER):
        return None
    return node_views(session, challenge_ids=None if reader.role == Role.ADMIN
                      else reader.challenge_ids)


def recent_submissions(session: Session, reader: Principal) -> list[SubmissionRow]:
    return list(session.scalars(_scoped(
        select(SubmissionRow).join(PhaseRow, PhaseRow.id == SubmissionRow.phase_id), reader)
        .order_by(SubmissionRow.created_at.desc(), SubmissionRow.id.desc()).limit(RECENT)
        .options(joinedload(SubmissionRow.team), joinedload(SubmissionRow.phase))))


def _state_dir(request: Request) -> Path:
    return request.app.state.settings.state_dir


@router.get("/dashboard")
@page
def dashboard(request: Request, session: DbSession, principal: Viewer) -> Response:
    reader = organiser(principal)
    return render(request, "dashboard.html", queue=queue_by_phase(session, reader),
                  running=running_jobs(session, reader, _state_dir(request)),
                  failures=failures_by_day(session, reader),
                  workers=workers(session, reader), gpus=GPU_SAMPLES.fresh(),
                  nodes=nodes_in_view(session, reader),
                  submissions=recent_submissions(session, reader),
                  active=(SubmissionStatus.QUEUED, SubmissionStatus.RUNNING),
                  may_retire=reader.role == Role.ADMIN)


@router.post("/nodes/{node_id}/retire")
@page
def retire_node(node_id: RowId, request: Request, session: DbSession, principal: Viewer,
                csrf: Annotated[str, Form(max_length=200)] = "") -> Response:
    """An admin takes a node gone for good out of the list (engine/nodes.py `retire`)."""
    reader = signed_in(principal)
    check_csrf(request, csrf)
    if reader.role != Role.ADMIN:
        raise Forbidden("only an admin may retire a node: nodes serve every challenge")
    retire(session, node_id, reader.actor)
    return RedirectResponse("/dashboard#nodes", status_code=303)


@router.get("/dashboard/live.json")
@page
def live(request: Request, session: DbSession, principal: Viewer) -> Response:
    """The running jobs and the queue, for the dashboard's script (every few seconds)."""
    reader = organiser(principal)
    return JSONResponse({"running": running_jobs(session, reader, _state_dir(request)),
                         "queue": queue_by_phase(session, reader)},
                        headers={"Cache-Control": "no-store"})
