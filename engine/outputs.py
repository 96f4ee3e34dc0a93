"""Is what the container wrote a valid answer? Checked before any scoring, per case.

Segmentation: `/output/<case_id>/<filename>` must be a regular file that loads,
declares no more voxel data than allowed (checked from the header, before any
data is read: a gzip bomb costs nothing), lies on the reference grid (shape,
spacing, orientation, origin within tolerance), and holds integer labels from
the allowed set with no NaN. Integral values stored as floats (1.0) are
accepted; anything else (0.5) is not.

Probabilities: one table `/output/<filename>` (CSV or JSON) with one row per case
and one value in [0, 1] per class.

Outputs are untrusted bytes, read, never followed: the spec accepts only formats
whose file holds everything (.nii, .nii.gz, .mha with its data inside), each read
by its own reader chosen by the extension, from the one regular file named in the
case's folder (never a link); nothing a header names is opened (see engine/medio).
Tables are read as bounded UTF-8 text; a field too long, a nesting too deep, a
duplicate key, NaN: each is OUTPUT_INVALID, never an exception.

Every refusal is OUTPUT_MISSING or OUTPUT_INVALID, names the case, and says
what to change.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator

from engine.medio import (
    Geometry,
    GeometryTolerance,
    ImageHeader,
    MedioError,
    Volume,
    geometry_differences,
)
from engine.medio.files import open_regular, read_at_most
from engine.medio.metaimage import read_metaimage, read_metaimage_header
from engine.medio.nifti import read_nifti, read_nifti_header
from runners.base import FailureReason

MAX_TABLE_BYTES = 64 << 20
MAX_TABLE_ROWS = 1_000_000
MAX_TABLE_COLUMNS = 1_000
# One reader per accepted extension: single-file formats only. .mhd (+ .raw) and
# .hdr/.img name a second file, DICOM a directory: a participant's file may not point
# anywhere, so those are not output formats.
SEGMENTATION_READERS: dict[str, tuple[Callable[[Path], ImageHeader], Callable[[Path], Volume]]] = {
    ".nii.gz": (read_nifti_header, read_nifti),
    ".nii": (read_nifti_header, read_nifti),
    ".mha": (read_metaimage_header, read_metaimage),
}
TABLE_SUFFIXES = (".csv", ".json")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
# A probability written as text: plain ASCII decimal notation, nothing Python's float()
# would also take (hex floats, '1_0', other scripts' digits, 'nan', 'infinity').
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,4})?",
                      re.ASCII)


def _suffix(filename: str, allowed) -> str | None:
    return next((s for s in allowed if filename.lower().endswith(s)), None)


def _plain_filename(value: str, allowed, what: str) -> str:
    if not _PLAIN_NAME.fullmatch(value) or _suffix(value, allowed) is None:
        raise ValueError(f"{value[:80]!r} is not accepted: the output file name must be a plain "
                         f"name (letters, digits, '.', '_', '-'; no folder) ending in "
                         f"{', '.join(allowed)} ({what})")
    return value


class SegmentationOutput(BaseModel):
    kind: Literal["segmentation"] = "segmentation"
    filename: str = "mask.nii.gz"
    labels: list[int] = Field(default_factory=lambda: [0, 1])
    max_voxel_bytes: int = Field(2 << 30, gt=0)  # from the header's dimensions and data type

    @field_validator("filename")
    @classmethod
    def _single_file_format(cls, value: str) -> str:
        return _plain_filename(value, tuple(SEGMENTATION_READERS), "single-file formats "
                               "only: .mhd/.raw, .hdr/.img and DICOM name other files")


class ProbabilityOutput(BaseModel):
    kind: Literal["probabilities"] = "probabilities"
    filename: str = "predictions.csv"
    classes: list[str] = Field(default_factory=lambda: ["probability"], min_length=1)

    @field_validator("filename")
    @classmethod
    def _table_format(cls, value: str) -> str:
        return _plain_filename(value, TABLE_SUFFIXES, "a CSV or JSON table")


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
    if any(entry.startswith((f"{rel} ", f"{case_id} ")) for entry in skipped):
        return _invalid(case_id, f"{where} (or its folder) was not a regular file (a link or "
                                 "a special file) and was not collected; write a regular file")
    path = Path(output_root) / case_id / spec.filename
    # the folder first: a file, link or pipe at /output/<case_id> makes any path below it
    # fail with its own error (ENOTDIR, ELOOP), each a participant's fault with a message
    try:
        folder_mode = os.lstat(path.parent).st_mode
    except FileNotFoundError:
        return _missing(case_id, f"{where} was not written (no directory /output/{case_id}/ "
                                 "either)")
    except OSError as exc:
        return _invalid(case_id, f"{where} cannot be reached ({exc.strerror})")
    if not stat.S_ISDIR(folder_mode):
        return _invalid(case_id, f"case {case_id}: /output/{case_id} is {_entry_kind(folder_mode)}"
                                 f", not a folder; write the file /output/{rel}")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return _missing(case_id, f"{where} was not written{_listing(Path(output_root), case_id)}")
    except OSError as exc:
        return _invalid(case_id, f"{where} cannot be reached ({exc.strerror})")
    if not stat.S_ISREG(mode):
        return _invalid(case_id, f"{where} is not a regular file (links, directories and "
                                 "devices are refused)")
    read_header, read_volume = SEGMENTATION_READERS[_suffix(spec.filename,
                                                            SEGMENTATION_READERS)]
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


def untrusted_case(case_id: str, validate, *args, **kwargs) -> CaseOutput:
    """`validate(*args, **kwargs)` for one case; a validator crashing on hostile output bytes
    is the output's fault (OUTPUT_INVALID), never a traceback: for the workers and `check`."""
    try:
        return validate(*args, **kwargs)
    except Exception as exc:
        return _unreadable(case_id, exc)


def untrusted_table(case_ids: list[str], validate, *args,
                    **kwargs) -> dict[str, CaseOutput]:
    """`validate(*args, **kwargs)` for a table of all cases; a crash is each case's
    OUTPUT_INVALID: the table's bytes are the participant's, so is the failure."""
    try:
        return validate(*args, **kwargs)
    except Exception as exc:
        return {case_id: _unreadable(case_id, exc) for case_id in case_ids}


def _unreadable(case_id: str, exc: BaseException) -> CaseOutput:
    return CaseOutput(case_id, FailureReason.OUTPUT_INVALID,
                      f"case {case_id}: the output could not be read ({type(exc).__name__}); "
                      "write the file the challenge asks for, in its format")


def _check_labels(case_id: str, where: str, array: np.ndarray, allowed: list[int]) -> CaseOutput:
    if array.dtype.kind not in "iubf":
        return _invalid(case_id, f"{where} has data type {array.dtype}; save the mask as uint8")
    # Each distinct value compared as a Python number: no cast may wrap (uint64 past int64)
    # or turn infinity into a label.
    values = np.unique(array)
    if array.dtype.kind == "f":
        if not np.isfinite(values).all():
            return _invalid(case_id, f"{where} contains NaN or infinite values; a label map "
                                     "holds integer labels")
        fractional = values[values != np.rint(values)]
        if fractional.size:
            return _invalid(case_id, f"{where} holds non-integer values such as "
                                     f"{fractional[0]:g}: threshold probabilities and save the "
                                     "mask as uint8")
    known = set(allowed)
    unknown = [int(v) for v in values.tolist() if int(v) not in known]
    if unknown:
        return _invalid(case_id, f"{where} holds label(s) {unknown[:10]} outside the allowed "
                                 f"set {sorted(allowed)}")
    return CaseOutput(case_id, None, "valid", mask=array.astype(np.uint8 if max(
        allowed, default=0) < 256 else np.int32))


def _entry_kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "a file"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "a special file (a pipe, socket or device)"


def _listing(root: Path, case_id: str) -> str:
    directory = root / case_id
    try:
        if not stat.S_ISDIR(os.lstat(directory).st_mode):
            raise FileNotFoundError
        names = sorted(os.listdir(directory))[:10]
    except OSError:
        return f" (no directory /output/{case_id}/ either)"
    shown = [os.fsencode(n).decode("utf-8", "backslashreplace") for n in names]
    return f" (/output/{case_id}/ holds: {', '.join(shown) or 'nothing'})"


# -- probability tables ------------------------------------------------------------------


def validate_probabilities(output_root: Path, case_ids: list[str], spec: ProbabilityOutput,
                           ) -> dict[str, CaseOutput]:
    path = Path(output_root) / spec.filename
    where = f"/output/{spec.filename}"
    try:
        os.lstat(path)
    except FileNotFoundError:
        return {c: _missing(c, f"{where} was not written") for c in case_ids}
    try:
        text = _table_text(path)
        rows = _read_table(text, spec)
    except (MedioError, ValueError) as exc:
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


def _table_text(path: Path) -> str:
    """The table as text: one regular file (never a link), bounded, strict UTF-8."""
    with open_regular(path) as fd:
        if os.fstat(fd).st_size > MAX_TABLE_BYTES:
            raise ValueError(f"larger than {MAX_TABLE_BYTES} bytes")
        data = read_at_most(fd, MAX_TABLE_BYTES)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (byte {exc.start}); save the table as UTF-8") from None


def _read_table(text: str, spec: ProbabilityOutput) -> dict[str, dict[str, float] | str]:
    if spec.filename.lower().endswith(".json"):
        return _read_json_table(text, spec)
    return _read_csv_table(text, spec)


def _read_json_table(text: str, spec: ProbabilityOutput) -> dict[str, dict[str, float] | str]:
    try:
        data = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    except RecursionError:
        raise ValueError("not valid JSON: nested too deeply; expected "
                         '{"<case_id>": {"<class>": p, ...}, ...}') from None
    if not isinstance(data, dict):
        raise ValueError('expected an object {"<case_id>": {"<class>": p, ...}, ...}')
    if len(data) > MAX_TABLE_ROWS:
        raise ValueError(f"more than {MAX_TABLE_ROWS} cases")
    raw = {str(k): (v if isinstance(v, dict) else {spec.classes[0]: v})
           for k, v in data.items()}
    return {case: _row_values(values, spec.classes) for case, values in raw.items()}


def _no_constant(name: str):
    raise ValueError(f"not valid JSON: {name} is not a JSON number; probabilities lie in [0, 1]")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        twice = next(key for key in keys if keys.count(key) > 1)
        raise ValueError(f"not valid JSON: key {twice[:80]!r} appears more than once")
    return dict(pairs)


def _read_csv_table(text: str, spec: ProbabilityOutput) -> dict[str, dict[str, float] | str]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        columns = next(reader, [])
        if len(columns) > MAX_TABLE_COLUMNS:
            raise ValueError(f"more than {MAX_TABLE_COLUMNS} columns")
        wanted = ["case_id", *spec.classes]
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise ValueError(f"missing column(s) {missing}; expected "
                             f"case_id,{','.join(spec.classes)}")
        twice = sorted({c for c in wanted if columns.count(c) > 1})
        if twice:
            raise ValueError(f"column(s) {twice} appear more than once in the header")
        index = {name: columns.index(name) for name in wanted}
        rows: dict[str, dict[str, float] | str] = {}
        for line, cells in enumerate(reader, start=2):
            if line > MAX_TABLE_ROWS + 1:
                raise ValueError(f"more than {MAX_TABLE_ROWS} rows")
            if not cells:
                continue
            row = {name: cells[i] if i < len(cells) else None for name, i in index.items()}
            case_id = (row["case_id"] or "").strip()
            if case_id in rows:
                rows[case_id] = f"more than one row (again on line {line})"
                continue
            rows[case_id] = _row_values(row, spec.classes)
    except csv.Error as exc:  # a field past the size limit, a NUL byte, a stray quote
        raise ValueError(f"not a valid CSV table, line {reader.line_num}: {exc}") from None
    return rows


def _row_values(row: dict, classes: list[str]) -> dict[str, float] | str:
    values = {}
    for name in classes:
        raw = row.get(name)
        if isinstance(raw, bool) or not isinstance(raw, int | float | str) or (
                isinstance(raw, str) and not _DECIMAL.fullmatch(raw.strip(" \t"))):
            return f"{name} is {_short(raw)}, not a number"
        try:
            value = float(raw)
        except (ValueError, OverflowError):
            return f"{name} is {_short(raw)}, not a number"
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            return f"{name} is {_short(raw)}; probabilities lie in [0, 1]"
        values[name] = value + 0.0  # -0 is 0: one spelling in results and reports
    return values


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."
