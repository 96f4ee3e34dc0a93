"""Variants of hostile outputs beyond the first attacks: headers whose numbers are not
numbers (NaN offsets, NaN intercepts), grids that are no grid (zero or negative dims,
zero or parallel axes), voxel values that no cast may turn into a label (infinity,
uint64 past int64), and tables whose text Python's float() reads too kindly. Each is
OUTPUT_INVALID with a message; no reader raises anything but MedioError."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from sqlalchemy import select

from engine.medio import Geometry, MedioError, read_header, read_volume
from engine.outputs import (
    ProbabilityOutput,
    SegmentationOutput,
    validate_probabilities,
    validate_segmentation,
)
from runners.base import FailureReason

INVALID = FailureReason.OUTPUT_INVALID
SHAPE = (4, 4, 4)
AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])
REFERENCE = Geometry(SHAPE, AFFINE)


def _nifti(dtype=np.uint8, first_voxel=0) -> bytearray:
    array = np.zeros(SHAPE, dtype)
    array[0, 0, 0] = first_voxel
    image = nib.Nifti1Image(array, AFFINE, dtype=dtype)
    image.set_qform(AFFINE, code=1)
    image.set_sform(AFFINE, code=1)
    return bytearray(image.to_bytes())


def _patched(fmt: str, offset: int, *values, dtype=np.uint8) -> bytes:
    data = _nifti(dtype)
    struct.pack_into(fmt, data, offset, *values)
    return bytes(data)


NIFTI_VARIANTS = {
    # vox_offset (byte 108, a float) that is no byte count
    "vox_offset_nan": (_patched("<f", 108, float("nan")), "cannot be read"),
    # dim[1..3] (bytes 42..47): a zero or negative extent
    "dim_negative": (_patched("<3h", 42, -4, 4, 4), "dimensions [-4, 4, 4] must be three "
                     "positive numbers"),
    "dim_zero": (_patched("<3h", 42, 0, 4, 4), "dimensions [0, 4, 4] must be three positive "
                 "numbers"),
    # scl_slope 1, scl_inter NaN (bytes 112, 116): nibabel raises its own error type
    "intercept_nan": (_patched("<2f", 112, 1.0, float("nan")), "intensity scaling"),
    # sform (srow_x, y, z at byte 280) all zero: every axis has length 0
    "sform_zero": (_patched("<12f", 280, *([0.0] * 12)), "voxel spacing [0.0, 0.0, 0.0] mm"),
    # two sform axes the same: the grid spans a plane, not a volume
    "sform_parallel_axes": (_patched("<12f", 280, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0),
                            "orientation is degenerate"),
}


@pytest.mark.parametrize("name", sorted(NIFTI_VARIANTS))
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a_nifti_header_with_impossible_numbers_is_output_invalid(tmp_path, name, suffix):
    data, expected = NIFTI_VARIANTS[name]
    outcome = _segmentation(tmp_path, f"mask{suffix}",
                            gzip.compress(data) if suffix.endswith(".gz") else data)
    assert outcome.reason == INVALID
    assert outcome.message.startswith(f"case case-001: /output/case-001/mask{suffix} cannot "
                                      "be read: ")
    assert expected in outcome.message


@pytest.mark.parametrize("name", sorted(NIFTI_VARIANTS))
def test_the_readers_raise_only_medio_errors_on_a_hostile_header(tmp_path, name):
    """Datasets, check and the scorer all read through these: one error type to catch."""
    path = tmp_path / "image.nii"
    path.write_bytes(NIFTI_VARIANTS[name][0])
    with pytest.raises(MedioError):
        read_header(path)
        read_volume(path)


def _with_extension(esize: int) -> bytes:
    """A valid file with one comment extension (at byte 352), its size field replaced."""
    image = nib.Nifti1Image(np.zeros(SHAPE, np.uint8), AFFINE, dtype=np.uint8)
    image.set_sform(AFFINE, code=1)
    image.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"x" * 20))
    data = bytearray(image.to_bytes())
    struct.pack_into("<i", data, 352, esize)
    return bytes(data)


@pytest.mark.parametrize("esize", [2**31 - 1, -16, 4])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a_header_extension_claiming_more_than_precedes_the_voxels_is_invalid(
        tmp_path, esize, suffix):
    data = _with_extension(esize)
    outcome = _segmentation(tmp_path, f"mask{suffix}",
                            gzip.compress(data) if suffix.endswith(".gz") else data)
    assert outcome.reason == INVALID
    assert outcome.message.endswith(f"mask{suffix}: a header extension at byte 352 claims "
                                    f"{esize} bytes; the voxels start at byte 384")


def test_a_true_header_extension_is_read(tmp_path):
    outcome = _segmentation(tmp_path, "mask.nii", _with_extension(32))
    assert outcome.valid


def _metaimage(matrix: str = "1 0 0 0 1 0 0 0 1", spacing: str = "1 1 1") -> bytes:
    header = ("ObjectType = Image\nNDims = 3\nBinaryData = True\n"
              "BinaryDataByteOrderMSB = False\nCompressedData = False\n"
              f"TransformMatrix = {matrix}\nOffset = 0 0 0\nElementSpacing = {spacing}\n"
              "DimSize = 4 4 4\nElementType = MET_UCHAR\nElementDataFile = LOCAL\n")
    return header.encode() + bytes(64)


@pytest.mark.parametrize(("matrix", "spacing", "expected"), [
    ("0 0 0 0 0 0 0 0 0", "1 1 1", "voxel spacing [0.0, 0.0, 0.0] mm lies outside"),
    ("1 0 0 1 0 0 0 0 1", "1 1 1", "orientation is degenerate"),
    ("1 0 0 0 1 0 0 0 1", "1e-320 1 1", "voxel spacing [0.0, 1.0, 1.0] mm lies outside"),
    ("1e308 0 0 0 1e308 0 0 0 1e308", "1e308 1 1", "non-finite"),
])
def test_a_metaimage_with_a_degenerate_grid_is_output_invalid(tmp_path, matrix, spacing,
                                                              expected):
    outcome = _segmentation(tmp_path, "mask.mha", _metaimage(matrix, spacing))
    assert outcome.reason == INVALID
    assert expected in outcome.message


@pytest.mark.parametrize(("dtype", "value", "expected"), [
    (np.float32, np.inf, "contains NaN or infinite values"),
    (np.float64, -np.inf, "contains NaN or infinite values"),
    (np.uint64, 2**64 - 1, f"holds label(s) [{2**64 - 1}] outside the allowed set [0, 1]"),
    (np.float64, 1e300, "holds label(s) [1000000000000000052504760255204420248704468581108159"),
])
def test_voxel_values_no_cast_may_turn_into_a_label(tmp_path, dtype, value, expected):
    outcome = _segmentation(tmp_path, "mask.nii", bytes(_nifti(dtype, value)))
    assert outcome.reason == INVALID
    assert expected in outcome.message


def _segmentation(root: Path, filename: str, data: bytes):
    (root / "case-001").mkdir()
    (root / "case-001" / filename).write_bytes(data)
    spec = SegmentationOutput(filename=filename, labels=[0, 1])
    return validate_segmentation(root, "case-001", spec, REFERENCE)


@pytest.mark.parametrize(("make", "kind"), [
    (lambda path: path.write_bytes(b"not a folder"), "a file"),
    (lambda path: path.symlink_to("/etc"), "a symbolic link"),
    (lambda path: os.mkfifo(path), "a special file (a pipe, socket or device)"),
])
def test_a_case_folder_that_is_no_folder_is_output_invalid(tmp_path, make, kind):
    """Before, a file at /output/<case_id> made lstat of the mask raise NotADirectoryError."""
    make(tmp_path / "case-001")
    spec = SegmentationOutput(filename="mask.nii.gz", labels=[0, 1])
    outcome = validate_segmentation(tmp_path, "case-001", spec, REFERENCE)
    assert (outcome.reason, outcome.message) == (
        INVALID, f"case case-001: /output/case-001 is {kind}, not a folder; write the file "
                 "/output/case-001/mask.nii.gz")


# -- tables ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["0x1p-1", "0_5", "\u0660.\u0665", "nan", "infinity",
                                  "1e5000000", "0.5\x00"])
def test_a_probability_only_python_would_read_is_not_a_number(tmp_path, text):
    (tmp_path / "p.csv").write_text(f"case_id,probability\nc1,{text}\n", encoding="utf-8")
    outcome = validate_probabilities(tmp_path, ["c1"], ProbabilityOutput(filename="p.csv"))
    assert outcome["c1"].reason == INVALID
    assert outcome["c1"].message == f"/output/p.csv, case c1: probability is {text!r}, not a " \
                                    "number"


@pytest.mark.parametrize("text", ["0.5", " 0.5\t", "+0.5", ".5", "5e-1", "1", "0", "-0",
                                  "1E-400"])
def test_plain_decimal_probabilities_are_read(tmp_path, text):
    (tmp_path / "p.csv").write_text(f"case_id,probability\nc1,{text}\n", encoding="utf-8")
    outcome = validate_probabilities(tmp_path, ["c1"], ProbabilityOutput(filename="p.csv"))
    assert outcome["c1"].valid
    assert outcome["c1"].probabilities == {"probability": float(text)}
    assert str(outcome["c1"].probabilities["probability"]) == str(abs(float(text)))  # not -0.0


def test_a_quote_never_closed_makes_the_table_invalid_not_a_missing_row(tmp_path):
    (tmp_path / "p.csv").write_text('case_id,probability\nc1,"0.5\nc2,0.5\n')
    outcome = validate_probabilities(tmp_path, ["c1", "c2"], ProbabilityOutput(filename="p.csv"))
    assert {c: (o.reason, o.message) for c, o in outcome.items()} == {
        c: (INVALID, "/output/p.csv: not a valid CSV table, line 3: unexpected end of data")
        for c in ("c1", "c2")}


def test_a_column_given_twice_is_ambiguous_and_refused(tmp_path):
    (tmp_path / "p.csv").write_text("case_id,probability,probability\nc1,0.1,0.9\n")
    outcome = validate_probabilities(tmp_path, ["c1"], ProbabilityOutput(filename="p.csv"))
    assert outcome["c1"].reason == INVALID
    assert outcome["c1"].message == ("/output/p.csv: column(s) ['probability'] appear more "
                                     "than once in the header")


# -- through the engine, from a real container ------------------------------------------

CHALLENGE = """
id: degenerate-grid
title: A mask on no grid
task: segmentation
output: {kind: segmentation, filename: mask.mha, labels: [0, 1]}
ranking: {metrics: [{metric: dice, label: 1}]}
phases:
  - id: test
    dataset: {path: data}
    limits: {memory: 512m, time_per_case: 30s}
"""

# Every case gets a MetaImage of the input's shape (synth_dataset, size 16) whose axes are
# all zero: before, the scorer's geometry message raised a TypeError on it.
SCRIPT = (
    "import json, os\n"
    "for case in json.load(open('/input/cases.json'))['cases']:\n"
    "    folder = '/output/' + case['case_id']\n"
    "    os.makedirs(folder, exist_ok=True)\n"
    "    with open(folder + '/mask.mha', 'wb') as f:\n"
    "        f.write(b'ObjectType = Image\\nNDims = 3\\nBinaryData = True\\n'\n"
    "                b'TransformMatrix = 0 0 0 0 0 0 0 0 0\\nDimSize = 16 16 10\\n'\n"
    "                b'ElementType = MET_UCHAR\\nElementDataFile = LOCAL\\n' + bytes(2560))\n"
)


@pytest.mark.docker
def test_a_degenerate_mask_from_a_container_is_charged_to_the_team(tmp_path, adversarial):
    from engine.config import Settings
    from engine.datasets import seal
    from engine.db import session_factory
    from engine.db.models import CaseResultRow, JobRow
    from engine.submissions import register_challenge, submit
    from engine.synthetic import synth_dataset
    from engine.worker import Worker
    from runners.docker import DockerRunner
    from tests.engine_fixtures import pin, script_image

    script_image(adversarial["probe"], SCRIPT, "epreuve-test/degenerate-grid:latest",
                 tmp_path / "image")
    synth_dataset(tmp_path / "data", seed=5, size=16, cases=1)
    seal(tmp_path / "data")
    (tmp_path / "challenge.yaml").write_text(CHALLENGE)
    state = tmp_path / "state"
    settings = Settings(data_dir=state, database_url=f"sqlite:///{state}/db.sqlite",
                        state_dir=state / "runner")
    sessions = session_factory(settings.database_url)
    worker = Worker(sessions, settings, DockerRunner(state_dir=settings.state_dir / "runs"),
                    scoring_workers=1)
    with sessions() as session:
        register_challenge(session, tmp_path / "challenge.yaml")
        submission = submit(session, "degenerate-grid", "test", "team",
                            pin("epreuve-test/degenerate-grid:latest", tmp_path))
        session.commit()
    worker.run(until_idle=True)
    with sessions() as session:
        jobs = session.scalars(select(JobRow).where(
            JobRow.submission_id == submission.id)).all()
        assert [(j.kind, j.reason, j.attempts) for j in jobs] == [
            ("smoke", "OUTPUT_INVALID", 1)]
        rows = session.scalars(select(CaseResultRow).where(
            CaseResultRow.submission_id == submission.id)).all()
        assert [(r.valid, r.reason) for r in rows] == [(False, "OUTPUT_INVALID")]
        assert "mask.mha: voxel spacing [0.0, 0.0, 0.0] mm lies outside" in rows[0].message
