"""The conventions every metric follows, written down once.

Empty masks (per label; "empty" means no voxel of that label):

| case | Dice, IoU | NSD | HD, HD95, ASSD, MASD | sensitivity | precision |
|---|---|---|---|---|---|
| both empty | 1 | 1 | 0 | 1 | 1 |
| reference empty, prediction not | 0 | 0 | image diagonal (mm) | 1 (nothing to find) | 0 |
| prediction empty, reference not | 0 | 0 | image diagonal (mm) | 0 | 1 (nothing claimed) |

Never nan, never inf, never dropped. The values of the "both empty" and "one
empty" rows are configurable per challenge (`EmptyMaskPolicy`); `"diagonal"`
means the length of the image's diagonal in millimetres, the largest distance
two points of the image can have.

A case with no valid output (the run failed, the file is missing or invalid)
receives each metric's worst value (`worst_value`), and counts as failed in
the aggregates: it lowers the average, it never vanishes from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

LARGER_IS_BETTER = {"dice", "iou", "nsd", "sensitivity", "precision", "specificity",
                    "lesion_dice", "roc_auc", "average_precision", "accuracy",
                    "balanced_accuracy"}
SMALLER_IS_BETTER = {"hd", "hd95", "assd", "masd", "abs_volume_difference_ml", "lesion_hd95",
                     "brier"}
SEGMENTATION_METRICS = ("dice", "iou", "hd", "hd95", "assd", "masd", "nsd",
                        "volume_difference_ml", "abs_volume_difference_ml", "sensitivity",
                        "precision", "specificity")


def larger_is_better(metric: str) -> bool:
    """The direction of a metric; per-class and averaged variants ("roc_auc[tumour]",
    "roc_auc_macro") share their base metric's."""
    base = metric.split("[")[0].removesuffix("_macro").removesuffix("_micro")
    if base in LARGER_IS_BETTER:
        return True
    if base in SMALLER_IS_BETTER:
        return False
    raise ValueError(f"metric {metric!r} has no ranking direction (signed volume difference "
                     "is descriptive only)")


Fill = float | Literal["diagonal"]


@dataclass(frozen=True)
class EmptyMaskPolicy:
    both_empty_overlap: float = 1.0  # Dice, IoU
    both_empty_nsd: float = 1.0
    both_empty_distance: Fill = 0.0  # HD, HD95, ASSD, MASD
    one_empty_overlap: float = 0.0
    one_empty_nsd: float = 0.0
    one_empty_distance: Fill = "diagonal"

    def distance(self, fill: Fill, diagonal_mm: float) -> float:
        return diagonal_mm if fill == "diagonal" else float(fill)


def image_diagonal_mm(shape: tuple[int, ...], spacing: tuple[float, ...]) -> float:
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing, strict=True))))


def worst_value(metric: str, *, diagonal_mm: float, reference_volume_ml: float = 0.0) -> float:
    """What a case without a valid output scores: as bad as the metric allows."""
    if metric in ("hd", "hd95", "assd", "masd", "lesion_hd95"):
        return diagonal_mm
    if metric == "volume_difference_ml":
        return -reference_volume_ml  # as if nothing had been predicted
    if metric == "abs_volume_difference_ml":
        return reference_volume_ml
    if metric == "brier":
        return 1.0
    if metric in LARGER_IS_BETTER:
        return 0.0
    raise ValueError(f"no worst value defined for {metric!r}")


def finite(value: float) -> float:
    if not np.isfinite(value):
        raise ValueError(f"metric value {value} is not finite: a convention is missing")
    return float(value)
