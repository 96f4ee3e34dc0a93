"""Leaderboard rankings, with the semantics of the challengeR package (Wiesenfarth et al.).

Input: for each algorithm, its value per case (None where the case failed or is
missing). `larger_is_better` gives the direction. Ties get the smallest rank
they span (`min`, as R's rank(ties.method = "min")).

- aggregate-then-rank: aggregate each algorithm over cases (mean by default),
  then rank the aggregates. Missing values: replaced by `worst` when given,
  else the algorithm's aggregate is missing and it ranks after every other.
- rank-then-aggregate: rank the algorithms within each case (a missing value
  takes the worst rank, the number of algorithms), average each algorithm's
  ranks, then rank those means.
- test-based: for every ordered pair (A, B), a one-sided Wilcoxon signed-rank
  test on the paired cases (normal approximation with continuity correction
  when ties or zeros make the exact test impossible, as R's wilcox.test), at
  level alpha; A's significance share is the fraction of other algorithms it
  beats significantly. Algorithms are ranked by share, larger first. Missing
  values are replaced by `worst` (required).
- consensus over several metrics: the mean of an algorithm's ranks across
  metrics, then ranked (smaller mean rank first).
- stability: rankings recomputed on bootstrap samples of cases (seeded), each
  compared with the full ranking by Kendall's tau.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import kendalltau, rankdata, wilcoxon

Values = dict[str, list[float | None]]  # algorithm -> value per case (same case order)


def rank_values(scores: dict[str, float | None], larger_is_better: bool) -> dict[str, int]:
    """Ranks 1..n with ties at their minimum; missing scores rank after all others."""
    names = list(scores)
    present = [n for n in names if scores[n] is not None and not np.isnan(scores[n])]
    keys = np.array([-scores[n] if larger_is_better else scores[n] for n in present], float)
    ranks = {n: int(r) for n, r in zip(present, rankdata(keys, method="min"), strict=True)}
    for name in names:
        if name not in ranks:
            ranks[name] = len(present) + 1
    return ranks


def _filled(values: Values, worst: float | None) -> dict[str, np.ndarray]:
    return {a: np.array([np.nan if v is None else v for v in vs] if worst is None else
                        [worst if v is None else v for v in vs], dtype=float)
            for a, vs in values.items()}


def aggregate_then_rank(values: Values, larger_is_better: bool, *, worst: float | None = None,
                        aggregate: Callable = np.mean) -> dict[str, int]:
    filled = _filled(values, worst)
    scores = {}
    for algorithm, data in filled.items():
        scores[algorithm] = None if np.isnan(data).any() or data.size == 0 else float(
            aggregate(data))
    return rank_values(scores, larger_is_better)


def rank_then_aggregate(values: Values, larger_is_better: bool, *,
                        aggregate: Callable = np.mean) -> dict[str, int]:
    algorithms = list(values)
    n_cases = len(next(iter(values.values())))
    per_case_ranks = {a: [] for a in algorithms}
    for case in range(n_cases):
        case_scores = {a: values[a][case] for a in algorithms}
        present = {a: v for a, v in case_scores.items() if v is not None}
        ranks = rank_values(present, larger_is_better) if present else {}
        for algorithm in algorithms:
            per_case_ranks[algorithm].append(ranks.get(algorithm, len(algorithms)))
    mean_ranks = {a: float(aggregate(r)) for a, r in per_case_ranks.items()}
    return rank_values(mean_ranks, larger_is_better=False)


def one_sided_wilcoxon(better: np.ndarray, other: np.ndarray, larger_is_better: bool) -> float:
    """p-value of 'better beats other' on paired cases."""
    differences = better - other if larger_is_better else other - better
    if np.all(differences == 0):
        return 1.0
    has_ties = len(np.unique(np.abs(differences[differences != 0]))) < np.count_nonzero(
        differences)
    exact_possible = not has_ties and np.all(differences != 0) and len(differences) < 50
    method = "exact" if exact_possible else "approx"
    result = wilcoxon(differences, alternative="greater", zero_method="wilcox",
                      correction=method == "approx", method=method)
    return float(result.pvalue)


def significance_shares(values: Values, larger_is_better: bool, *, worst: float,
                        alpha: float = 0.05) -> dict[str, float]:
    filled = _filled(values, worst)
    algorithms = list(filled)
    if len(algorithms) < 2:
        return dict.fromkeys(algorithms, 0.0)
    shares = {}
    for a in algorithms:
        wins = sum(one_sided_wilcoxon(filled[a], filled[b], larger_is_better) < alpha
                   for b in algorithms if b != a)
        shares[a] = wins / (len(algorithms) - 1)
    return shares


def rank_by_significance(values: Values, larger_is_better: bool, *, worst: float,
               alpha: float = 0.05) -> dict[str, int]:
    shares = significance_shares(values, larger_is_better, worst=worst, alpha=alpha)
    return rank_values(shares, larger_is_better=True)


def consensus(rankings: list[dict[str, int]]) -> dict[str, int]:
    """Mean rank over several rankings (one per metric), ranked again."""
    algorithms = list(rankings[0])
    mean_ranks = {a: float(np.mean([r[a] for r in rankings])) for a in algorithms}
    return rank_values(mean_ranks, larger_is_better=False)


def bootstrap_stability(values: Values, rank: Callable[[Values], dict[str, int]], *,
                        resamples: int = 1000, seed: int = 0) -> dict:
    """Kendall's tau between the full ranking and rankings of bootstrap samples of cases."""
    algorithms = list(values)
    n_cases = len(values[algorithms[0]])
    full = rank(values)
    rng = np.random.default_rng(seed)
    taus, rank_samples = [], {a: [] for a in algorithms}
    for _ in range(resamples):
        picks = rng.integers(0, n_cases, size=n_cases)
        sample = {a: [values[a][i] for i in picks] for a in algorithms}
        ranks = rank(sample)
        for algorithm in algorithms:
            rank_samples[algorithm].append(ranks[algorithm])
        tau = kendalltau([full[a] for a in algorithms], [ranks[a] for a in algorithms]).statistic
        taus.append(1.0 if np.isnan(tau) else float(tau))
    return {
        "kendall_tau_mean": float(np.mean(taus)),
        "kendall_tau_median": float(np.median(taus)),
        "rank_frequencies": {a: {int(r): c / resamples for r, c in zip(
            *np.unique(rank_samples[a], return_counts=True), strict=True)} for a in algorithms},
    }
