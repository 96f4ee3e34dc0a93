"""Variants of hostile dataset files: a dataset.json whose name climbs out of the release
archive's folder or holds terminal escapes, values nested a mile deep or of the wrong type,
and a manifest edited by hand so that staging or scoring would reach outside the dataset.
Each is refused with a message naming the field; nothing is sealed, staged or released."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from engine.datasets import DatasetError, load, release, seal, stage
from engine.synthetic import synth_dataset


@pytest.fixture
def dataset(tmp_path) -> Path:
    root = tmp_path / "data"
    synth_dataset(root, cases=1, size=16, seed=3)
    return root


def _describe(root: Path, **fields) -> None:
    description = json.loads((root / "dataset.json").read_text())
    description.update(fields)
    (root / "dataset.json").write_text(json.dumps(description))


@pytest.mark.parametrize(("fields", "expected"), [
    ({"name": "../../../escaped"}, "'name' '../../../escaped' must be letters, digits, '.', "
     "'_', '-' (it names the release archive's folder)"),
    ({"name": "/abs"}, "'name' '/abs' must be letters, digits"),
    ({"name": "red\x1b[31m"}, "'name' holds a control character"),
    ({"name": ["a"]}, "'name' must be text, not list"),
    ({"citation": "x" * 5000}, "'citation' is longer than 2000 characters"),
    ({"modality": {"nested": [1, 2]}}, "'modality' must be text, not dict"),
    ({"labels": {"one": "liver"}}, "'labels' key 'one' must be a label value"),
    ({"labels": {"1": "\x1b]8;;http://x\x07liver"}}, "'labels' entry '1' holds a control "
     "character"),
    ({"classes": ["a", "b"]}, "'classes' must be an object"),
    ({"extra": 1}, "'extra' is not a dataset.json field"),
])
def test_a_hostile_description_is_refused_at_sealing(dataset, fields, expected):
    _describe(dataset, **fields)
    with pytest.raises(DatasetError) as refused:
        seal(dataset)
    assert f"{dataset / 'dataset.json'}: {expected}" in str(refused.value)
    assert not (dataset / "manifest.json").exists()


def test_a_description_nested_too_deeply_is_a_dataset_error(dataset):
    (dataset / "dataset.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DatasetError, match="nested too deeply to be a dataset description"):
        seal(dataset)


def _edit_manifest(root: Path, edit) -> None:
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.chmod(0o644)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda m: m["cases"][0].update(case_id="../../.."), "case "),
    (lambda m: m["cases"][0]["ground_truth"].update(name="../../../../etc/hostname"),
     "is no plain name"),
    (lambda m: m["cases"][0]["inputs"][0].update(name="/etc/hostname"), "is no plain name"),
    (lambda m: m["files"].append({"path": "inputs/../../outside", "sha256": "0" * 64}),
     "is no path inside the dataset"),
    (lambda m: m.update(cases={"not": "a list"}), "no list of cases and files"),
])
def test_a_manifest_edited_to_point_outside_is_refused(dataset, edit, expected):
    seal(dataset)
    _edit_manifest(dataset, edit)
    with pytest.raises(DatasetError) as refused:
        load(dataset)
    assert "was not written by seal (" in str(refused.value)
    assert expected in str(refused.value)
    assert str(refused.value).endswith("): seal the dataset again")


def test_staging_a_manifest_case_that_climbs_out_is_refused(dataset, tmp_path):
    """Before, stage() linked whatever lay at inputs/../../<x> into the container's /input."""
    seal(dataset)
    _edit_manifest(dataset, lambda m: m["cases"][0].update(case_id=".."))
    with pytest.raises(DatasetError):
        stage(load(dataset), [".."], tmp_path / "staged")
    assert not (tmp_path / "staged").exists()


def test_a_release_never_names_a_folder_outside_its_own(dataset, tmp_path):
    """A manifest sealed before names were checked, its description edited by hand: the
    archive's folder falls back to the dataset directory's name."""
    seal(dataset)
    _edit_manifest(dataset, lambda m: m["description"].update(name="../../escaped"))
    archive = release(dataset, tmp_path / "release.tar.gz")
    with tarfile.open(archive) as tar:
        tops = {member.name.split("/")[0] for member in tar.getmembers()}
    version = load(dataset).version
    assert tops == {f"data-{version[:12]}"}


# -- labels.csv ------------------------------------------------------------------------------


@pytest.fixture
def classification(tmp_path) -> Path:
    root = tmp_path / "cls"
    synth_dataset(root, cases=2, size=16, seed=3, task="classification")
    return root


def _labels(root: Path, text: bytes) -> Path:
    path = root / "ground_truth" / "labels.csv"
    path.chmod(0o644)
    path.write_bytes(text)
    return path


@pytest.mark.parametrize(("label", "shown"), [
    (b'=HYPERLINK("http://x")', '\'=HYPERLINK("http://x")\''),
    (b"+1", "'+1'"),
    (b"@SUM(A1)", "'@SUM(A1)'"),
    (b"\x1b[31m1", "'\\x1b[31m1'"),
    (b"1\x00", "'1\\x00'"),
    (b"no tumour", "'no tumour'"),
])
def test_a_label_no_challenge_class_could_name_is_refused(classification, label, shown):
    path = _labels(classification, b"case_id,label\ncase-001," + label + b"\ncase-002,1\n")
    with pytest.raises(DatasetError) as refused:
        seal(classification)
    assert str(refused.value) == (
        f"{path} line 2: label {shown} is not a class name a challenge can score (letters, "
        "digits, '.', '_', '-', starting with a letter or digit; at most 64)")
    assert not (classification / "manifest.json").exists()


def test_a_quote_never_closed_in_labels_is_named(classification):
    path = _labels(classification, b'case_id,label\ncase-001,"1\ncase-002,1\n')
    with pytest.raises(DatasetError) as refused:
        seal(classification)
    assert str(refused.value) == f"{path} is not a UTF-8 CSV table: unexpected end of data"


def test_a_column_given_twice_in_labels_is_refused(classification):
    path = _labels(classification, b"case_id,label,case_id\ncase-001,1,x\ncase-002,0,y\n")
    with pytest.raises(DatasetError) as refused:
        seal(classification)
    assert str(refused.value) == (f"{path}: a column appears twice in ['case_id', 'label', "
                                  "'case_id']")


def test_a_dataset_json_that_is_a_folder_is_a_dataset_error(dataset):
    (dataset / "dataset.json").unlink()
    (dataset / "dataset.json").mkdir()
    with pytest.raises(DatasetError) as refused:
        seal(dataset)
    assert str(refused.value) == (f"{dataset / 'dataset.json'} is not a file: dataset.json is "
                                  "a JSON object")


def test_a_dicom_rescale_past_float32_is_refused_at_sealing(tmp_path):
    """RescaleSlope 1e308 turned the voxels into infinities, sealed as if they were data."""
    import pydicom

    root = tmp_path / "dicom"
    synth_dataset(root, cases=1, size=16, seed=3, image_format="dicom")
    for path in sorted((root / "inputs" / "case-001").rglob("*.dcm")):
        dataset = pydicom.dcmread(path)
        dataset.RescaleSlope = "1e308"
        dataset.save_as(path)
    with pytest.raises(DatasetError) as refused:
        seal(root)
    assert str(refused.value).startswith("case 'case-001': inputs/case-001/ct cannot be read: ")
    assert str(refused.value).endswith("RescaleSlope and RescaleIntercept give voxel values "
                                       "beyond any finite 32-bit number")


# -- release archives ------------------------------------------------------------------------


def _released(dataset: Path, tmp_path: Path) -> tuple[Path, list[tuple[tarfile.TarInfo, bytes]]]:
    seal(dataset)
    archive = release(dataset, tmp_path / "release.tar.gz")
    with tarfile.open(archive) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    return archive, members


def _repack(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    import io

    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            info = tarfile.TarInfo(info.name) if isinstance(info, tarfile.TarInfo) else info
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_file_given_twice_in_an_archive_is_reported(dataset, tmp_path):
    """Extraction keeps the last copy; verifying the first would bless a tampered file."""
    from engine.datasets import verify

    _, members = _released(dataset, tmp_path)
    image = next((m, d) for m, d in members if m.name.endswith("ct.nii.gz"))
    tampered = _repack(tmp_path / "twice.tar.gz", [*members, (image[0], b"tampered")])
    report = verify(tampered)
    assert not report.ok
    assert report.added == [f"{image[0].name} (given twice)"]


def test_a_second_tree_in_an_archive_is_reported(dataset, tmp_path):
    from engine.datasets import verify

    _, members = _released(dataset, tmp_path)
    top = members[0][0].name.split("/")[0]
    extra = [(tarfile.TarInfo(m.name.replace(top, "other", 1)), d) for m, d in members[:1]]
    report = verify(_repack(tmp_path / "two.tar.gz", [*members, *extra]))
    assert not report.ok
    assert report.added == [f"{extra[0][0].name} (outside the archive's one top folder)"]


def test_a_manifest_entry_without_its_hash_is_refused_not_a_key_error(dataset):
    seal(dataset)
    _edit_manifest(dataset, lambda m: m["files"][0].pop("sha256"))
    with pytest.raises(DatasetError, match="has no size and sha256"):
        load(dataset)
