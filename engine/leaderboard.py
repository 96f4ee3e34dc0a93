"""A phase's leaderboard, ranked by the challenge's scheme, computed from stored results.

One entry per team: its latest evaluated submission. Each ranking metric is
ranked with the scheme (aggregate-then-rank, rank-then-aggregate, test-based);
with several metrics the final rank is their consensus (mean rank). Failed and
missing cases enter every computation at their worst value, and each entry says
how many there were.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from engine.datasets import load
from engine.db.models import AggregateRow, SubmissionRow
from engine.results import case_values
from engine.scoring.ranking import (
    aggregate_then_rank,
    consensus,
    rank_by_significance,
    rank_then_aggregate,
    rank_values,
)
from engine.submissions import challenge_definition, find_phase


@dataclass
class Entry:
    rank: int
    team: str
    submission_id: int
    scores: dict[str, float]  # the ranking metrics, aggregated
    metric_ranks: dict[str, int]
    n_failed: int
    runtime_per_case: float | None
    prize_eligible: bool
    extra: dict[str, float] = field(default_factory=dict)


def latest_per_team(session: Session, phase_id: int) -> list[SubmissionRow]:
    evaluated = session.scalars(select(SubmissionRow).where(
        SubmissionRow.phase_id == phase_id, SubmissionRow.status == "succeeded")
        .order_by(SubmissionRow.created_at.desc(), SubmissionRow.id.desc())).all()
    latest: dict[int, SubmissionRow] = {}
    for submission in evaluated:
        latest.setdefault(submission.team_id, submission)
    return list(latest.values())


def leaderboard(session: Session, challenge_id: str, phase_slug: str) -> list[Entry]:
    phase_row, _ = find_phase(session, challenge_id, phase_slug)
    submissions = latest_per_team(session, phase_row.id)
    if not submissions:
        return []
    challenge = challenge_definition(phase_row.challenge)
    aggregates = {s.id: {a.metric: a.summary for a in session.scalars(
        select(AggregateRow).where(AggregateRow.submission_id == s.id))} for s in submissions}
    names = {s.id: str(s.id) for s in submissions}
    refs = challenge.ranking.metrics
    rankings, scores = [], {s.id: {} for s in submissions}
    if challenge.task == "classification":
        for ref in refs:
            values = {names[s.id]: aggregates[s.id].get(ref.metric, {}).get("value")
                      for s in submissions}
            rankings.append(rank_values(values, challenge.larger_is_better(ref.metric)))
            for s in submissions:
                scores[s.id][ref.key] = values[names[s.id]]
    else:
        dataset = load(phase_row.dataset_path)
        aggregate = np.median if challenge.ranking.aggregate == "median" else np.mean
        for ref in refs:
            per_case = {names[s.id]: case_values(session, challenge, dataset, s, ref.key)
                        for s in submissions}
            rankings.append(_rank(challenge.ranking.scheme, per_case,
                                  challenge.larger_is_better(ref.metric), aggregate))
            for s in submissions:
                scores[s.id][ref.key] = float(aggregate(per_case[names[s.id]]))
    final = rankings[0] if len(rankings) == 1 else consensus(rankings)
    entries = []
    for s in submissions:
        summaries = aggregates[s.id]
        n_failed = max((v.get("n_failed", 0) for v in summaries.values()), default=0)
        runtime = summaries.get("runtime_seconds", {}).get("mean")
        entries.append(Entry(
            rank=final[names[s.id]], team=s.team.name, submission_id=s.id,
            scores=scores[s.id],
            metric_ranks={ref.key: r[names[s.id]] for ref, r in zip(refs, rankings,
                                                                    strict=True)},
            n_failed=n_failed, runtime_per_case=runtime, prize_eligible=s.prize_eligible))
    return sorted(entries, key=lambda e: (e.rank, e.submission_id))


def _rank(scheme: str, per_case: dict[str, list[float]], larger: bool, aggregate) -> dict:
    if scheme == "rank-then-aggregate":
        return rank_then_aggregate(per_case, larger)
    if scheme == "test-based":
        worst = min(min(v) for v in per_case.values()) if larger else max(
            max(v) for v in per_case.values())
        return rank_by_significance(per_case, larger, worst=worst)
    return aggregate_then_rank(per_case, larger, aggregate=aggregate)
