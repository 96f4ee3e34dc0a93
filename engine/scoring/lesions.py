"""Lesion-wise Dice and HD95, after the BraTS 2023 evaluation.

1. Lesions are the 26-connected components of each mask; components smaller
   than `min_voxels` are dropped from both masks (BraTS: 50 voxels).
2. Each reference lesion is dilated by `dilation` voxels (26-connected). Every
   predicted component touching the dilated lesion is matched to it; the
   lesion scores Dice and HD95 between itself and the union of its matches (no
   match: Dice 0, HD95 the worst distance).
3. Predicted components matched to no reference lesion are false positives,
   each scoring Dice 0 and the worst HD95.
4. Lesion-wise score = sum of the scores / (reference lesions + false positives).
   No lesion on either side: Dice 1, HD95 0.

The worst distance is the image diagonal in mm (BraTS uses a constant 374 mm),
and distances use the image's spacing (BraTS assumes 1 mm voxels).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from engine.scoring.conventions import image_diagonal_mm
from engine.scoring.segmentation import SegmentationSettings, score_label

FULL_CONNECTIVITY = ndimage.generate_binary_structure(3, 3)  # 26 neighbours


def _components(mask: np.ndarray, min_voxels: int) -> tuple[np.ndarray, list[int]]:
    labelled, count = ndimage.label(mask, structure=FULL_CONNECTIVITY)
    if count == 0:
        return labelled, []
    sizes = np.bincount(labelled.ravel())
    kept = [i for i in range(1, count + 1) if sizes[i] >= min_voxels]
    return labelled, kept


def lesion_wise(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...], *,
                min_voxels: int = 50, dilation: int = 3) -> dict[str, float]:
    worst = image_diagonal_mm(pred.shape, spacing)
    ref_labels, ref_lesions = _components(ref, min_voxels)
    pred_labels, pred_lesions = _components(pred, min_voxels)
    kept_pred = np.isin(pred_labels, pred_lesions)
    if not ref_lesions and not pred_lesions:
        return {"lesion_dice": 1.0, "lesion_hd95": 0.0, "lesions": 0.0,
                "false_positive_lesions": 0.0}
    settings = SegmentationSettings()
    matched: set[int] = set()
    dice_sum, hd95_sum = 0.0, 0.0
    for lesion in ref_lesions:
        lesion_mask = ref_labels == lesion
        grown = ndimage.binary_dilation(lesion_mask, structure=FULL_CONNECTIVITY,
                                        iterations=dilation)
        touching = np.unique(pred_labels[grown & kept_pred])
        touching = [int(t) for t in touching if t != 0]
        matched.update(touching)
        if not touching:
            hd95_sum += worst
            continue
        scores = score_label(np.isin(pred_labels, touching), lesion_mask, spacing, settings)
        dice_sum += scores["dice"]
        hd95_sum += scores["hd95"]
    false_positives = [p for p in pred_lesions if p not in matched]
    hd95_sum += worst * len(false_positives)
    denominator = len(ref_lesions) + len(false_positives)
    return {
        "lesion_dice": dice_sum / denominator,
        "lesion_hd95": hd95_sum / denominator,
        "lesions": float(len(ref_lesions)),
        "false_positive_lesions": float(len(false_positives)),
    }
