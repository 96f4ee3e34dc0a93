"""Sealed datasets on real files: seal, verify, stage, release."""

from __future__ import annotations

import json
import os
import shutil
import tarfile

import pytest

from engine.datasets import (
    DatasetError,
    VerificationCache,
    load,
    release,
    require_intact,
    seal,
    stage,
    unstage,
    verify,
)
from engine.synthetic import synth_dataset
from runners.base import RunSpec


@pytest.fixture
def dataset_dir(tmp_path):
    root = tmp_path / "ds"
    synth_dataset(root, cases=3, seed=3, size=24)
    return root


def writable(path):
    path.chmod(0o644)
    return path


def test_seal_writes_a_manifest_with_every_file_and_case_metadata(dataset_dir):
    dataset = seal(dataset_dir)
    assert dataset.case_ids == ["case-001", "case-002", "case-003"]
    files = dataset.files()
    assert "inputs/case-001/ct.nii.gz" in files and "ground_truth/case-001/label.nii.gz" in files
    assert all(len(entry["sha256"]) == 64 and entry["size"] > 0 for entry in files.values())
    image = dataset.case("case-001")["inputs"][0]
    assert image["format"] == "nifti" and image["modality"] == "CT"
    assert image["shape"] == [24, 24, 16] and image["orientation"] == "LPS"
    assert image["spacing"] == pytest.approx([380 / 24, 380 / 24, 2.5])
    assert not os.access(dataset_dir / "inputs/case-001/ct.nii.gz", os.W_OK) or os.geteuid() == 0
    assert (dataset_dir / "inputs/case-001/ct.nii.gz").stat().st_mode & 0o222 == 0


def test_the_version_is_deterministic(tmp_path):
    versions = []
    for name in ("a", "b"):
        synth_dataset(tmp_path / name, cases=2, seed=11, size=20)
        versions.append(seal(tmp_path / name).version)
    assert versions[0] == versions[1]
    synth_dataset(tmp_path / "c", cases=2, seed=12, size=20)
    assert seal(tmp_path / "c").version != versions[0]


def test_dicom_dataset_seals_with_series_metadata(tmp_path):
    synth_dataset(tmp_path / "d", cases=2, seed=1, size=20, image_format="dicom")
    dataset = seal(tmp_path / "d")
    image = dataset.case("case-002")["inputs"][0]
    assert image["name"] == "ct" and image["format"] == "dicom" and image["modality"] == "CT"
    assert image["shape"] == [20, 20, 13]


def test_a_tampered_byte_is_named_by_verify(dataset_dir):
    seal(dataset_dir)
    target = writable(dataset_dir / "inputs/case-002/ct.nii.gz")
    data = bytearray(target.read_bytes())
    data[100] ^= 0x01
    target.write_bytes(bytes(data))
    (dataset_dir / "ground_truth/case-003/label.nii.gz").unlink()
    (dataset_dir / "inputs/case-001/extra.txt").write_text("planted")
    report = verify(dataset_dir)
    assert not report.ok
    assert report.changed == ["inputs/case-002/ct.nii.gz"]
    assert report.missing == ["ground_truth/case-003/label.nii.gz"]
    assert report.added == ["inputs/case-001/extra.txt"]
    with pytest.raises(DatasetError, match=r"changed: inputs/case-002/ct\.nii\.gz"):
        require_intact(dataset_dir)


def test_the_cache_skips_rehashing_but_still_catches_tampering(dataset_dir, tmp_path):
    seal(dataset_dir)
    cache = VerificationCache(tmp_path / "cache")
    first = verify(dataset_dir, cache=cache)
    assert first.ok and first.full and first.hashed_files == 7
    quick = verify(dataset_dir, cache=cache)
    assert quick.ok and not quick.full and quick.hashed_files == 0
    # Tamper, then put the old mtime back: ctime still moves, and the file is re-hashed.
    target = writable(dataset_dir / "inputs/case-001/ct.nii.gz")
    before = target.stat()
    data = bytearray(target.read_bytes())
    data[200] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = verify(dataset_dir, cache=cache)
    assert after.changed == ["inputs/case-001/ct.nii.gz"] and after.hashed_files == 1


def test_the_cache_forces_a_full_check_when_old(dataset_dir, tmp_path):
    seal(dataset_dir)
    verify(dataset_dir, cache=VerificationCache(tmp_path / "cache"))
    report = verify(dataset_dir, cache=VerificationCache(tmp_path / "cache",
                                                         full_every_seconds=0))
    assert report.full and report.hashed_files == 7


def test_sealing_refuses_a_case_without_ground_truth(dataset_dir):
    shutil.rmtree(dataset_dir / "ground_truth" / "case-002")
    with pytest.raises(DatasetError, match="case 'case-002': no ground truth"):
        seal(dataset_dir)


def test_sealing_refuses_duplicate_case_ids(dataset_dir):
    shutil.copytree(dataset_dir / "inputs" / "case-001", dataset_dir / "inputs" / "CASE-001")
    shutil.copytree(dataset_dir / "ground_truth" / "case-001",
                    dataset_dir / "ground_truth" / "CASE-001")
    with pytest.raises(DatasetError, match="duplicate of"):
        seal(dataset_dir)


def test_sealing_refuses_a_duplicate_row_in_a_labels_table(tmp_path):
    root = tmp_path / "cls"
    synth_dataset(root, cases=3, seed=1, size=20, task="classification")
    with open(root / "ground_truth" / "labels.csv", "a") as handle:
        handle.write("case-002,1\n")
    with pytest.raises(DatasetError, match="duplicate case id 'case-002'"):
        seal(root)


def test_sealing_refuses_unreadable_images_naming_the_case(dataset_dir):
    (dataset_dir / "inputs/case-003/ct.nii.gz").write_bytes(b"\x1f\x8bnot gzip at all")
    with pytest.raises(DatasetError,
                       match=r"case 'case-003': inputs/case-003/ct\.nii\.gz cannot be read"):
        seal(dataset_dir)


def test_sealing_refuses_ground_truth_off_the_input_grid(dataset_dir):
    from engine.medio import Volume, read_volume, write_nifti

    path = dataset_dir / "ground_truth/case-001/label.nii.gz"
    mask = read_volume(path)
    shifted = mask.affine.copy()
    shifted[0, 3] += 5
    write_nifti(Volume(mask.array, shifted), path)
    with pytest.raises(DatasetError, match="does not lie on the input's voxel grid"):
        seal(dataset_dir)


def test_classification_dataset_keeps_labels_in_the_manifest(tmp_path):
    root = tmp_path / "cls"
    synth_dataset(root, cases=4, seed=2, size=20, task="classification")
    dataset = seal(root)
    assert dataset.task == "classification"
    assert set(dataset.labels()) == {"case-001", "case-002", "case-003", "case-004"}
    assert set(dataset.labels().values()) <= {"0", "1"}


def test_staging_exposes_only_the_chosen_cases_inputs(dataset_dir, tmp_path):
    dataset = seal(dataset_dir)
    staged = stage(dataset, ["case-001", "case-003"], tmp_path / "input")
    files = sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file())
    assert files == ["case-001/ct.nii.gz", "case-003/ct.nii.gz", "cases.json"]
    listing = json.loads((staged / "cases.json").read_text())
    assert [c["case_id"] for c in listing["cases"]] == ["case-001", "case-003"]
    assert "label" not in json.dumps(listing)
    # hard links: the same inode, no bytes copied
    assert (staged / "case-001/ct.nii.gz").stat().st_ino == (
        dataset_dir / "inputs/case-001/ct.nii.gz").stat().st_ino
    unstage(staged)
    assert not staged.exists()
    assert verify(dataset_dir).ok


def test_staging_an_unknown_case_is_refused(dataset_dir, tmp_path):
    with pytest.raises(DatasetError, match="'case-999' is not in dataset"):
        stage(seal(dataset_dir), ["case-999"], tmp_path / "input")


@pytest.mark.docker
def test_a_container_sees_no_ground_truth(dataset_dir, tmp_path, runner, adversarial):
    dataset = seal(dataset_dir)
    staged = stage(dataset, ["case-002"], tmp_path / "input")
    output = tmp_path / "output"
    result = runner.run(RunSpec(image=adversarial["probe"], input_dir=staged, output_dir=output,
                                command=("python3", "/opt/probes/list_files.py", "/")))
    assert result.succeeded, result.log_tail
    seen = json.loads((output / "files.json").read_text())["files"]
    assert "/input/case-002/ct.nii.gz" in seen and "/input/cases.json" in seen
    assert [p for p in seen if p.startswith("/input")] == ["/input/case-002/ct.nii.gz",
                                                           "/input/cases.json"]
    truth_name = "label.nii.gz"
    assert not [p for p in seen if truth_name in p or "ground_truth" in p or str(
        dataset_dir) in p]


def test_release_is_reproducible_and_verifiable(dataset_dir, tmp_path):
    seal(dataset_dir)
    first = release(dataset_dir, tmp_path / "a.tar.gz")
    second = release(dataset_dir, tmp_path / "b.tar.gz")
    assert first.read_bytes() == second.read_bytes()
    report = verify(first)
    assert report.ok and report.version == load(dataset_dir).version
    with tarfile.open(first) as tar:
        names = tar.getnames()
        card = tar.extractfile(next(n for n in names if n.endswith("DATA_CARD.md"))).read()
    assert any(n.endswith("ground_truth/case-001/label.nii.gz") for n in names)
    text = card.decode()
    assert "Cases: 3" in text and "CC0-1.0" in text and "| 2 | tumour |" in text


def test_a_tampered_release_is_caught(dataset_dir, tmp_path):
    seal(dataset_dir)
    archive = release(dataset_dir, tmp_path / "r.tar.gz")
    unpacked = tmp_path / "unpacked"
    with tarfile.open(archive) as tar:
        tar.extractall(unpacked, filter="data")
    top = next(unpacked.iterdir())
    writable(top / "inputs/case-001/ct.nii.gz").write_bytes(b"swapped")
    with tarfile.open(tmp_path / "bad.tar.gz", "w:gz") as tar:
        tar.add(top, arcname=top.name)
    report = verify(tmp_path / "bad.tar.gz")
    assert report.changed == ["inputs/case-001/ct.nii.gz"]
