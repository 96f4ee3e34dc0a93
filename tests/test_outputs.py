"""Output validation: each refusal typed, naming the case, saying what to change."""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from engine.medio import Volume, write_metaimage, write_nifti
from engine.outputs import (
    ProbabilityOutput,
    SegmentationOutput,
    validate_probabilities,
    validate_segmentation,
)
from engine.synthetic import synth_case
from runners.base import FailureReason

SPEC = SegmentationOutput(filename="mask.nii.gz", labels=[0, 1, 2, 3])


@pytest.fixture(scope="module")
def reference():
    return synth_case("case-001", np.random.default_rng(5), size=24).labels


def write_mask(root, array, affine, name="mask.nii.gz"):
    write_nifti(Volume(array, affine), root / "case-001" / name)


def check(root, reference, **kwargs):
    return validate_segmentation(root, "case-001", SPEC, reference.geometry, **kwargs)


def test_a_valid_mask_is_accepted(tmp_path, reference):
    write_mask(tmp_path, reference.array, reference.affine)
    outcome = check(tmp_path, reference)
    assert outcome.valid and np.array_equal(outcome.mask, reference.array)


def test_a_metaimage_mask_is_accepted_when_named_so(tmp_path, reference):
    spec = SegmentationOutput(filename="mask.mha", labels=[0, 1, 2, 3])
    write_metaimage(reference, tmp_path / "case-001" / "mask.mha")
    assert validate_segmentation(tmp_path, "case-001", spec, reference.geometry).valid


def test_integral_floats_are_accepted(tmp_path, reference):
    write_mask(tmp_path, reference.array.astype(np.float32), reference.affine)
    assert check(tmp_path, reference).valid


def test_missing_file_lists_what_was_written(tmp_path, reference):
    write_mask(tmp_path, reference.array, reference.affine, name="prediction.nii.gz")
    outcome = check(tmp_path, reference)
    assert outcome.reason is FailureReason.OUTPUT_MISSING
    assert "case case-001" in outcome.message and "prediction.nii.gz" in outcome.message


def test_wrong_shape(tmp_path, reference):
    write_mask(tmp_path, reference.array[:, :, :-1], reference.affine)
    outcome = check(tmp_path, reference)
    assert outcome.reason is FailureReason.OUTPUT_INVALID
    assert "shape is [24, 24, 15], expected [24, 24, 16]" in outcome.message


def test_wrong_affine(tmp_path, reference):
    moved = reference.affine.copy()
    moved[:3, 3] += [0, 0, 7.5]
    write_mask(tmp_path, reference.array, moved)
    outcome = check(tmp_path, reference)
    assert outcome.reason is FailureReason.OUTPUT_INVALID
    assert "origin" in outcome.message and "do not resample" in outcome.message


def test_float_labels(tmp_path, reference):
    write_mask(tmp_path, reference.array.astype(np.float32) * 0.5, reference.affine)
    outcome = check(tmp_path, reference)
    assert outcome.reason is FailureReason.OUTPUT_INVALID
    assert "non-integer values such as 0.5" in outcome.message


def test_nan(tmp_path, reference):
    array = reference.array.astype(np.float32)
    array[0, 0, 0] = np.nan
    write_mask(tmp_path, array, reference.affine)
    assert "NaN" in check(tmp_path, reference).message


def test_label_out_of_range(tmp_path, reference):
    array = reference.array.copy()
    array[1, 1, 1] = 7
    write_mask(tmp_path, array, reference.affine)
    outcome = check(tmp_path, reference)
    assert outcome.reason is FailureReason.OUTPUT_INVALID
    assert "label(s) [7] outside the allowed set [0, 1, 2, 3]" in outcome.message


def test_symlink_is_refused(tmp_path, reference):
    (tmp_path / "case-001").mkdir()
    os.symlink("/etc/passwd", tmp_path / "case-001" / "mask.nii.gz")
    outcome = check(tmp_path, reference)
    assert outcome.reason is FailureReason.OUTPUT_INVALID and "not a regular file" in \
        outcome.message


def test_a_link_the_runner_refused_to_collect_is_explained(tmp_path, reference):
    skipped = frozenset({"case-001/mask.nii.gz (symbolic link, not collected)"})
    outcome = check(tmp_path, reference, skipped=skipped)
    assert outcome.reason is FailureReason.OUTPUT_INVALID and "not collected" in outcome.message


def test_gzip_bomb_is_refused_from_its_header(tmp_path, reference):
    header = nib.Nifti1Header()
    header.set_data_shape((4096, 4096, 4096))  # 64 GiB of uint8 declared
    header.set_data_dtype(np.uint8)
    (tmp_path / "case-001").mkdir()
    with gzip.open(tmp_path / "case-001" / "mask.nii.gz", "wb") as handle:
        handle.write(header.binaryblock + b"\x00" * 4 + b"\x00" * 1024)
    assert (tmp_path / "case-001" / "mask.nii.gz").stat().st_size < 2000
    outcome = check(tmp_path, reference)
    assert outcome.reason is FailureReason.OUTPUT_INVALID
    assert "declares 68719476736 bytes" in outcome.message


def test_truncated_data_is_invalid(tmp_path, reference):
    write_mask(tmp_path, reference.array, reference.affine)
    path = tmp_path / "case-001" / "mask.nii.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    outcome = check(tmp_path, reference)
    assert outcome.reason is FailureReason.OUTPUT_INVALID and "cannot be read" in outcome.message


def test_probability_table_csv(tmp_path):
    spec = ProbabilityOutput(filename="predictions.csv", classes=["probability"])
    (tmp_path / "predictions.csv").write_text(
        "case_id,probability\nc1,0.9\nc2,1.5\nc3,nan\nc4,0.2\nc4,0.3\nc5,abc\n")
    results = validate_probabilities(tmp_path, ["c1", "c2", "c3", "c4", "c5", "c6"], spec)
    assert results["c1"].valid and results["c1"].probabilities == {"probability": 0.9}
    assert results["c2"].reason is FailureReason.OUTPUT_INVALID and "[0, 1]" in \
        results["c2"].message
    assert results["c3"].reason is FailureReason.OUTPUT_INVALID
    assert "more than one row" in results["c4"].message
    assert "not a number" in results["c5"].message
    assert results["c6"].reason is FailureReason.OUTPUT_MISSING


def test_probability_table_json_and_missing_columns(tmp_path):
    spec = ProbabilityOutput(filename="predictions.json", classes=["a", "b"])
    (tmp_path / "predictions.json").write_text('{"c1": {"a": 0.2, "b": 0.8}, "c2": {"a": 0.1}}')
    results = validate_probabilities(tmp_path, ["c1", "c2"], spec)
    assert results["c1"].probabilities == {"a": 0.2, "b": 0.8}
    assert "b is None" in results["c2"].message
    csv_spec = ProbabilityOutput(filename="p.csv", classes=["a", "b"])
    (tmp_path / "p.csv").write_text("case_id,a\nc1,0.5\n")
    assert "missing column(s) ['b']" in validate_probabilities(tmp_path, ["c1"], csv_spec)[
        "c1"].message


def test_missing_probability_table(tmp_path):
    results = validate_probabilities(tmp_path, ["c1"], ProbabilityOutput())
    assert results["c1"].reason is FailureReason.OUTPUT_MISSING
