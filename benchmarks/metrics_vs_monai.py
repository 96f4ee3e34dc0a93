"""Épreuve's segmentation metrics against MONAI's on CT-sized masks, one core each and all cores.

    .venv/bin/python benchmarks/metrics_vs_monai.py [--repeats 5] [--warmup 1] [--quick]
                                                    [--json out.json]

For each volume both compute Dice, HD95, ASSD (symmetric) and NSD (1 mm) of one
label, the way a user of each library would: MONAI with one call per metric on
one-hot tensors, Épreuve with one `score_label` call that computes every metric
from one surface extraction. Rounds alternate which library goes first
(benchmarks/harness.py).

Two thread settings, each applied to both sides alike:
- one core: the process is pinned to one CPU (sched_setaffinity), torch uses one
  thread and threadpoolctl limits every BLAS/OpenMP pool to one. Our KD-tree
  query asks for every core (workers=-1); pinned, its threads share the one CPU.
- all cores: no pinning, torch and the pools at the machine's core count.
Then our time is broken down by step (printed, on the largest volume).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness
from engine.scoring.segmentation import SegmentationSettings, distance_metrics, score_label
from engine.scoring.surface import bounding_box, edge_distances, edges

NSD_TOLERANCE_MM = 1.0
CASES = {
    "512x512x300, spacing 0.8x0.8x1.5": ((512, 512, 300), (0.8, 0.8, 1.5)),
    "256^3, spacing 1x1x1": ((256, 256, 256), (1.0, 1.0, 1.0)),
}
QUICK_CASES = {"64^3, spacing 1x1x1": ((64, 64, 64), (1.0, 1.0, 1.0))}


def organ_mask(shape, spacing, rng, shift_mm=(0.0, 0.0, 0.0), wobble=0.06) -> np.ndarray:
    """A liver-sized blob with a lumpy surface (low-frequency harmonics of the radius)."""
    axes = [(np.arange(n) - n / 2) * s - d for n, s, d in zip(shape, spacing, shift_mm,
                                                               strict=True)]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    radii = np.array([0.32, 0.26, 0.3]) * np.array(shape) * np.array(spacing)
    r = np.sqrt((x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (z / radii[2]) ** 2)
    theta = np.arctan2(y, x)
    phi = np.arctan2(z, np.sqrt(x ** 2 + y ** 2))
    bumps = sum(wobble / k * np.sin(k * theta + rng.uniform(0, 6.3)) * np.cos(
        k * phi + rng.uniform(0, 6.3)) for k in range(1, 6))
    return r <= 1.0 + bumps


def monai_four(pred: np.ndarray, ref: np.ndarray, spacing) -> dict[str, float]:
    import torch
    from monai.metrics import (
        compute_average_surface_distance,
        compute_dice,
        compute_hausdorff_distance,
        compute_surface_dice,
    )

    p = torch.from_numpy(np.stack([~pred, pred])[None])
    r = torch.from_numpy(np.stack([~ref, ref])[None])
    spacing = list(spacing)
    return {
        "dice": float(compute_dice(p, r, include_background=False)[0, 0]),
        "hd95": float(compute_hausdorff_distance(p, r, include_background=False, percentile=95,
                                                 spacing=spacing)[0, 0]),
        "assd": float(compute_average_surface_distance(p, r, include_background=False,
                                                       symmetric=True, spacing=spacing)[0, 0]),
        "nsd": float(compute_surface_dice(p, r, class_thresholds=[NSD_TOLERANCE_MM],
                                          include_background=False, spacing=spacing)[0, 0]),
    }


def ours_four(pred: np.ndarray, ref: np.ndarray, spacing) -> dict[str, float]:
    scores = score_label(pred, ref, spacing, SegmentationSettings(
        nsd_tolerance_mm=NSD_TOLERANCE_MM))
    return {k: scores[k] for k in ("dice", "hd95", "assd", "nsd")}


@contextlib.contextmanager
def threads(one_core: bool) -> Iterator[str]:
    """Both libraries on one CPU, or on every CPU this process may use."""
    import torch
    from threadpoolctl import threadpool_limits

    allowed = os.sched_getaffinity(0)
    count = 1 if one_core else len(allowed)
    previous = torch.get_num_threads()
    if one_core:
        os.sched_setaffinity(0, {min(allowed)})
    torch.set_num_threads(count)
    try:
        with threadpool_limits(limits=count):
            yield (f"pinned to CPU {min(allowed)}, torch 1 thread, BLAS/OpenMP pools 1"
                   if one_core else f"{count} CPUs, torch {count} threads, pools {count}")
    finally:
        os.sched_setaffinity(0, allowed)
        torch.set_num_threads(previous)


def storing(function, results: dict, key: str, *args) -> harness.Contender:
    """A contender that times `function(*args)` and keeps its last value."""
    def run() -> float:
        started = time.perf_counter()
        results[key] = function(*args)
        return time.perf_counter() - started
    return run


def largest_relative_difference(ours: dict, theirs: dict) -> float:
    return max(abs(ours[k] - theirs[k]) / max(abs(theirs[k]), 1e-12) for k in ours)


def ours_by_step(pred: np.ndarray, ref: np.ndarray, spacing, repeats: int) -> dict:
    """score_label's work, step by step, with the same functions it calls."""
    steps: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeats):
        marks = [time.perf_counter()]
        box = bounding_box(pred, ref)
        marks.append(time.perf_counter())
        p, r = pred[box], ref[box]
        _ = (np.count_nonzero(p), np.count_nonzero(r), np.count_nonzero(p & r))
        marks.append(time.perf_counter())
        p_edges, r_edges = edges(p), edges(r)
        marks.append(time.perf_counter())
        distances = edge_distances(p_edges, r_edges, spacing)
        marks.append(time.perf_counter())
        distance_metrics(distances, NSD_TOLERANCE_MM)
        marks.append(time.perf_counter())
        names = ("bounding box", "crop + overlap counts", "both surfaces (edges)",
                 "surface coordinates + two KD-tree builds and queries",
                 "metrics from the distances")
        for name, start, stop in zip(names, marks, marks[1:], strict=False):
            steps[name].append(stop - start)
        steps["sum of the steps"].append(marks[-1] - marks[0])
    return steps


def main(argv: list[str] | None = None) -> None:
    args = harness.arguments(__doc__.splitlines()[0], repeats=5, argv=argv)
    env = harness.environment(docker=False)
    harness.print_environment(env)
    cases = QUICK_CASES if args.quick else CASES
    rng = np.random.default_rng(0)
    results: dict = {}
    largest = next(iter(cases))
    for name, (shape, spacing) in cases.items():
        ref = organ_mask(shape, spacing, rng)
        pred = organ_mask(shape, spacing, rng, shift_mm=(1.6, -0.8, 1.5))
        print(f"\n{name}: {int(ref.sum()):,} reference voxels, {int(pred.sum()):,} predicted")
        for one_core in (True, False):
            values: dict = {}
            with threads(one_core) as setting:
                measurement = harness.measure({
                    "Épreuve": storing(ours_four, values, "ours", pred, ref, spacing),
                    "MONAI": storing(monai_four, values, "monai", pred, ref, spacing),
                }, repeats=args.repeats, warmup=args.warmup, log=harness.progress)
                steps = (ours_by_step(pred, ref, spacing, max(args.repeats, 1))
                         if name == largest else {})
            difference = largest_relative_difference(values["ours"], values["monai"])
            title = f"{name}, {'one core' if one_core else 'all cores'} ({setting})"
            harness.print_rounds(measurement, title)
            harness.print_summary(measurement, title)
            speedup = harness.spread([1 / r for r in measurement.ratios("MONAI")])
            print(f"\nspeed-up MONAI / Épreuve, per round: median {speedup.median:.1f}x, "
                  f"min - max {speedup.minimum:.1f}x - {speedup.maximum:.1f}x")
            print(f"largest relative difference in value: {difference:.1e}; Épreuve: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in values["ours"].items())
                  + "; MONAI: " + ", ".join(f"{k} {v:.4f}" for k, v in values["monai"].items()))
            if steps:
                harness.print_steps(f"where Épreuve's time goes, {title}", steps)
            results[title] = {**measurement.to_dict(), "difference": difference,
                              "values": values, "steps": steps}
    harness.print_load()
    harness.write_json(args.json, "metrics_vs_monai", env, results)


if __name__ == "__main__":
    main()
