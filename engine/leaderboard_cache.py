"""Leaderboards computed once per state of their inputs, kept in the server process.

A leaderboard reads every team's per-case results; the API serves it on every request.
The cache key is a fingerprint read in one cheap query: anything that can move the board
(a submission that ends, a rescore, a re-sealed dataset, a freeze, a changed definition,
an open-source prize check, a renamed team) changes it, so a stale board is never served.
Bounded (least recently used out first); a lock per process, the computation outside it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from engine.db.models import (
    AggregateRow,
    CaseResultRow,
    ReproductionRow,
    SubmissionRow,
)
from engine.leaderboard import Entry, leaderboard
from engine.statuses import SubmissionStatus
from engine.submissions import find_phase

MAX_BOARDS = 64


def fingerprint(session: Session, challenge_id: str, phase_slug: str) -> tuple:
    """Changes whenever the phase's board can: its submissions (a new one, one that ends, a
    rescore), their results and aggregates, a prize check, the phase's dataset version,
    its freeze, its publication, the challenge's definition."""
    phase, _ = find_phase(session, challenge_id, phase_slug)
    in_phase = select(SubmissionRow.id).where(SubmissionRow.phase_id == phase.id)
    of_phase = SubmissionRow.phase_id == phase.id
    state = session.execute(select(
        select(func.count(SubmissionRow.id)).where(
            of_phase, SubmissionRow.status == SubmissionStatus.SUCCEEDED).scalar_subquery(),
        select(func.max(SubmissionRow.id)).where(of_phase).scalar_subquery(),
        select(func.max(SubmissionRow.finished_at)).where(of_phase).scalar_subquery(),
        select(func.count(SubmissionRow.id)).where(
            of_phase, SubmissionRow.dataset_version == phase.dataset_version).scalar_subquery(),
        select(func.count(CaseResultRow.id)).where(
            CaseResultRow.submission_id.in_(in_phase)).scalar_subquery(),
        select(func.max(CaseResultRow.id)).where(
            CaseResultRow.submission_id.in_(in_phase)).scalar_subquery(),
        select(func.max(AggregateRow.id)).where(
            AggregateRow.submission_id.in_(in_phase)).scalar_subquery(),
        select(func.max(ReproductionRow.id)).where(
            ReproductionRow.submission_id.in_(in_phase)).scalar_subquery(),
    )).one()
    return (phase.id, phase.dataset_path, phase.dataset_version, phase.frozen_at,
            phase.leaderboard_published_at,
            phase.challenge.definition_sha256, *state)


class LeaderboardCache:
    def __init__(self, size: int = MAX_BOARDS) -> None:
        self.size = size
        self._boards: OrderedDict[tuple, list[Entry]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, session: Session, challenge_id: str, phase_slug: str) -> list[Entry]:
        key = fingerprint(session, challenge_id, phase_slug)
        with self._lock:
            if key in self._boards:
                self._boards.move_to_end(key)
                return self._boards[key]
        entries = leaderboard(session, challenge_id, phase_slug)
        with self._lock:
            self._boards[key] = entries
            while len(self._boards) > self.size:
                self._boards.popitem(last=False)
        return entries
