"""Per-case values into per-submission statistics, with failures counted, never dropped.

A case whose output was missing or invalid is passed in as None and replaced by
the metric's worst value before any statistic is computed; `n_failed` says how
many. Confidence intervals are percentile bootstrap intervals over cases,
seeded so that the same data always gives the same interval.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_BOOTSTRAP = 1000


@dataclass(frozen=True)
class Summary:
    n: int
    n_failed: int
    mean: float
    median: float
    std: float
    q25: float
    q75: float
    minimum: float
    maximum: float
    ci_low: float
    ci_high: float

    def to_dict(self) -> dict:
        return asdict(self)


def fill_failed(values: list[float | None], worst: float | list[float]) -> tuple[np.ndarray, int]:
    """None -> the worst value (one for all cases, or one per case)."""
    worst_per_case = worst if isinstance(worst, list) else [worst] * len(values)
    filled = [w if v is None else v for v, w in zip(values, worst_per_case, strict=True)]
    return np.asarray(filled, dtype=float), sum(v is None for v in values)


def summarise(values: list[float | None], worst: float | list[float], *,
              confidence: float = 0.95, bootstrap: int = DEFAULT_BOOTSTRAP,
              seed: int = 0) -> Summary:
    if not values:
        raise ValueError("nothing to summarise: no cases")
    data, n_failed = fill_failed(values, worst)
    low, high = bootstrap_ci(data, confidence=confidence, resamples=bootstrap, seed=seed)
    return Summary(
        n=len(data), n_failed=n_failed, mean=float(data.mean()), median=float(np.median(data)),
        std=float(data.std(ddof=1)) if len(data) > 1 else 0.0,
        q25=float(np.percentile(data, 25)), q75=float(np.percentile(data, 75)),
        minimum=float(data.min()), maximum=float(data.max()), ci_low=low, ci_high=high,
    )


def bootstrap_ci(data: np.ndarray, *, confidence: float = 0.95,
                 resamples: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                 statistic=np.mean) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` over cases."""
    if len(data) == 1 or resamples == 0:
        value = float(statistic(data))
        return value, value
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, len(data), size=(resamples, len(data)))
    stats = statistic(data[indices], axis=1)
    alpha = (1.0 - confidence) / 2.0
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1.0 - alpha))
