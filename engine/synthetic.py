"""Synthetic CT-like phantoms with label maps: data for the demo, the tests and the benchmarks.

Each case is an abdomen-like slab: air, a body ellipse with a fat rim, a spine,
a liver (label 1) and zero to three ellipsoid lesions inside it, tumours
(label 2, hypodense) or cysts (label 3, near water). Values are Hounsfield
units with Gaussian noise; the voxel grid is anisotropic (thin in-plane, 2.5 mm
slices) and oriented as scanners write it (LPS, converted to RAS+ here).
Deterministic: the same seed gives the same bytes.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.medio import Volume, write_dicom_series, write_nifti
from engine.medio.volume import affine_from_lps

LABELS = {0: "background", 1: "liver", 2: "tumour", 3: "cyst"}
FIELD_OF_VIEW_MM = 380.0
SLICE_MM = 2.5
HU = {"air": -1000, "fat": -100, "soft tissue": 40, "bone": 700, "liver": 60, "tumour": 25,
      "cyst": 5}
NOISE_HU = 12.0


@dataclass(frozen=True)
class SyntheticCase:
    case_id: str
    image: Volume  # int16 Hounsfield units
    labels: Volume  # uint8 label map on the same grid
    has_tumour: bool


def case_grid(size: int) -> tuple[tuple[int, int, int], np.ndarray]:
    depth = max(8, (size * 2) // 3)
    spacing = (FIELD_OF_VIEW_MM / size, FIELD_OF_VIEW_MM / size, SLICE_MM)
    origin = (-FIELD_OF_VIEW_MM / 2, -FIELD_OF_VIEW_MM / 2, -depth * SLICE_MM / 2)
    return (size, size, depth), affine_from_lps(np.eye(3), spacing, origin)


def _ellipsoid(coords, centre, radii) -> np.ndarray:
    x, y, z = coords
    return (((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
            + ((z - centre[2]) / radii[2]) ** 2) <= 1.0


def synth_case(case_id: str, rng: np.random.Generator, size: int = 96) -> SyntheticCase:
    shape, affine = case_grid(size)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
    coords = np.meshgrid(*axes, indexing="ij", sparse=True)  # millimetres from the centre
    image = np.full(shape, HU["air"], dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)

    body_radii = (FIELD_OF_VIEW_MM * rng.uniform(0.38, 0.44), FIELD_OF_VIEW_MM *
                  rng.uniform(0.28, 0.33), 1e9)
    image[_ellipsoid(coords, (0, 0, 0), body_radii)] = HU["fat"]
    inner = (body_radii[0] - 12, body_radii[1] - 12, 1e9)
    image[_ellipsoid(coords, (0, 0, 0), inner)] = HU["soft tissue"]
    spine_centre = (0, body_radii[1] * 0.55, 0)  # posterior (+y in LPS index space)
    image[_ellipsoid(coords, spine_centre, (18, 16, 1e9))] = HU["bone"]

    liver_centre = (-body_radii[0] * 0.35, -body_radii[1] * 0.15, rng.uniform(-10, 10))
    liver_radii = (rng.uniform(55, 75), rng.uniform(45, 60), rng.uniform(45, 70))
    liver = _ellipsoid(coords, liver_centre, liver_radii)
    image[liver] = HU["liver"]
    labels[liver] = 1

    has_tumour = False
    for _ in range(rng.integers(0, 4)):
        kind = 2 if rng.random() < 0.6 else 3
        radii = tuple(rng.uniform(6, 18, size=3))
        # inside the liver: an offset of at most half its radius minus the lesion's
        offset = [rng.uniform(-0.5, 0.5) * max(lr - r, 0)
                  for lr, r in zip(liver_radii, radii, strict=True)]
        centre = tuple(c + o for c, o in zip(liver_centre, offset, strict=True))
        lesion = _ellipsoid(coords, centre, radii) & liver
        image[lesion] = HU["tumour" if kind == 2 else "cyst"]
        labels[lesion] = kind
        has_tumour |= kind == 2 and bool(lesion.any())

    image += rng.normal(0.0, NOISE_HU, size=shape).astype(np.float32)
    ct = Volume(np.clip(np.rint(image), -1024, 3071).astype(np.int16), affine, modality="CT")
    return SyntheticCase(case_id, ct, Volume(labels, affine, modality="SEG"), has_tumour)


def synth_dataset(root: Path, *, cases: int, image_format: str = "nifti",
                  task: str = "segmentation", seed: int = 0, size: int = 96) -> list[str]:
    """Write a dataset ready to seal: inputs/, ground_truth/ and a dataset.json description."""
    if image_format not in ("nifti", "dicom"):
        raise ValueError(f"unknown format {image_format!r}: use nifti or dicom")
    if task not in ("segmentation", "classification"):
        raise ValueError(f"unknown task {task!r}: use segmentation or classification")
    if cases < 1 or size < 16:
        raise ValueError("need at least one case and a size of at least 16")
    root.mkdir(parents=True, exist_ok=True)
    case_ids, rows = [], []
    for index in range(cases):
        case_id = f"case-{index + 1:03d}"
        case = synth_case(case_id, np.random.default_rng([seed, index]), size)
        inputs = root / "inputs" / case_id
        if image_format == "nifti":
            write_nifti(case.image, inputs / "ct.nii.gz")
        else:
            write_dicom_series(case.image, inputs / "ct", patient_id=case_id,
                               series_description="synthetic CT", uid_seed=f"{seed}-{case_id}")
        if task == "segmentation":
            write_nifti(case.labels, root / "ground_truth" / case_id / "label.nii.gz")
        rows.append((case_id, int(case.has_tumour)))
        case_ids.append(case_id)
    if task == "classification":
        (root / "ground_truth").mkdir(exist_ok=True)
        with open(root / "ground_truth" / "labels.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["case_id", "label"])
            writer.writerows(rows)
    (root / "dataset.json").write_text(json.dumps(_description(task, image_format, seed, size),
                                                  indent=2, sort_keys=True) + "\n")
    return case_ids


def _description(task: str, image_format: str, seed: int, size: int) -> dict:
    description = {
        "name": f"synthetic-abdomen-ct-{task}",
        "task": task,
        "modality": "CT",
        "license": "CC0-1.0",
        "citation": "Épreuve synthetic abdomen CT phantoms "
                    f"(seed {seed}, size {size}, {image_format}); generated, no patient data.",
        "input": "ct" if image_format == "dicom" else "ct.nii.gz",
    }
    if task == "segmentation":
        description["labels"] = {str(k): v for k, v in LABELS.items()}
        description["ground_truth"] = "label.nii.gz"
    else:
        description["classes"] = {"0": "no tumour", "1": "tumour present"}
    return description
