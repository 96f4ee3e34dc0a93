"""Per-case Dice and false-positive volume of label 1, the organiser's own way."""

import json
import os

import nibabel as nib
import numpy as np

with open("/input/cases.json") as handle:
    case_ids = [case["case_id"] for case in json.load(handle)["cases"]]

cases = {}
for case_id in case_ids:
    prediction_path = f"/input/predictions/{case_id}/mask.nii.gz"
    if not os.path.exists(prediction_path):
        continue  # the engine gives a case with no entry the worst value
    prediction = np.asarray(nib.load(prediction_path).dataobj) == 1
    reference = np.asarray(nib.load(f"/input/ground_truth/{case_id}/label.nii.gz").dataobj) == 1
    total = prediction.sum() + reference.sum()
    dice = 1.0 if total == 0 else 2.0 * np.logical_and(prediction, reference).sum() / total
    voxel_ml = float(np.prod(nib.load(prediction_path).header.get_zooms()[:3])) / 1000
    false_positive_ml = float(np.logical_and(prediction, ~reference).sum() * voxel_ml)
    cases[case_id] = {"dice": float(dice), "false_positive_ml": false_positive_ml}

with open("/output/metrics.json", "w") as handle:
    json.dump({"cases": cases}, handle)
print(f"evaluated {len(cases)} of {len(case_ids)} cases")
