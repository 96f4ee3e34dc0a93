"""Hostile datasets at sealing and verification: damaged images, links out of the tree,
special files, concurrent verifications, extracted releases. All on real files."""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import stat
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from engine.datasets import (
    DatasetError,
    VerificationCache,
    load,
    release,
    seal,
    stage,
    unstage,
    verify,
)
from engine.medio import Volume, read_volume, write_metaimage, write_nifti
from engine.synthetic import synth_dataset


@pytest.fixture
def dataset_dir(tmp_path):
    root = tmp_path / "ds"
    synth_dataset(root, cases=3, seed=3, size=24)
    return root


def mode_of(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


# -- every image is decoded whole at seal ------------------------------------------------


def test_ground_truth_with_truncated_gzip_is_refused_naming_case_and_file(dataset_dir):
    truth = dataset_dir / "ground_truth/case-002/label.nii.gz"
    data = truth.read_bytes()
    truth.write_bytes(data[: len(data) * 2 // 3])  # the header is intact, the voxels are not
    assert nib.load(str(truth)).shape == (24, 24, 16)  # a header-only read is fooled
    with pytest.raises(DatasetError, match=r"case 'case-002': ground_truth/case-002/label\.nii"
                                           r"\.gz cannot be read"):
        seal(dataset_dir)
    assert not (dataset_dir / "manifest.json").exists()


def test_uncompressed_nifti_shorter_than_its_header_declares_is_refused(dataset_dir):
    image = read_volume(dataset_dir / "inputs/case-001/ct.nii.gz")
    (dataset_dir / "inputs/case-001/ct.nii.gz").unlink()
    path = dataset_dir / "inputs/case-001/ct.nii"
    write_nifti(image, path)
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 100)
    with pytest.raises(DatasetError, match=r"case 'case-001': inputs/case-001/ct\.nii cannot "
                                           "be read"):
        seal(dataset_dir)


def test_gzip_with_a_corrupted_stream_is_refused(dataset_dir):
    path = dataset_dir / "inputs/case-003/ct.nii.gz"
    raw = gzip.decompress(path.read_bytes())
    packed = bytearray(gzip.compress(raw, mtime=0))
    packed[-8] ^= 0xFF  # the CRC of the uncompressed data: every byte inflates, then fails
    path.write_bytes(bytes(packed))
    with pytest.raises(DatasetError, match=r"case 'case-003': inputs/case-003/ct\.nii\.gz "
                                           "cannot be read"):
        seal(dataset_dir)


def test_a_header_declaring_terabytes_is_refused_before_its_data_is_read(dataset_dir):
    path = dataset_dir / "inputs/case-002/ct.nii.gz"
    image = nib.load(str(path))
    header = image.header.copy()
    header.set_data_shape((20000, 20000, 20000))
    with gzip.open(path, "wb") as handle:
        handle.write(header.binaryblock + b"\0" * 4)
    with pytest.raises(DatasetError, match=r"case 'case-002': inputs/case-002/ct\.nii\.gz cannot"
                                           r" be read: its header declares 16000000000000 bytes"):
        seal(dataset_dir)


def test_a_label_map_with_fractional_values_is_refused(dataset_dir):
    path = dataset_dir / "ground_truth/case-001/label.nii.gz"
    mask = read_volume(path)
    write_nifti(Volume(mask.array.astype(np.float32) * 0.5, mask.affine), path)
    with pytest.raises(DatasetError, match=r"case 'case-001': ground_truth/case-001/label\.nii"
                                           r"\.gz is not a label map"):
        seal(dataset_dir)


def test_truncated_metaimage_data_is_refused(dataset_dir):
    image = read_volume(dataset_dir / "inputs/case-001/ct.nii.gz")
    (dataset_dir / "inputs/case-001/ct.nii.gz").unlink()
    path = dataset_dir / "inputs/case-001/ct.mha"
    write_metaimage(image, path)
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 200)
    with pytest.raises(DatasetError, match=r"case 'case-001': inputs/case-001/ct\.mha cannot "
                                           "be read"):
        seal(dataset_dir)


@pytest.mark.parametrize("data_file", ["../../../host.raw", "/etc/hostname", "sub/ct.raw"])
def test_a_metaimage_header_naming_data_outside_its_folder_is_refused(dataset_dir, data_file):
    (dataset_dir / "inputs/case-001/ct.nii.gz").unlink()
    (dataset_dir.parent / "host.raw").write_bytes(b"\0" * (24 * 24 * 16 * 2))
    (dataset_dir / "inputs/case-001/ct.mhd").write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 24 24 16\nElementType = MET_SHORT\n"
        f"ElementSpacing = 1 1 1\nElementDataFile = {data_file}\n")
    with pytest.raises(DatasetError, match=r"case 'case-001': inputs/case-001/ct\.mhd cannot be"
                                           r" read: ElementDataFile .* must be LOCAL or the "
                                           "name of a file beside the header"):
        seal(dataset_dir)


def test_a_dicom_slice_with_truncated_pixel_data_is_refused(tmp_path):
    root = tmp_path / "d"
    synth_dataset(root, cases=2, seed=1, size=20, image_format="dicom")
    path = root / "inputs/case-002/ct/slice-0004.dcm"
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(path)
    with pytest.raises(DatasetError, match=r"case 'case-002': inputs/case-002/ct cannot be "
                                           r"read: ct: pixel data of slice-0004\.dcm cannot be "
                                           "decoded"):
        seal(root)


# -- links, special files: refused, and nothing outside the dataset changes ------------------


def test_a_hard_link_to_a_host_file_is_refused_and_the_host_file_is_untouched(dataset_dir):
    host = dataset_dir.parent / "host-secret.nii.gz"
    truth = dataset_dir / "ground_truth/case-003/label.nii.gz"
    host.write_bytes(truth.read_bytes())
    host.chmod(0o640)
    truth.unlink()
    os.link(host, truth)
    with pytest.raises(DatasetError, match=r"ground_truth/case-003/label\.nii\.gz has 2 hard "
                                           "links: a dataset holds files with one name only"):
        seal(dataset_dir)
    assert mode_of(host) == 0o640
    assert not (dataset_dir / "manifest.json").exists()


@pytest.mark.parametrize("where", ["inputs/case-001/extra.nii.gz", "inputs/case-002/linked",
                                   "inputs/case-003", "ground_truth/case-001/label.nii.gz"])
def test_a_symbolic_link_anywhere_in_the_tree_is_refused(dataset_dir, where):
    host_dir = dataset_dir.parent / "host"
    host_dir.mkdir()
    (host_dir / "file.nii.gz").write_bytes(
        (dataset_dir / "inputs/case-001/ct.nii.gz").read_bytes())
    (host_dir / "file.nii.gz").chmod(0o600)
    link = dataset_dir / where
    if link.exists():
        os.rename(link, dataset_dir.parent / "moved-away")
    target = host_dir if where == "inputs/case-002/linked" else host_dir / "file.nii.gz"
    if where == "inputs/case-003":
        target = dataset_dir.parent / "moved-away"
    link.symlink_to(target)
    with pytest.raises(DatasetError, match=f"{where} is a symbolic link: a dataset holds "
                                           "regular files only"):
        seal(dataset_dir)
    assert mode_of(host_dir / "file.nii.gz") == 0o600


def test_a_manifest_that_links_to_a_host_file_is_refused_and_the_host_file_is_untouched(
        dataset_dir):
    host = dataset_dir.parent / "host.conf"
    host.write_text("host configuration\n")
    host.chmod(0o600)
    (dataset_dir / "manifest.json").symlink_to(host)
    with pytest.raises(DatasetError, match=r"manifest\.json is a symbolic link"):
        seal(dataset_dir)
    assert host.read_text() == "host configuration\n" and mode_of(host) == 0o600
    (dataset_dir / "manifest.json").unlink()
    os.link(host, dataset_dir / "manifest.json")
    with pytest.raises(DatasetError, match=r"manifest\.json has 2 hard links"):
        seal(dataset_dir)
    assert host.read_text() == "host configuration\n" and mode_of(host) == 0o600


def test_a_fifo_in_the_tree_is_refused_without_blocking(dataset_dir):
    os.mkfifo(dataset_dir / "inputs/case-001/pipe")
    with pytest.raises(DatasetError, match=r"inputs/case-001/pipe is a FIFO"):
        seal(dataset_dir)


def test_a_dangling_link_and_a_device_are_refused_together(dataset_dir):
    (dataset_dir / "inputs/case-002/gone.nii.gz").symlink_to(dataset_dir / "nowhere.nii.gz")
    try:
        os.mknod(dataset_dir / "dataset.dev", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD")
    with pytest.raises(DatasetError) as refused:
        seal(dataset_dir)
    assert str(refused.value).splitlines()[1:] == [
        "  dataset.dev is a character device: a dataset holds regular files only (copy the "
        "data in)",
        "  inputs/case-002/gone.nii.gz is a symbolic link: a dataset holds regular files only "
        "(copy the data in)"]


def test_a_long_list_of_refusals_is_cut_short(dataset_dir):
    for index in range(13):
        note = dataset_dir / f"inputs/case-001/note-{index:02d}.txt"
        note.write_text("linked twice")
        os.link(note, dataset_dir / f"inputs/case-002/note-{index:02d}.txt")
    with pytest.raises(DatasetError) as refused:
        seal(dataset_dir)
    lines = str(refused.value).splitlines()
    assert len(lines) == 22 and lines[-1] == "  ... and 6 more"


def test_a_socket_in_the_tree_is_refused(dataset_dir):
    import socket

    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(dataset_dir / "ground_truth/case-002/sock"))
        with pytest.raises(DatasetError, match=r"ground_truth/case-002/sock is a socket"):
            seal(dataset_dir)


def test_a_case_that_is_a_file_is_refused(dataset_dir):
    (dataset_dir / "inputs/notes.txt").write_text("not a case")
    with pytest.raises(DatasetError, match=r"inputs/notes\.txt is a file: each case is a folder"):
        seal(dataset_dir)


def test_a_description_that_is_not_an_object_is_refused(dataset_dir):
    (dataset_dir / "dataset.json").write_text("[1, 2]")
    with pytest.raises(DatasetError, match=r"dataset\.json must hold a JSON object"):
        seal(dataset_dir)


# -- verify: content only, so staging's hard links do not fail it ---------------------------


def test_verify_passes_while_a_job_has_the_cases_staged_and_seal_says_why_it_refuses(
        dataset_dir, tmp_path):
    dataset = seal(dataset_dir)
    staged = stage(dataset, ["case-001", "case-002"], tmp_path / "job" / "input")
    assert (dataset_dir / "inputs/case-001/ct.nii.gz").stat().st_nlink == 2
    assert verify(dataset_dir).ok
    assert verify(dataset_dir, cache=VerificationCache(tmp_path / "cache")).ok
    with pytest.raises(DatasetError, match=r"inputs/case-001/ct\.nii\.gz has 2 hard links.*if "
                                           "a job is running on this dataset, seal again once "
                                           "it has ended"):
        seal(dataset_dir)
    unstage(staged)
    assert seal(dataset_dir).version == dataset.version


def test_verify_names_a_linked_directory_planted_after_sealing(dataset_dir, tmp_path):
    seal(dataset_dir)
    (tmp_path / "elsewhere").mkdir()
    (dataset_dir / "inputs/case-001/more").symlink_to(tmp_path / "elsewhere")
    os.mkfifo(dataset_dir / "inputs/case-002/pipe")
    report = verify(dataset_dir)
    assert report.added == ["inputs/case-001/more", "inputs/case-002/pipe"]


def test_verify_names_a_sealed_file_swapped_for_a_link(dataset_dir, tmp_path):
    seal(dataset_dir)
    original = dataset_dir / "inputs/case-002/ct.nii.gz"
    copy = tmp_path / "same-bytes.nii.gz"
    copy.write_bytes(original.read_bytes())
    original.unlink()
    original.symlink_to(copy)
    assert verify(dataset_dir).changed == ["inputs/case-002/ct.nii.gz"]


def test_staging_skips_a_link_planted_after_sealing(dataset_dir, tmp_path):
    dataset = seal(dataset_dir)
    (tmp_path / "secret.txt").write_text("host secret")
    (dataset_dir / "inputs/case-001/secret.txt").symlink_to(tmp_path / "secret.txt")
    staged = stage(dataset, ["case-001"], tmp_path / "input")
    listing = json.loads((staged / "cases.json").read_text())
    assert listing["cases"][0]["files"] == ["ct.nii.gz"]
    assert not (staged / "case-001/secret.txt").exists()


# -- concurrent verifications share no temporary file --------------------------------------


def test_two_cache_writers_at_once_both_succeed(dataset_dir, tmp_path, monkeypatch):
    """Both writers have filled their temporary file before either renames it."""
    seal(dataset_dir)
    cache = VerificationCache(tmp_path / "cache")
    both_written = threading.Barrier(2)
    rename = os.replace

    def replace_when_both_have_written(source, target, *args, **kwargs):
        both_written.wait(timeout=30)
        return rename(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace_when_both_have_written)
    outcomes: list = []

    def verify_once():
        try:
            outcomes.append(verify(dataset_dir, cache=cache, full=True).ok)
        except Exception as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=verify_once) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes == [True, True]
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.suffix == ".tmp"] == []
    monkeypatch.undo()
    assert verify(dataset_dir, cache=cache).hashed_files == 0


def _verify_repeatedly(root: str, cache_dir: str, times: int) -> list[bool]:
    cache = VerificationCache(cache_dir)
    return [verify(root, cache=cache, full=True).ok for _ in range(times)]


def test_concurrent_verifying_processes_all_succeed(dataset_dir, tmp_path):
    seal(dataset_dir)
    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        results = pool.starmap(_verify_repeatedly,
                               [(str(dataset_dir), str(tmp_path / "cache"), 15)] * 4)
    assert results == [[True] * 15] * 4
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [
        VerificationCache(tmp_path / "cache")._path(dataset_dir).name]


# -- verify accepts an extracted release ---------------------------------------------------


def _extract(archive, into):
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return next(into.iterdir())


def test_an_extracted_release_verifies_and_its_tampering_is_named(dataset_dir, tmp_path):
    version = seal(dataset_dir).version
    top = _extract(release(dataset_dir, tmp_path / "r.tar.gz"), tmp_path / "unpacked")
    assert sorted(p.name for p in top.iterdir()) == ["DATA_CARD.md", "SHA256SUMS",
                                                     "dataset.json", "ground_truth", "inputs",
                                                     "manifest.json"]
    report = verify(top)
    assert report.ok and report.version == version and load(top).version == version
    sums = top / "SHA256SUMS"
    sums.chmod(0o644)
    sums.write_text(sums.read_text().replace("inputs/case-001", "inputs/case-009"))
    card = top / "DATA_CARD.md"
    card.chmod(0o644)
    card.write_text(card.read_text().replace("Cases: 3", "Cases: 4"))
    truth = top / "ground_truth/case-002/label.nii.gz"
    truth.chmod(0o644)
    truth.write_bytes(b"swapped")
    report = verify(top)
    assert report.changed == ["ground_truth/case-002/label.nii.gz", "DATA_CARD.md",
                              "SHA256SUMS"]


def test_a_release_archive_with_a_tampered_checksum_list_is_caught(dataset_dir, tmp_path):
    seal(dataset_dir)
    top = _extract(release(dataset_dir, tmp_path / "r.tar.gz"), tmp_path / "unpacked")
    sums = top / "SHA256SUMS"
    sums.chmod(0o644)
    sums.write_text("")
    with tarfile.open(tmp_path / "bad.tar.gz", "w:gz") as tar:
        tar.add(top, arcname=top.name)
    assert verify(tmp_path / "bad.tar.gz").changed == ["SHA256SUMS"]


def test_the_command_line_verifies_an_extracted_release(dataset_dir, tmp_path):
    seal(dataset_dir)
    top = _extract(release(dataset_dir, tmp_path / "r.tar.gz"), tmp_path / "unpacked")
    env = {**os.environ, "EPREUVE_STATE_DIR": str(tmp_path / "state"), "COLUMNS": "200"}
    proc = subprocess.run([str(Path(sys.executable).parent / "epreuve"), "dataset", "verify",
                           str(top)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"intact: version {load(dataset_dir).version}" in proc.stdout
