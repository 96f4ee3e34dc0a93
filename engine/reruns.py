"""Re-running a submission: a new submission of the same image, team and phase.

As Codabench and EvalAI do, a re-run is a new submission, never a rewrite of the old
one: the old results stay as they were, the new ones are compared with them. An
organiser asks for it (after a platform fix, a new evaluation image), so it skips the
phase window and the team's quota and never counts against that quota. Both
submissions' histories record the link.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from engine import queue
from engine.db.models import SubmissionRow, utcnow
from engine.errors import NotFound
from engine.frozen import refuse_if_frozen
from engine.statuses import JobKind, SubmissionStatus
from engine.submissions import find_phase, prize_eligibility, smoke_case


def rerun(session: Session, submission_id: int, actor: str) -> SubmissionRow:
    """Queue a new submission of `submission_id`'s image (smoke job first). Flushes."""
    original = session.get(SubmissionRow, submission_id)
    if original is None:
        raise NotFound(f"no submission {submission_id}")
    phase_row, phase = find_phase(session, original.phase.challenge_id, original.phase.slug)
    refuse_if_frozen(phase_row, f"re-run submission {submission_id}")
    eligible, note = prize_eligibility(phase, original.source_url, original.license)
    again = SubmissionRow(phase=phase_row, team=original.team, image=original.image,
                          source_url=original.source_url, license=original.license,
                          prize_eligible=eligible, prize_note=note,
                          counts_against_quota=False, created_at=utcnow())
    session.add(again)
    session.flush()
    queue.record(session, "submission", again.id, None, SubmissionStatus.QUEUED, actor,
                 f"re-run of submission {original.id}")
    queue.record(session, "submission", original.id, original.status, original.status, actor,
                 f"re-run as submission {again.id}")
    queue.enqueue(session, again, [[smoke_case(phase, phase_row.case_ids)]],
                  kind=JobKind.SMOKE, actor=actor, gpus=phase.limits.gpus)
    return again
