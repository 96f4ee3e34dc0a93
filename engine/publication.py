"""Publishing a final phase's leaderboard before the phase closes (and taking it back).

A final phase's ranking is hidden until the phase closes (engine/api/access.py); an
organiser may publish it earlier, from the dashboard or the API, once the results are
checked. Un-publishing undoes only that early publication: a closed final phase is public
whatever its flag says. Both are idempotent (a second call changes nothing and records
nothing) and leave an event (entity "phase") naming who did it. Only flushes.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from engine import queue
from engine.db.models import PhaseRow, utcnow
from engine.errors import Conflict
from engine.submissions import find_phase

PUBLISHED, HIDDEN = "published", "hidden"


class NotAFinalPhase(Conflict):
    """Publishing a phase whose leaderboard is public anyway."""


def set_published(session: Session, challenge_id: str, phase_slug: str, published: bool,
                  actor: str) -> bool:
    """Publish (or hide again) the phase's leaderboard; True if that changed anything."""
    row, phase = find_phase(session, challenge_id, phase_slug)
    if not phase.final:
        raise NotAFinalPhase(f"phase {phase_slug} is not a final phase: its leaderboard is "
                             "always public")
    if (row.leaderboard_published_at is not None) == published:
        return False
    _change(session, row, published, actor)
    return True


def _change(session: Session, row: PhaseRow, published: bool, actor: str) -> None:
    before, after = (HIDDEN, PUBLISHED) if published else (PUBLISHED, HIDDEN)
    row.leaderboard_published_at = utcnow() if published else None
    queue.record(session, "phase", row.id, before, after, actor,
                 f"leaderboard of {row.challenge_id}/{row.slug} {after}")
    session.flush()
