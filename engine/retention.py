"""What the image store keeps, and `epreuve store gc` removing the rest (docs/retention.md).

Kept, whatever their age:
- the archive of every image submitted to a final phase (the challenge's `final: true`);
- the archive of every image that ranks on a leaderboard (its team's latest evaluated
  submission in a phase, as engine/leaderboard.latest_per_team chooses it);
- the archive of every image whose submission has not ended (queued or running);
- the upload of every intake still being validated.

Everything else in the store is removed once unused for the grace period (30 days by
default): the archives of other images (last used: the latest submission of it, made or
ended), the uploads of intakes that ended (converted into an archive, or refused; last
used: the intake's last change), and blobs no row names (last used: the file's time).
Temporary files that writers left in `incoming/` are removed after a day without a write
(a writer that is alive writes to its file all the time).

A digest named by several rows is kept if any of them keeps it. The plan is made from the
database first, then carried out; nothing here writes to the database.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from engine.challenges import challenge_definition
from engine.db.models import ImageRow, IntakeRow, PhaseRow, SubmissionRow, utcnow
from engine.leaderboard import latest_per_team
from engine.statuses import IntakeStatus, SubmissionStatus
from engine.store import SHA256, DirectoryStore

DEFAULT_GRACE = timedelta(days=30)
INCOMING_GRACE = timedelta(days=1)
ENDED = frozenset({SubmissionStatus.SUCCEEDED, SubmissionStatus.FAILED,
                   SubmissionStatus.CANCELLED})

# why a blob is kept whatever its age
FINAL_PHASE = "submitted to a final phase"
RANKED = "ranked on a leaderboard"
NOT_ENDED = "its submission has not ended"
VALIDATING = "an upload still being validated"
RECENT = "used within the grace period"


@dataclass(frozen=True)
class Policy:
    grace: timedelta = DEFAULT_GRACE
    incoming_grace: timedelta = INCOMING_GRACE


@dataclass
class Reference:
    """One row's claim on a blob: a reason to keep it, or when it was last used."""

    what: str
    keep: str | None = None
    last_used: datetime | None = None


@dataclass(frozen=True)
class Removal:
    sha256: str
    size: int
    last_used: datetime
    what: str


@dataclass
class Plan:
    removals: list[Removal] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # digest -> why
    stale_incoming: list[Path] = field(default_factory=list)

    @property
    def bytes_freed(self) -> int:
        return sum(r.size for r in self.removals)


def plan(session: Session, store: DirectoryStore, policy: Policy = Policy(),
         now: datetime | None = None) -> Plan:
    """What `gc` would remove now, and why every other blob stays."""
    now = now or utcnow()
    claims = references(session)
    result = Plan(stale_incoming=store.stale_incoming(policy.incoming_grace.total_seconds()))
    for digest in store.digests():
        on_blob = claims.get(digest) or [Reference("named by no row",
                                                   last_used=store.modified_at(digest))]
        why = next((c.keep for c in on_blob if c.keep), None)
        last_used = max((c.last_used for c in on_blob if c.last_used), default=None) \
            or store.modified_at(digest)
        if why is None and now - last_used < policy.grace:
            why = RECENT
        if why is not None:
            result.kept[digest] = why
        else:
            result.removals.append(Removal(digest, store.size(digest), last_used,
                                           "; ".join(sorted({c.what for c in on_blob}))))
    return result


def carry_out(store: DirectoryStore, gc_plan: Plan) -> None:
    for removal in gc_plan.removals:
        store.delete(removal.sha256)
    for path in gc_plan.stale_incoming:
        path.unlink(missing_ok=True)


def references(session: Session) -> dict[str, list[Reference]]:
    """Every row's claim on a blob, by digest."""
    claims: dict[str, list[Reference]] = defaultdict(list)
    for image, keep, last_used in _images(session):
        if image.archive_sha256 and SHA256.match(image.archive_sha256):
            claims[image.archive_sha256].append(Reference(
                f"archive of image {image.image_id[:19]}", keep, last_used))
    for intake in session.scalars(select(IntakeRow)):
        if SHA256.match(intake.tar_sha256 or ""):
            validating = intake.status == IntakeStatus.VALIDATING
            claims[intake.tar_sha256].append(Reference(
                f"upload of intake {intake.id} ({intake.status})",
                VALIDATING if validating else None, intake.updated_at))
    return claims


def _images(session: Session) -> Iterable[tuple[ImageRow, str | None, datetime]]:
    final_phases = _final_phase_ids(session)
    ranked = {s.id for phase_id in session.scalars(select(PhaseRow.id))
              for s in latest_per_team(session, phase_id)}
    submissions: dict[int, list[SubmissionRow]] = defaultdict(list)
    for submission in session.scalars(select(SubmissionRow)):
        submissions[submission.image_pk].append(submission)
    for image in session.scalars(select(ImageRow)):
        its = submissions.get(image.id, [])
        yield image, _keep(its, final_phases, ranked), max(
            [image.created_at, *(s.created_at for s in its),
             *(s.finished_at for s in its if s.finished_at)])


def _keep(submissions: list[SubmissionRow], final_phases: set[int],
          ranked: set[int]) -> str | None:
    if any(s.phase_id in final_phases for s in submissions):
        return FINAL_PHASE
    if any(s.id in ranked for s in submissions):
        return RANKED
    if any(s.status not in ENDED for s in submissions):
        return NOT_ENDED
    return None


def _final_phase_ids(session: Session) -> set[int]:
    definitions: dict[str, Any] = {}
    final: set[int] = set()
    for phase in session.scalars(select(PhaseRow)):
        if phase.challenge_id not in definitions:
            definitions[phase.challenge_id] = challenge_definition(phase.challenge)
        if definitions[phase.challenge_id].phase(phase.slug).final:
            final.add(phase.id)
    return final


def report(gc_plan: Plan, *, dry_run: bool, policy: Policy) -> dict[str, Any]:
    """The plan as data, for `epreuve store gc` (--format)."""
    kept: dict[str, int] = defaultdict(int)
    for why in gc_plan.kept.values():
        kept[why] += 1
    return {"dry_run": dry_run, "grace_days": policy.grace / timedelta(days=1),
            "removed": [{"sha256": r.sha256, "bytes": r.size,
                         "last_used": r.last_used.astimezone(UTC).isoformat(), "what": r.what}
                        for r in gc_plan.removals],
            "bytes_freed": gc_plan.bytes_freed, "kept": dict(sorted(kept.items())),
            "stale_incoming_removed": len(gc_plan.stale_incoming)}
