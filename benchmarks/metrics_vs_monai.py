"""Épreuve's segmentation metrics against MONAI's, on CT-sized masks, in one run.

    .venv/bin/python benchmarks/metrics_vs_monai.py [--repeat 3]

For each volume, both compute Dice, HD95, ASSD (symmetric) and NSD (1 mm) of one
label, the way a user of each library would: MONAI with one call per metric on
one-hot tensors, Épreuve with one `score_label` call that computes every metric
from one surface extraction. Printed: the median time of each, the ratio, and
the largest relative difference in value.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.scoring.segmentation import SegmentationSettings, score_label

NSD_TOLERANCE_MM = 1.0
CASES = {
    "512x512x300, spacing 0.8x0.8x1.5": ((512, 512, 300), (0.8, 0.8, 1.5)),
    "256^3, spacing 1x1x1": ((256, 256, 256), (1.0, 1.0, 1.0)),
}


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


def timed(function, *args, repeat: int) -> tuple[float, dict]:
    times, result = [], {}
    for _ in range(repeat):
        started = time.perf_counter()
        result = function(*args)
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import monai
    import torch

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    rows = []
    for name, (shape, spacing) in CASES.items():
        ref = organ_mask(shape, spacing, rng)
        pred = organ_mask(shape, spacing, rng, shift_mm=(1.6, -0.8, 1.5))
        monai_time, theirs = timed(monai_four, pred, ref, spacing, repeat=args.repeat)
        ours_time, ours = timed(ours_four, pred, ref, spacing, repeat=args.repeat)
        difference = max(abs(ours[k] - theirs[k]) / max(abs(theirs[k]), 1e-12) for k in ours)
        rows.append((name, int(ref.sum()), monai_time, ours_time, difference, ours))
    print(f"\nDice + HD95 + ASSD + NSD({NSD_TOLERANCE_MM:g} mm), one label, median of "
          f"{args.repeat} (MONAI {monai.__version__}, torch {torch.__version__}, CPU)\n")
    print("| volume | foreground voxels | MONAI | Épreuve | speed-up | largest relative "
          "difference | Épreuve values |")
    print("|---|---|---|---|---|---|---|")
    for name, voxels, monai_time, ours_time, difference, ours in rows:
        values = ", ".join(f"{k} {v:.4f}" for k, v in ours.items())
        print(f"| {name} | {voxels:,} | {monai_time:.2f} s | {ours_time:.3f} s "
              f"| {monai_time / ours_time:.1f}x | {difference:.1e} | {values} |")


if __name__ == "__main__":
    main()
