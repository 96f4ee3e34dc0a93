"""Scoring many cases: in parallel processes, each reading its own pair of files.

Scoring is trusted code that runs on the host, never in the participant's
container: it is the only reader of the ground truth.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.medio import geometry_differences, read_volume
from engine.scoring.lesions import lesion_wise
from engine.scoring.segmentation import SegmentationSettings, score_segmentation


@dataclass(frozen=True)
class CasePair:
    case_id: str
    prediction: Path
    reference: Path


@dataclass(frozen=True)
class LesionSettings:
    enabled: bool = False
    min_voxels: int = 50
    dilation: int = 3


def score_pair(prediction: np.ndarray, reference: np.ndarray, spacing: tuple[float, ...],
               settings: SegmentationSettings,
               lesions: LesionSettings = LesionSettings()) -> dict[int, dict[str, float]]:
    scores = score_segmentation(prediction, reference, spacing, settings)
    if lesions.enabled:
        for label in settings.labels:
            scores[label].update(lesion_wise(prediction == label, reference == label, spacing,
                                             min_voxels=lesions.min_voxels,
                                             dilation=lesions.dilation))
    return scores


def score_files(pair: CasePair, settings: SegmentationSettings,
                lesions: LesionSettings = LesionSettings()) -> dict[int, dict[str, float]]:
    prediction, reference = read_volume(pair.prediction), read_volume(pair.reference)
    problems = geometry_differences(prediction.geometry, reference.geometry)
    if problems:
        raise ValueError(f"case {pair.case_id}: prediction and reference differ: "
                         f"{'; '.join(problems)}")
    return score_pair(np.asarray(prediction.array), np.asarray(reference.array),
                      reference.spacing, settings, lesions)


def score_cases(pairs: Iterable[CasePair], settings: SegmentationSettings,
                lesions: LesionSettings = LesionSettings(), *, workers: int | None = None,
                on_done: Callable[[str], None] | None = None,
                ) -> dict[str, dict[int, dict[str, float]]]:
    """{case_id: {label: {metric: value}}}, computed in `workers` processes (default: all cores)."""
    pairs = list(pairs)
    workers = workers or os.cpu_count() or 1
    results: dict[str, dict[int, dict[str, float]]] = {}
    if workers == 1 or len(pairs) == 1:
        for pair in pairs:
            results[pair.case_id] = score_files(pair, settings, lesions)
            if on_done:
                on_done(pair.case_id)
        return results
    with ProcessPoolExecutor(max_workers=min(workers, len(pairs))) as pool:
        futures = {pool.submit(score_files, pair, settings, lesions): pair for pair in pairs}
        for future in as_completed(futures):
            results[futures[future].case_id] = future.result()
            if on_done:
                on_done(futures[future].case_id)
    return {pair.case_id: results[pair.case_id] for pair in pairs}
