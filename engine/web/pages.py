"""The public pages (challenges, leaderboards) and a team's submission pages.

The same rules as the API, from the same functions (engine/api/access.py): another
team's submission does not exist (404 page); a participant reads logs and per-case
results only where the phase shows them; a final phase's leaderboard is hidden until it
closes, except to those who oversee the challenge.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from markupsafe import Markup
from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload

from engine import lifecycle, live_logs, plots, queue
from engine.api import ratelimit
from engine.api.access import (
    challenge_or_404,
    leaderboard_hidden,
    participant_view,
    phase_of,
    published_phases,
    require_leaderboard_visible,
    require_manages,
    restrict_submissions,
    shows_cases,
    shows_logs,
    visible_submission,
)
from engine.api.auth import Principal
from engine.api.database import DbSession
from engine.api.pagination import RowId, Slug
from engine.challenge_report import Figure, table_rows, unique_ids
from engine.challenges import metric_keys
from engine.db.models import CaseResultRow, ChallengeRow, PhaseRow, SubmissionRow
from engine.leaderboard import latest_per_team, leaderboard
from engine.publication import set_published
from engine.reports import shown_message, submission_report
from engine.reruns import rerun
from engine.statuses import ACTIVE_JOB_STATES, SubmissionStatus
from engine.submissions import challenge_definition
from engine.tokens import Role
from engine.web.rendering import page, render
from engine.web.session import Viewer, check_csrf, signed_in

router = APIRouter(include_in_schema=False)
RECENT = 100  # submissions listed on one page
ACTIVE_SUBMISSION = (SubmissionStatus.QUEUED, SubmissionStatus.RUNNING)
# what a participant may read of a job's provenance: never the node, the Docker host or the
# dataset's seal (a version names the hidden test set's seal: organisers only)
PARTICIPANT_PROVENANCE = ("format", "image.", "engine.", "ran.", "started_at", "finished_at",
                          "outputs.digest")
MAX_PROVENANCE_ROWS = 200
LIVE_LOG_CHARS = 4000  # the live tail a submission page shows (as the recorded one)


@router.get("/")
@page
def index(request: Request, session: DbSession, principal: Viewer) -> Response:
    challenges = session.scalars(select(ChallengeRow).order_by(ChallengeRow.id)).all()
    return render(request, "index.html", challenges=challenges)


@router.get("/challenges/{challenge_id}")
@page
def challenge_page(challenge_id: Slug, request: Request, session: DbSession,
                   principal: Viewer) -> Response:
    row, challenge = challenge_or_404(session, challenge_id)
    now = datetime.now(UTC)
    cases = {p.slug: len(p.case_ids) for p in row.phases}
    published = published_phases(row)
    phases = [{"phase": p, "open_now": p.is_open(now), "cases": cases.get(p.id, 0),
               "published": not leaderboard_hidden(p, now, published=p.id in published),
               "logs": p.visibility.logs and not p.final,
               "per_case": p.visibility.per_case and not p.final}
              for p in challenge.phases]
    return render(request, "challenge.html", challenge=challenge, phases=phases)


@router.get("/challenges/{challenge_id}/phases/{phase_slug}")
@page
def leaderboard_page(challenge_id: Slug, phase_slug: Slug, request: Request,
                     session: DbSession, principal: Viewer) -> Response:
    row, challenge = challenge_or_404(session, challenge_id)
    phase = phase_of(challenge, phase_slug)
    early = phase_slug in published_phases(row)
    require_leaderboard_visible(principal, challenge_id, phase, published=early)
    ratelimit.enforce(request, "leaderboard")
    entries = leaderboard(session, challenge_id, phase_slug)
    phase_row = session.scalar(select(PhaseRow).where(PhaseRow.challenge_id == challenge_id,
                                                      PhaseRow.slug == phase_slug))
    submissions = {s.id: s for s in latest_per_team(session, phase_row.id)}
    keys = [ref.key for ref in challenge.ranking.metrics]
    rows = table_rows(session, entries, submissions, keys)
    figure = None
    if rows:
        figure = _figure(Figure("Runtime and GPU energy", "Mean runtime per case (s) and the "
                                "GPU energy of the submission's runs (J); n/a where none was "
                                "read.", plots.runtime_and_energy(
                                    {r.entry.team: r.entry.runtime_per_case for r in rows},
                                    {r.entry.team: r.energy_joules for r in rows})), "runtime")
    return render(request, "leaderboard.html", challenge=challenge, phase=phase, rows=rows,
                  keys=keys, figure=figure,
                  hidden=leaderboard_hidden(phase, published=early), published_early=early,
                  may_publish=phase.final and principal is not None
                  and principal.manages(challenge_id))


@router.post("/challenges/{challenge_id}/phases/{phase_slug}/publish")
@page
def publish(challenge_id: Slug, phase_slug: Slug, request: Request, session: DbSession,
            principal: Viewer, csrf: Annotated[str, Form(max_length=200)] = "") -> Response:
    return _publication(request, session, principal, csrf, challenge_id, phase_slug, True)


@router.post("/challenges/{challenge_id}/phases/{phase_slug}/unpublish")
@page
def unpublish(challenge_id: Slug, phase_slug: Slug, request: Request, session: DbSession,
              principal: Viewer, csrf: Annotated[str, Form(max_length=200)] = "") -> Response:
    return _publication(request, session, principal, csrf, challenge_id, phase_slug, False)


def _publication(request: Request, session: Session, principal: Principal | None, csrf: str,
                 challenge_id: str, phase_slug: str, published: bool) -> Response:
    """The leaderboard page's publish / hide-again form (the API's rule and function)."""
    reader = signed_in(principal)
    check_csrf(request, csrf)
    _, challenge = challenge_or_404(session, challenge_id)
    phase_of(challenge, phase_slug)
    require_manages(reader, challenge_id, "publish a leaderboard")
    set_published(session, challenge_id, phase_slug, published, reader.actor)
    return RedirectResponse(f"/challenges/{challenge_id}/phases/{phase_slug}", status_code=303)


def _figure(figure: Figure, prefix: str) -> dict[str, Any]:
    """A figure of engine/plots.py in a page: ids made unique, labelled by its caption.
    Trusted markup: matplotlib wrote it and escaped every text in it (names included)."""
    svg = unique_ids(figure.svg, f"{prefix}-").replace(
        "<svg ", f'<svg role="img" aria-labelledby="caption-{prefix}" ', 1)
    return {"title": figure.title, "caption": figure.caption, "svg": Markup(svg),
            "id": prefix}


@router.get("/submissions")
@page
def submissions_page(request: Request, session: DbSession, principal: Viewer) -> Response:
    reader = signed_in(principal)
    query = select(SubmissionRow).join(PhaseRow, SubmissionRow.phase_id == PhaseRow.id)
    query = restrict_submissions(query, reader).order_by(
        SubmissionRow.created_at.desc(), SubmissionRow.id.desc()).limit(RECENT).options(
        joinedload(SubmissionRow.team), joinedload(SubmissionRow.phase))
    rows = session.scalars(query).all()
    return render(request, "submissions.html", submissions=rows)


@router.get("/submissions/{submission_id}")
@page
def submission_page(submission_id: RowId, request: Request, session: DbSession,
                    principal: Viewer) -> Response:
    reader = signed_in(principal)
    submission = visible_submission(session, reader, submission_id)
    challenge = challenge_definition(submission.phase.challenge)
    phase = challenge.phase(submission.phase.slug)
    participant = participant_view(reader)
    report = submission_report(session, submission.id, participant=participant)
    logs, cases = shows_logs(reader, phase), shows_cases(reader, phase)
    case_rows = _case_rows(session, submission) if cases else []
    live = _live_logs(request, submission) if logs else {}
    return render(
        request, "submission.html", submission=submission, challenge=challenge, phase=phase,
        report=report, message=shown_message(submission, challenge, phase,
                                             participant=participant),
        queue=_queue(session, submission), logs_visible=logs, cases_visible=cases,
        case_rows=case_rows, keys=metric_keys(challenge),
        figures=_distributions(submission, challenge, case_rows) if cases else [],
        provenance=_provenance(submission, participant),
        entry=_entry(session, reader, challenge, phase, submission),
        may_cancel=_may_cancel(reader, submission),
        may_rerun=reader.manages(submission.phase.challenge_id) and not participant,
        active=submission.status in ACTIVE_SUBMISSION, live=live)


@router.get("/submissions/{submission_id}/status.json")
@page
def submission_status(submission_id: RowId, request: Request, session: DbSession,
                      principal: Viewer) -> Response:
    """What the submission page's script polls: it reloads when the state moves."""
    reader = signed_in(principal)
    submission = visible_submission(session, reader, submission_id)
    waiting = _queue(session, submission)
    phase = challenge_definition(submission.phase.challenge).phase(submission.phase.slug)
    live = _live_logs(request, submission) if shows_logs(reader, phase) else {}
    return JSONResponse({"id": submission.id, "status": submission.status,
                         "queue": waiting, "logs": {str(k): v for k, v in live.items()}},
                        headers={"Cache-Control": "no-store"})


def _live_logs(request: Request, submission: SubmissionRow) -> dict[int, str]:
    """The live log tail of each job in hand (engine/live_logs.py), where logs are shown."""
    state_dir = request.app.state.settings.state_dir
    return {job.id: live_logs.tail(state_dir, job.id, job.attempts)[-LIVE_LOG_CHARS:]
            for job in submission.jobs if job.status in ACTIVE_JOB_STATES}


@router.post("/submissions/{submission_id}/cancel")
@page
def cancel(submission_id: RowId, request: Request, session: DbSession, principal: Viewer,
           csrf: Annotated[str, Form(max_length=200)] = "") -> Response:
    reader = signed_in(principal)
    check_csrf(request, csrf)
    submission = visible_submission(session, reader, submission_id)
    if reader.role != Role.PARTICIPANT:
        require_manages(reader, submission.phase.challenge_id, "cancel a submission")
    lifecycle.cancel(session, submission.id, reader.actor)
    return RedirectResponse(f"/submissions/{submission.id}", status_code=303)


@router.post("/submissions/{submission_id}/rerun")
@page
def rerun_submission(submission_id: RowId, request: Request, session: DbSession,
                     principal: Viewer, csrf: Annotated[str, Form(max_length=200)] = ""
                     ) -> Response:
    reader = signed_in(principal)
    check_csrf(request, csrf)
    submission = visible_submission(session, reader, submission_id)
    require_manages(reader, submission.phase.challenge_id, "re-run a submission")
    ratelimit.enforce(request, "rerun")
    again = rerun(session, submission.id, reader.actor)
    return RedirectResponse(f"/submissions/{again.id}", status_code=303)


def _may_cancel(reader: Principal, submission: SubmissionRow) -> bool:
    if submission.status not in ACTIVE_SUBMISSION:
        return False
    return reader.role == Role.PARTICIPANT or reader.manages(submission.phase.challenge_id)


def _queue(session: Session, submission: SubmissionRow) -> dict[str, Any] | None:
    ahead = queue.position(session, submission)
    if ahead is None:
        return None
    wait = queue.estimated_wait(session, submission)
    return {"jobs_ahead": ahead,
            "estimated_start_seconds": None if wait is None else round(wait.total_seconds())}


def _case_rows(session: Session, submission: SubmissionRow) -> list[CaseResultRow]:
    return list(session.scalars(select(CaseResultRow).where(
        CaseResultRow.submission_id == submission.id).order_by(CaseResultRow.case_id)))


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _distributions(submission: SubmissionRow, challenge, case_rows: list[CaseResultRow]
                   ) -> list[dict[str, Any]]:
    """Each metric's per-case values (valid cases only) as a box plot with its dots."""
    figures = []
    for number, key in enumerate(metric_keys(challenge)):
        values = [v for r in case_rows if r.valid
                  and (v := _finite((r.metrics or {}).get(key))) is not None]
        if not values:
            continue
        svg = plots.metric_distributions({submission.team.name: values}, key)
        figures.append(_figure(Figure(f"{key}: per-case distribution",
                                      f"{len(values)} valid case(s); failed cases are not "
                                      "drawn.", svg), f"dist-{number}"))
    return figures


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [pair for key, item in value.items()
                for pair in _flatten(item, f"{prefix}{key}.")]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [pair for index, item in enumerate(value)
                for pair in _flatten(item, f"{prefix}{index}.")]
    return [(prefix.rstrip("."), str(value))]


def _provenance(submission: SubmissionRow, participant: bool) -> list[dict[str, Any]]:
    """Each job's provenance record (run_result["provenance"]) as field/value rows."""
    records = []
    for job in submission.jobs:
        record = (job.run_result or {}).get("provenance")
        if not isinstance(record, dict):
            continue
        rows = _flatten(record)
        if participant:
            rows = [(k, v) for k, v in rows if k.startswith(PARTICIPANT_PROVENANCE)]
        records.append({"job": job.id, "rows": rows[:MAX_PROVENANCE_ROWS]})
    return records


def _entry(session: Session, reader: Principal, challenge, phase, submission: SubmissionRow):
    """The submission's line on its phase's leaderboard, where the reader may see it."""
    if submission.status != SubmissionStatus.SUCCEEDED:
        return None
    published = phase.id in published_phases(submission.phase.challenge)
    if leaderboard_hidden(phase, published=published) and not reader.oversees(challenge.id):
        return None
    for entry in leaderboard(session, challenge.id, phase.id):
        if entry.submission_id == submission.id:
            return entry
    return None
