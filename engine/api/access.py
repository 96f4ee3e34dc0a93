"""Who may see what: the rules every route applies, in one place.

- A submission another team made, or one outside an organiser's or reviewer's scope,
  does not exist for the caller (404, never 403: ids do not leak).
- A participant reads its own submissions through the phase's visibility
  (engine/reports.py): logs and per-case results only where the phase shows them and
  never in a final phase; a hidden phase's messages name no case.
- A final phase's leaderboard is hidden until the phase closes or an organiser publishes
  it (engine/publication.py), except to those who oversee the challenge (its organisers
  and reviewers, and admins).
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Select
from sqlalchemy.orm import Session

from engine.api.auth import Principal
from engine.challenges import Challenge, Phase
from engine.db.models import ChallengeRow, PhaseRow, SubmissionRow
from engine.errors import NotFound
from engine.submissions import challenge_definition
from engine.tokens import Forbidden, Role


def challenge_or_404(session: Session, challenge_id: str) -> tuple[ChallengeRow, Challenge]:
    row = session.get(ChallengeRow, challenge_id)
    if row is None:
        raise NotFound(f"no challenge {challenge_id!r}")
    return row, challenge_definition(row)


def phase_of(challenge: Challenge, slug: str) -> Phase:
    for phase in challenge.phases:
        if phase.id == slug:
            return phase
    raise NotFound(f"challenge {challenge.id} has no phase {slug!r}")


def leaderboard_hidden(phase: Phase, now: datetime | None = None, *,
                       published: bool = False) -> bool:
    """A final phase's ranking is published when the phase has closed, or earlier when an
    organiser published it (`published`: see published_phases)."""
    now = now or datetime.now(UTC)
    return phase.final and not published and (phase.closes is None or now < phase.closes)


def published_phases(row: ChallengeRow) -> frozenset[str]:
    """The phases whose leaderboard an organiser published before they closed."""
    return frozenset(p.slug for p in row.phases if p.leaderboard_published_at is not None)


def require_leaderboard_visible(principal: Principal | None, challenge_id: str,
                                phase: Phase, *, published: bool = False) -> None:
    if (leaderboard_hidden(phase, published=published)
            and not (principal and principal.oversees(challenge_id))):
        raise Forbidden(f"the leaderboard of final phase {phase.id} is published when the "
                        "phase closes")


def visible_submission(session: Session, principal: Principal,
                       submission_id: int) -> SubmissionRow:
    """The submission if the caller may see it; otherwise it does not exist (404)."""
    submission = session.get(SubmissionRow, submission_id)
    if submission is None or not _sees(principal, submission):
        raise NotFound(f"no submission {submission_id}")
    return submission


def _sees(principal: Principal, submission: SubmissionRow) -> bool:
    if principal.role == Role.PARTICIPANT:
        return submission.team_id == principal.team_id
    return principal.oversees(submission.phase.challenge_id)


def restrict_submissions(query: Select, principal: Principal) -> Select:
    """`query` (over SubmissionRow joined to PhaseRow) cut to what the caller may see."""
    if principal.role == Role.PARTICIPANT:
        return query.where(SubmissionRow.team_id == principal.team_id)
    if principal.role == Role.ADMIN:
        return query
    return query.where(PhaseRow.challenge_id.in_(sorted(principal.challenge_ids)))


def participant_view(principal: Principal) -> bool:
    """Whether the caller reads submissions through the phase's visibility rules."""
    return principal.role == Role.PARTICIPANT


def require_manages(principal: Principal, challenge_id: str, action: str) -> None:
    if principal.role == Role.PARTICIPANT or not principal.manages(challenge_id):
        raise Forbidden(f"a {principal.role} token may not {action}")


def shows_logs(principal: Principal, phase: Phase) -> bool:
    """As engine/reports.py: a participant reads logs only where the phase shows them."""
    return not participant_view(principal) or (phase.visibility.logs and not phase.final)


def shows_cases(principal: Principal, phase: Phase) -> bool:
    return not participant_view(principal) or (phase.visibility.per_case and not phase.final)
