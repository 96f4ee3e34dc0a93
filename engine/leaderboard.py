"""A phase's leaderboard, ranked by the challenge's scheme, computed from stored results.

One entry per team: its latest evaluated submission. Each ranking metric is
ranked with the scheme (aggregate-then-rank, rank-then-aggregate, test-based);
with several metrics the final rank is their consensus (mean rank). Failed and
missing cases enter every computation at their worst value, and each entry says
how many there were.

Each entry is computed on its submission's own dataset version and case set (fixed when
it was submitted): a re-sealed dataset moves no existing score. An entry whose version is
older than the phase's current one is `stale` (`epreuve rescore` brings it up to date
where the inputs did not change). When the entries' case sets differ, the schemes that
compare teams case by case (rank-then-aggregate, test-based; and `stability`) use the
cases every entry was evaluated on; aggregate-then-rank ranks the entries' own scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.stats import kendalltau
from sqlalchemy import select
from sqlalchemy.orm import Session

from engine.challenges import challenge_definition
from engine.dataset_versions import is_stale
from engine.datasets import load
from engine.db.models import AggregateRow, ReproductionRow, SubmissionRow
from engine.results import case_metrics_by_submission, case_values
from engine.scoring.ranking import (
    aggregate_then_rank,
    consensus,
    rank_by_significance,
    rank_then_aggregate,
    rank_values,
)
from engine.statuses import SubmissionStatus
from engine.submissions import find_phase


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
    dataset_version: str = ""  # the version its results were computed on
    stale: bool = False  # older than the phase's current version
    source_check: str = "not checked"  # the open-source prize check: verified | differs
    extra: dict[str, float] = field(default_factory=dict)


def latest_per_team(session: Session, phase_id: int) -> list[SubmissionRow]:
    evaluated = session.scalars(select(SubmissionRow).where(
        SubmissionRow.phase_id == phase_id, SubmissionRow.status == SubmissionStatus.SUCCEEDED)
        .order_by(SubmissionRow.created_at.desc(), SubmissionRow.id.desc())).all()
    latest: dict[int, SubmissionRow] = {}
    for submission in evaluated:
        latest.setdefault(submission.team_id, submission)
    return list(latest.values())


def leaderboard(session: Session, challenge_id: str, phase_slug: str, *,
                substitute: dict[int, dict[str, dict]] | None = None) -> list[Entry]:
    """`substitute`: {submission id: {case id: {"valid", "metrics"}}} in place of the stored
    results (a reproduction's effect on the rank; segmentation only). Nothing is written."""
    phase_row, _ = find_phase(session, challenge_id, phase_slug)
    submissions = latest_per_team(session, phase_row.id)
    if not submissions:
        return []
    challenge = challenge_definition(phase_row.challenge)
    aggregates = aggregates_by_submission(session, [s.id for s in submissions])
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
        stored = case_metrics_by_submission(session, [s.id for s in submissions])
        rows = {s.id: {**stored[s.id], **_substituted(substitute, s.id)} for s in submissions}
        paired = None if challenge.ranking.scheme == "aggregate-then-rank" else \
            common_cases(submissions)
        for ref in refs:
            own = {names[s.id]: case_values(session, challenge, dataset, s, ref.key,
                                            rows[s.id]) for s in submissions}
            per_case = own if paired is None else {
                names[s.id]: case_values(session, challenge, dataset, s, ref.key, rows[s.id],
                                         paired) for s in submissions}
            rankings.append(_rank(challenge.ranking.scheme, per_case,
                                  challenge.larger_is_better(ref.metric), aggregate))
            for s in submissions:
                scores[s.id][ref.key] = float(aggregate(own[names[s.id]]))
    final = rankings[0] if len(rankings) == 1 else consensus(rankings)
    source_checks = source_check_outcomes(session, [s.id for s in submissions])
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
            n_failed=n_failed, runtime_per_case=runtime, prize_eligible=s.prize_eligible,
            dataset_version=s.dataset_version, stale=is_stale(s),
            source_check=source_checks.get(s.id, "not checked")))
    return sorted(entries, key=lambda e: (e.rank, e.submission_id))


def aggregates_by_submission(session: Session, submission_ids: list[int]
                             ) -> dict[int, dict[str, dict]]:
    """{submission id: {metric: summary}}, one column query for all of them."""
    found: dict[int, dict[str, dict]] = {i: {} for i in submission_ids}
    for submission_id, metric, summary in session.execute(select(
            AggregateRow.submission_id, AggregateRow.metric, AggregateRow.summary).where(
            AggregateRow.submission_id.in_(submission_ids))):
        found[submission_id][metric] = summary
    return found


@dataclass
class _Substituted:
    """A case's values in place of its stored row (what case_values reads)."""

    valid: bool
    metrics: dict


def _substituted(substitute: dict[int, dict[str, dict]] | None,
                 submission_id: int) -> dict[str, _Substituted]:
    cases = (substitute or {}).get(submission_id, {})
    return {case_id: _Substituted(bool(c["valid"]), dict(c["metrics"]))
            for case_id, c in cases.items()}


def source_check_outcomes(session: Session, submission_ids: list[int]) -> dict[int, str]:
    """The open-source prize check of each submission: its latest re-run of an image built
    from its published source (`epreuve reproduce ID --build DIR`): verified (identical or
    within tolerance) or differs; a submission never checked is absent."""
    outcomes: dict[int, str] = {}
    for row in session.scalars(select(ReproductionRow).where(
            ReproductionRow.submission_id.in_(submission_ids),
            ReproductionRow.source == "built").order_by(ReproductionRow.id)):
        outcomes[row.submission_id] = "differs" if row.verdict == "differs" else "verified"
    return outcomes


def common_cases(submissions: list[SubmissionRow]) -> list[str]:
    """The cases every submission was evaluated on, in the first one's order (all of them
    when no dataset was re-sealed in between)."""
    shared = set.intersection(*(set(s.case_ids) for s in submissions))
    return [case_id for case_id in submissions[0].case_ids if case_id in shared]


def stability(session: Session, challenge_id: str, phase_slug: str, *, resamples: int = 1000,
              seed: int = 0) -> dict:
    """How firm the ranking is: cases resampled (seeded), every ranking metric re-ranked on
    the same sample, consensus again, compared with the full ranking by Kendall's tau."""
    phase_row, _ = find_phase(session, challenge_id, phase_slug)
    challenge = challenge_definition(phase_row.challenge)
    if challenge.task == "classification":
        raise ValueError("stability resamples per-case values: segmentation challenges only")
    submissions = latest_per_team(session, phase_row.id)
    if len(submissions) < 2:
        raise ValueError("a ranking needs at least two teams")
    dataset = load(phase_row.dataset_path)
    aggregate = np.median if challenge.ranking.aggregate == "median" else np.mean
    teams = {str(s.id): s.team.name for s in submissions}
    rows = case_metrics_by_submission(session, [s.id for s in submissions])
    cases = common_cases(submissions)
    per_metric = [(challenge.larger_is_better(ref.metric),
                   {str(s.id): case_values(session, challenge, dataset, s, ref.key, rows[s.id],
                                           cases)
                    for s in submissions}) for ref in challenge.ranking.metrics]

    def rank(indices) -> dict[str, int]:
        rankings = [_rank(challenge.ranking.scheme,
                          {a: [v[i] for i in indices] for a, v in values.items()},
                          larger, aggregate) for larger, values in per_metric]
        return rankings[0] if len(rankings) == 1 else consensus(rankings)

    n_cases = len(cases)
    full = rank(range(n_cases))
    rng = np.random.default_rng(seed)
    taus, samples = [], {a: [] for a in teams}
    for _ in range(resamples):
        ranks = rank(rng.integers(0, n_cases, size=n_cases))
        tau = kendalltau([full[a] for a in teams], [ranks[a] for a in teams]).statistic
        taus.append(1.0 if np.isnan(tau) else float(tau))
        for algorithm in teams:
            samples[algorithm].append(ranks[algorithm])
    return {
        "resamples": resamples, "seed": seed,
        "kendall_tau_mean": float(np.mean(taus)), "kendall_tau_median": float(np.median(taus)),
        "rank_frequencies": {teams[a]: {int(r): c / resamples for r, c in zip(
            *np.unique(samples[a], return_counts=True), strict=True)} for a in teams},
    }


def _rank(scheme: str, per_case: dict[str, list[float]], larger: bool, aggregate) -> dict:
    if scheme == "rank-then-aggregate":
        return rank_then_aggregate(per_case, larger)
    if scheme == "test-based":
        worst = min(min(v) for v in per_case.values()) if larger else max(
            max(v) for v in per_case.values())
        return rank_by_significance(per_case, larger, worst=worst)
    return aggregate_then_rank(per_case, larger, aggregate=aggregate)
