"""Is what the container wrote a valid answer? Checked before any scoring, per case.

Segmentation: `/output/<case_id>/<filename>` must be a regular file that loads,
declares no more voxel data than allowed (checked from the header, before any
data is read: a gzip bomb costs nothing), lies on the reference grid (shape,
spacing, orientation, origin within tolerance), and holds integer labels from
the allowed set with no NaN. Integral values stored as floats (1.0) are
accepted; anything else (0.5) is not.

Probabilities: one table `/output/<filename>` (CSV or JSON) with one row per case
and one value in [0, 1] per class.

Every refusal is OUTPUT_MISSING or OUTPUT_INVALID, names the case, and says
what to change.
"""

from __future__ import annotations

import csv
import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, Field

from engine.medio import (
    Geometry,
    GeometryTolerance,
    MedioError,
    geometry_differences,
    read_header,
    read_volume,
)
from runners.base import FailureReason

MAX_TABLE_BYTES = 64 << 20


class SegmentationOutput(BaseModel):
    kind: Literal["segmentation"] = "segmentation"
    filename: str = "mask.nii.gz"
    labels: list[int] = Field(default_factory=lambda: [0, 1])
    max_voxel_bytes: int = 2 << 30  # from the header's dimensions and data type


class ProbabilityOutput(BaseModel):
    kind: Literal["probabilities"] = "probabilities"
    filename: str = "predictions.csv"
    classes: list[str] = Field(default_factory=lambda: ["probability"])


OutputSpec = Annotated[SegmentationOutput | ProbabilityOutput, Field(discriminator="kind")]


@dataclass
class CaseOutput:
    case_id: str
    reason: FailureReason | None
    message: str
    mask: np.ndarray | None = None  # segmentation, when valid
    probabilities: dict[str, float] | None = None  # classification, when valid

    @property
    def valid(self) -> bool:
        return self.reason is None


def _missing(case_id: str, message: str) -> CaseOutput:
    return CaseOutput(case_id, FailureReason.OUTPUT_MISSING, message)


def _invalid(case_id: str, message: str) -> CaseOutput:
    return CaseOutput(case_id, FailureReason.OUTPUT_INVALID, message)


def validate_segmentation(output_root: Path, case_id: str, spec: SegmentationOutput,
                          reference: Geometry, *, skipped: frozenset[str] = frozenset(),
                          tolerance: GeometryTolerance = GeometryTolerance()) -> CaseOutput:
    rel = f"{case_id}/{spec.filename}"
    where = f"case {case_id}: /output/{rel}"
    if any(entry.startswith(f"{rel} ") for entry in skipped):
        return _invalid(case_id, f"{where} was not a regular file (a link or a special file) "
                                 "and was not collected; write a regular file")
    path = Path(output_root) / case_id / spec.filename
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return _missing(case_id, f"{where} was not written{_listing(Path(output_root), case_id)}")
    if not stat.S_ISREG(mode):
        return _invalid(case_id, f"{where} is not a regular file (links, directories and "
                                 "devices are refused)")
    try:
        header = read_header(path)
    except MedioError as exc:
        return _invalid(case_id, f"{where} cannot be read: {exc}")
    if header.declared_bytes > spec.max_voxel_bytes:
        return _invalid(case_id, f"{where} declares {header.declared_bytes} bytes of voxel data "
                                 f"{list(header.geometry.shape)} x {header.dtype}, more than the "
                                 f"{spec.max_voxel_bytes} allowed")
    problems = geometry_differences(header.geometry, reference, tolerance)
    if problems:
        return _invalid(case_id, f"{where} is not on the input image's voxel grid: "
                                 f"{'; '.join(problems)}. Copy the input's header (affine) "
                                 "to the mask and do not resample")
    try:
        array = np.asarray(read_volume(path).array)
    except MedioError as exc:
        return _invalid(case_id, f"{where} cannot be read: {exc}")
    return _check_labels(case_id, where, array, spec.labels)


def _check_labels(case_id: str, where: str, array: np.ndarray, allowed: list[int]) -> CaseOutput:
    if array.dtype.kind == "f":
        if np.isnan(array).any():
            return _invalid(case_id, f"{where} contains NaN; a label map holds integer labels")
        if not np.array_equal(array, np.rint(array)):
            example = array[array != np.rint(array)].flat[0]
            return _invalid(case_id, f"{where} holds non-integer values such as {example:g}: "
                                     "threshold probabilities and save the mask as uint8")
    elif array.dtype.kind not in "iub":
        return _invalid(case_id, f"{where} has data type {array.dtype}; save the mask as uint8")
    values = np.unique(array)
    unknown = sorted(set(values.astype(np.int64).tolist()) - set(allowed))
    if unknown:
        return _invalid(case_id, f"{where} holds label(s) {unknown[:10]} outside the allowed "
                                 f"set {sorted(allowed)}")
    return CaseOutput(case_id, None, "valid", mask=array.astype(np.uint8 if max(
        allowed, default=0) < 256 else np.int32))


def _listing(root: Path, case_id: str) -> str:
    directory = root / case_id
    if not directory.is_dir():
        return f" (no directory /output/{case_id}/ either)"
    names = sorted(p.name for p in directory.iterdir())[:10]
    return f" (/output/{case_id}/ holds: {', '.join(names) or 'nothing'})"


# -- probability tables ------------------------------------------------------------------


def validate_probabilities(output_root: Path, case_ids: list[str], spec: ProbabilityOutput,
                           ) -> dict[str, CaseOutput]:
    path = Path(output_root) / spec.filename
    where = f"/output/{spec.filename}"
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return {c: _missing(c, f"{where} was not written") for c in case_ids}
    if not stat.S_ISREG(mode):
        return {c: _invalid(c, f"{where} is not a regular file") for c in case_ids}
    if path.stat().st_size > MAX_TABLE_BYTES:
        return {c: _invalid(c, f"{where} is larger than {MAX_TABLE_BYTES} bytes")
                for c in case_ids}
    try:
        rows = _read_table(path, spec)
    except ValueError as exc:
        return {c: _invalid(c, f"{where}: {exc}") for c in case_ids}
    results = {}
    for case_id in case_ids:
        found = rows.get(case_id)
        if found is None:
            results[case_id] = _missing(case_id, f"{where} has no row for case {case_id}")
        elif isinstance(found, str):
            results[case_id] = _invalid(case_id, f"{where}, case {case_id}: {found}")
        else:
            results[case_id] = CaseOutput(case_id, None, "valid", probabilities=found)
    return results


def _read_table(path: Path, spec: ProbabilityOutput) -> dict[str, dict[str, float] | str]:
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError('expected an object {"<case_id>": {"<class>": p, ...}, ...}')
        raw = {str(k): (v if isinstance(v, dict) else {spec.classes[0]: v})
               for k, v in data.items()}
        return {case: _row_values(values, spec.classes) for case, values in raw.items()}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or [])
        wanted = {"case_id", *spec.classes}
        if not wanted <= columns:
            raise ValueError(f"missing column(s) {sorted(wanted - columns)}; expected "
                             f"case_id,{','.join(spec.classes)}")
        rows: dict[str, dict[str, float] | str] = {}
        for line, row in enumerate(reader, start=2):
            case_id = (row["case_id"] or "").strip()
            if case_id in rows:
                rows[case_id] = f"more than one row (again on line {line})"
                continue
            rows[case_id] = _row_values(row, spec.classes)
    return rows


def _row_values(row: dict, classes: list[str]) -> dict[str, float] | str:
    values = {}
    for name in classes:
        raw = row.get(name)
        try:
            value = float(raw)
        except (TypeError, ValueError):
            return f"{name} is {raw!r}, not a number"
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            return f"{name} is {raw!r}; probabilities lie in [0, 1]"
        values[name] = value
    return values
