"""Hostile outputs: files that point elsewhere, trees and names that break walkers, tables
that break parsers, files that grow on the host. Each ends in a typed participant reason
with a message; the ground truth is never read, and the host never holds more than the
quota."""

from __future__ import annotations

import gzip
import json
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from pydantic import ValidationError

from engine.medio import MedioError, Volume, read_header, read_volume, write_metaimage
from engine.outputs import (
    ProbabilityOutput,
    SegmentationOutput,
    validate_probabilities,
    validate_segmentation,
)
from engine.synthetic import synth_case
from runners.base import FailureReason, MiB, RunSpec, RunStatus

INVALID = FailureReason.OUTPUT_INVALID
SPEC = SegmentationOutput(filename="mask.mha", labels=[0, 1, 2, 3])


@pytest.fixture(scope="module")
def truth() -> Volume:
    return synth_case("case-001", np.random.default_rng(11), size=24).labels


@pytest.fixture
def truth_raw(tmp_path, truth) -> Path:
    """The ground truth's voxels, as raw bytes, where a scorer host keeps them."""
    path = tmp_path / "host" / "truth" / "case-001.raw"
    path.parent.mkdir(parents=True)
    path.write_bytes(np.ascontiguousarray(truth.array.transpose(2, 1, 0)).tobytes())
    return path


def mha_header(truth: Volume, data_file: str, element: str = "MET_UCHAR") -> bytes:
    """A real MetaImage header on the reference grid, with the data file we choose."""
    write_metaimage(truth, Path("/tmp") / f"epreuve-attack-{os.getpid()}.mha")
    text = (Path("/tmp") / f"epreuve-attack-{os.getpid()}.mha").read_bytes()
    os.unlink(Path("/tmp") / f"epreuve-attack-{os.getpid()}.mha")
    head = text[: text.index(b"ElementDataFile")].decode()
    lines = [line for line in head.splitlines()
             if not line.startswith(("CompressedData", "ElementType"))]
    return ("\n".join([*lines, "CompressedData = False", f"ElementType = {element}",
                       f"ElementDataFile = {data_file}"]) + "\n").encode()


def plant(root: Path, case: str, name: str, data: bytes) -> Path:
    path = root / case / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def validate(root: Path, truth: Volume, case: str = "case-001", spec=SPEC):
    return validate_segmentation(root, case, spec, truth.geometry)


# -- MetaImage headers that name another file --------------------------------------------------


def test_a_mha_naming_the_ground_truth_by_absolute_path_is_invalid(tmp_path, truth, truth_raw):
    plant(tmp_path / "out", "case-001", "mask.mha", mha_header(truth, str(truth_raw)))
    outcome = validate(tmp_path / "out", truth)
    assert outcome.reason is INVALID and outcome.mask is None
    assert "a .mha file must hold its own voxel data (ElementDataFile = LOCAL)" in outcome.message


@pytest.mark.parametrize("data_file", [
    "../../host/truth/case-001.raw",
    "sub/../../../host/truth/case-001.raw",
    "LIST",
    "slice%03d.raw 0 23 1",
    "/dev/zero",
    "/proc/self/environ",
])
def test_a_mha_may_only_hold_its_data(tmp_path, truth, truth_raw, data_file):
    plant(tmp_path / "out", "case-001", "mask.mha", mha_header(truth, data_file) +
          b"slice000.raw\n")
    outcome = validate(tmp_path / "out", truth)
    assert outcome.reason is INVALID
    assert "ElementDataFile = LOCAL" in outcome.message


def test_mhd_data_is_a_plain_file_beside_it_never_a_link_nor_a_path(tmp_path, truth, truth_raw):
    """.mhd is no output format, but datasets may use it: its data file is confined too."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "data.raw").symlink_to(truth_raw)
    (folder / "linked.mhd").write_bytes(mha_header(truth, "data.raw"))
    with pytest.raises(MedioError, match="symbolic link"):
        read_volume(folder / "linked.mhd")
    for data_file in (str(truth_raw), "../host/truth/case-001.raw", "LIST", "s%03d.raw 0 2 1"):
        (folder / "named.mhd").write_bytes(mha_header(truth, data_file))
        with pytest.raises(MedioError, match="may only name one file beside the header"):
            read_volume(folder / "named.mhd")
    os.mkfifo(folder / "pipe.raw")
    (folder / "pipe.mhd").write_bytes(mha_header(truth, "pipe.raw"))
    with pytest.raises(MedioError, match="not a regular file"):  # and never blocks
        read_volume(folder / "pipe.mhd")
    (folder / "plain.raw").write_bytes(truth_raw.read_bytes())
    (folder / "plain.mhd").write_bytes(mha_header(truth, "plain.raw"))
    assert np.array_equal(read_volume(folder / "plain.mhd").array, truth.array)


def test_a_mha_that_is_a_link_or_a_fifo_is_refused_without_blocking(tmp_path, truth):
    (tmp_path / "case-001").mkdir()
    os.mkfifo(tmp_path / "case-001" / "mask.mha")
    assert validate(tmp_path, truth).reason is INVALID
    with pytest.raises(MedioError, match="not a regular file"):
        read_volume(tmp_path / "case-001" / "mask.mha")
    (tmp_path / "case-002").mkdir()
    write_metaimage(truth, tmp_path / "truth.mha")
    (tmp_path / "case-002" / "mask.mha").symlink_to(tmp_path / "truth.mha")
    with pytest.raises(MedioError, match="symbolic link"):
        read_header(tmp_path / "case-002" / "mask.mha")
    assert validate(tmp_path, truth, "case-002").reason is INVALID


@pytest.mark.parametrize("header, expected", [
    (b"NDims = 3\nNDims = 3\nElementDataFile = LOCAL\n", "given twice"),
    (b"NDims = 3\n\xff\xfe = 1\nElementDataFile = LOCAL\n", "not ASCII"),
    (b"".join(b"K%d = x\n" % i for i in range(300)) + b"ElementDataFile = LOCAL\n",
     "no ElementDataFile line"),
    (b"NDims: 3\nElementDataFile = LOCAL\n", "is not 'Key = Value'"),
])
def test_malformed_metaimage_headers_are_refused(tmp_path, truth, header, expected):
    plant(tmp_path, "case-001", "mask.mha", header)
    outcome = validate(tmp_path, truth)
    assert outcome.reason is INVALID and expected in outcome.message


def test_a_compressed_mha_is_inflated_only_as_far_as_declared(tmp_path, truth):
    head = mha_header(truth, "LOCAL").replace(b"CompressedData = False",
                                              b"CompressedData = True")
    bomb = zlib.compress(b"\x00" * (64 * MiB), 9)  # 64 MiB of zeros in ~64 KiB
    plant(tmp_path, "case-001", "mask.mha", head + bomb)
    outcome = validate(tmp_path, truth)
    assert outcome.valid and not outcome.mask.any()  # only 24*24*16 bytes were inflated
    plant(tmp_path, "case-001", "mask.mha", head + zlib.compress(b"\x00" * 100))
    outcome = validate(tmp_path, truth)
    assert outcome.reason is INVALID
    assert "expected 9216 bytes of voxel data, the compressed stream holds 100" in outcome.message


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32,
                                   np.int64, np.uint64, np.float32, np.float64])
def test_our_metaimage_reader_agrees_with_itk(tmp_path, dtype):
    rng = np.random.default_rng(3)
    array = rng.integers(0, 100, size=(5, 6, 7)).astype(dtype)  # (z, y, x) for SimpleITK
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.5, 0.75, 2.5))
    image.SetOrigin((-10.0, 4.5, 33.0))
    angle = np.deg2rad(17)
    image.SetDirection((np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0,
                        0, 0, 1))
    for compressed in (False, True):
        sitk.WriteImage(image, str(tmp_path / "a.mha"), useCompression=compressed)
        ours = read_volume(tmp_path / "a.mha")
        assert ours.array.dtype == dtype
        assert np.array_equal(ours.array, array.transpose(2, 1, 0))
        itk = sitk.ReadImage(str(tmp_path / "a.mha"))
        direction = np.asarray(itk.GetDirection()).reshape(3, 3)
        lps = np.diag([-1, -1, 1]) @ (direction * np.asarray(itk.GetSpacing()))
        assert np.allclose(ours.affine[:3, :3], lps)
        assert np.allclose(ours.affine[:3, 3], np.diag([-1, -1, 1]) @ itk.GetOrigin())


def test_big_endian_metaimage_data(tmp_path, truth):
    head = mha_header(truth, "LOCAL", "MET_USHORT").replace(
        b"BinaryDataByteOrderMSB = False", b"BinaryDataByteOrderMSB = True")
    voxels = np.ascontiguousarray(truth.array.transpose(2, 1, 0)).astype(">u2").tobytes()
    plant(tmp_path, "case-001", "mask.mha", head + voxels)
    outcome = validate(tmp_path, truth)
    assert outcome.valid and np.array_equal(outcome.mask, truth.array)


# -- NIfTI: single files only ----------------------------------------------------------------


def test_a_nifti_pair_header_is_refused_even_named_nii(tmp_path, truth):
    spec = SegmentationOutput(filename="mask.nii", labels=[0, 1, 2, 3])
    pair = nib.Nifti1Pair(truth.array, truth.affine)
    nib.save(pair, tmp_path / "pair.img")  # writes pair.hdr + pair.img, magic ni1
    (tmp_path / "case-001").mkdir()
    (tmp_path / "case-001" / "mask.nii").write_bytes((tmp_path / "pair.hdr").read_bytes())
    (tmp_path / "case-001" / "mask.img").write_bytes((tmp_path / "pair.img").read_bytes())
    outcome = validate_segmentation(tmp_path, "case-001", spec, truth.geometry)
    assert outcome.reason is INVALID
    assert "magic b'ni1\\x00'" in outcome.message and ".hdr/.img pairs are refused" in \
        outcome.message


def test_a_nifti_vox_offset_far_into_a_gzip_stream_is_refused(tmp_path, truth):
    header = nib.Nifti1Header()
    header.set_data_shape(truth.array.shape)
    header.set_data_dtype(np.uint8)
    header.set_data_offset(1 << 30)  # 1 GiB of (cheap, compressed) zeros before the data
    plant(tmp_path, "case-001", "mask.nii.gz", gzip.compress(header.binaryblock + b"\0" * 4))
    spec = SegmentationOutput(filename="mask.nii.gz", labels=[0, 1, 2, 3])
    outcome = validate_segmentation(tmp_path, "case-001", spec, truth.geometry)
    assert outcome.reason is INVALID and "vox_offset 1073741824 lies outside" in outcome.message


@pytest.mark.parametrize("filename", [
    "mask.mhd", "mask.hdr", "mask.img", "mask.raw", "mask.dcm", "series", "../mask.nii.gz",
    "sub/mask.nii.gz", "/etc/passwd.nii", ".mask.nii.gz", "mask.nii.gz\n", "mask .nii",
])
def test_the_output_spec_accepts_single_file_formats_only(filename):
    with pytest.raises(ValidationError, match="not accepted: the output file name"):
        SegmentationOutput(filename=filename)
    for good in ("mask.nii.gz", "mask.nii", "mask.mha", "Seg_01.NII.GZ"):
        assert SegmentationOutput(filename=good).filename == good


def test_the_table_spec_accepts_csv_and_json_only():
    for bad in ("p.txt", "../p.csv", "dir/p.json", "p.csv.gz"):
        with pytest.raises(ValidationError, match=r"ending in \.csv, \.json"):
            ProbabilityOutput(filename=bad)


# -- tables ------------------------------------------------------------------------------------


def table(tmp_path: Path, name: str, data: bytes, classes=("probability",)) -> dict:
    (tmp_path / name).write_bytes(data)
    return validate_probabilities(tmp_path, ["c1"], ProbabilityOutput(filename=name,
                                                                      classes=list(classes)))


@pytest.mark.parametrize("data, expected", [
    (b"case_id,probability\nc1," + b"1" * 200_000 + b"\n", "field larger than field limit"),
    (b"case_id,probability\nc1,0.5\x00\n", "probability is '0.5\\x00', not a number"),
    (b"case_id,probability\nc1,0.5\n\xff\xfe\n", "not UTF-8 text (byte 27)"),
    (b"case_id," + b",".join(b"x%d" % i for i in range(2000)) + b"\nc1,0.5\n",
     "more than 1000 columns"),
])
def test_hostile_csv_tables_are_invalid(tmp_path, data, expected):
    result = table(tmp_path, "p.csv", data)["c1"]
    assert result.reason is INVALID and expected in result.message


@pytest.mark.parametrize("data, expected", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"c1": {"probability": NaN}}', "NaN is not a JSON number"),
    (b'{"c1": {"probability": Infinity}}', "Infinity is not a JSON number"),
    (b'{"c1": 0.2, "c1": 0.9}', "key 'c1' appears more than once"),
    (b'{"c1": {"probability": 1' + b"0" * 5000 + b"}}", "Exceeds the limit"),
    (b'{"c1": {"probability": 1e999999}}', "probabilities lie in [0, 1]"),
    (b'{"c1": {"probability": 1' + b"0" * 400 + b"}}", "not a number"),
    (b'{"c1": {"probability": true}}', "probability is True, not a number"),
    (b'{"c1": {"probability": [0.5]}}', "not a number"),
    (b"\xff" * 10, "not UTF-8 text"),
])
def test_hostile_json_tables_are_invalid(tmp_path, data, expected):
    result = table(tmp_path, "p.json", data)["c1"]
    assert result.reason is INVALID and expected in result.message


def test_a_table_that_is_a_link_or_a_fifo_is_invalid_without_blocking(tmp_path):
    os.symlink("/etc/passwd", tmp_path / "p.csv")
    assert "symbolic link" in validate_probabilities(
        tmp_path, ["c1"], ProbabilityOutput(filename="p.csv"))["c1"].message
    os.mkfifo(tmp_path / "q.csv")
    assert "not a regular file" in validate_probabilities(
        tmp_path, ["c1"], ProbabilityOutput(filename="q.csv"))["c1"].message


# -- collection, by real containers ------------------------------------------------------------


def allocated_below(root: Path) -> int:
    """What the copy occupies on the host's disk, every entry below `root` (never followed)."""
    total = 0
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            total += os.lstat(os.path.join(directory, name)).st_blocks * 512
    return total


def contained(runner, tmp_path: Path, script: str, quota: int = 10 * MiB):
    output = tmp_path / "collected"
    result = runner.run(RunSpec(image="epreuve/base:3.11", command=("python3", "-c", script),
                                output_dir=output, output_quota_bytes=quota,
                                timeout_seconds=120))
    json.dumps(result.to_dict())  # every name in it is printable text
    return result, output


@pytest.mark.docker
def test_three_sparse_gigabytes_under_a_ten_mib_quota(runner, tmp_path):
    result, output = contained(runner, tmp_path, (
        "import os\n"
        "for i in range(3):\n"
        "    with open(f'/output/sparse{i}.bin', 'wb') as f: f.truncate(1 << 30)\n"))
    assert result.reason is FailureReason.OUTPUT_QUOTA, result.message
    assert "sparse0.bin (1.0 GiB sparse, 0 B written" in result.message
    assert "once copied, more than its output quota of 10.0 MiB" in result.message
    assert allocated_below(output) <= 10 * MiB
    assert result.output_bytes == 0


@pytest.mark.docker
def test_one_file_hard_linked_sixty_times_under_a_ten_mib_quota(runner, tmp_path):
    result, output = contained(runner, tmp_path, (
        "import os\n"
        "with open('/output/data.bin', 'wb') as f: f.write(os.urandom(8 << 20))\n"
        "for i in range(60): os.link('/output/data.bin', f'/output/link{i:02d}.bin')\n"))
    assert result.reason is FailureReason.OUTPUT_QUOTA, result.message
    assert "one of 61 hard links to the same data: each counts as a copy" in result.message
    assert allocated_below(output) <= 10 * MiB


@pytest.mark.docker
def test_hard_links_within_the_quota_are_copied_as_files(runner, tmp_path):
    result, output = contained(runner, tmp_path, (
        "import os\n"
        "os.mkdir('/output/case-001')\n"
        "with open('/output/case-001/mask.nii.gz', 'wb') as f: f.write(b'm' * 5000)\n"
        "os.link('/output/case-001/mask.nii.gz', '/output/copy.nii.gz')\n"))
    assert result.status is RunStatus.SUCCEEDED, result.message
    assert (result.output_files, result.output_bytes) == (2, 10_000)
    assert os.stat(output / "copy.nii.gz").st_nlink == 1
    assert allocated_below(output) == 4096 + 2 * 8192  # what collection counted: a directory,
    # and two files of 5000 bytes at two blocks each


@pytest.mark.docker
def test_a_tree_fifteen_hundred_deep(runner, tmp_path):
    result, output = contained(runner, tmp_path, (
        "import os\n"
        "os.chdir('/output')\n"
        "for _ in range(1500):\n"
        "    os.mkdir('d'); os.chdir('d')\n"
        "open('leaf.txt', 'w').write('x')\n"))
    assert result.reason is INVALID, result.message
    assert "lies more than 32 directories deep; it was not collected" in result.message
    deepest = max(len(Path(d).relative_to(output).parts) for d, _, _ in os.walk(output))
    assert deepest == 32
    assert allocated_below(output) <= 10 * MiB


@pytest.mark.docker
def test_a_path_longer_than_path_max(runner, tmp_path):
    result, output = contained(runner, tmp_path, (
        "import os\n"
        "os.chdir('/output')\n"
        "for _ in range(20):\n"
        "    os.mkdir('n' * 250); os.chdir('n' * 250)\n"
        "open('mask.nii.gz', 'w').write('x')\n"))
    assert result.reason is INVALID, result.message
    assert "the path is longer than 1024 bytes; it was not collected" in result.message
    assert not any("mask.nii.gz" in files for _, _, files in os.walk(output))


@pytest.mark.docker
def test_names_that_are_not_utf8(runner, tmp_path):
    result, output = contained(runner, tmp_path, (
        "import os\n"
        "os.mkdir(b'/output/case-001')\n"
        "open(b'/output/case-001/mask\\xff\\xfe.nii.gz', 'wb').write(b'x')\n"
        "os.mkdir(b'/output/\\xc3\\x28dir')\n"
        "open(b'/output/ok.txt', 'wb').write(b'fine')\n"))
    assert result.reason is INVALID, result.message
    assert "case-001/mask\\xff\\xfe.nii.gz: the name is not UTF-8 text" in result.message
    assert "\\xc3(dir: the name is not UTF-8 text" in result.message
    assert sorted(os.listdir(output)) == ["case-001", "ok.txt"]
    assert os.listdir(output / "case-001") == []


@pytest.mark.docker
def test_a_mha_written_by_a_container_cannot_reach_the_host(runner, tmp_path, truth, truth_raw):
    """The container names the ground truth's host path; the scorer must not read it."""
    header = mha_header(truth, str(truth_raw))
    result, output = contained(runner, tmp_path, (
        "import os, sys\n"
        "os.mkdir('/output/case-001')\n"
        f"open('/output/case-001/mask.mha', 'wb').write({header!r})\n"))
    assert result.status is RunStatus.SUCCEEDED, result.message
    outcome = validate(output, truth)
    assert outcome.reason is INVALID and "ElementDataFile = LOCAL" in outcome.message


def test_a_header_whose_size_wraps_int64_is_refused_by_its_true_size(tmp_path, truth):
    head = mha_header(truth, "LOCAL").replace(b"DimSize = 24 24 16",
                                              b"DimSize = 999999999 999999999 999999999")
    plant(tmp_path, "case-001", "mask.mha", head)
    outcome = validate(tmp_path, truth)
    assert outcome.reason is INVALID
    assert "declares 999999997000000002999999999 bytes" in outcome.message


def test_a_case_folder_the_runner_refused_as_a_link_is_invalid(tmp_path, truth):
    skipped = frozenset({"case-001 (symbolic link, not collected)"})
    outcome = validate_segmentation(tmp_path, "case-001", SPEC, truth.geometry, skipped=skipped)
    assert outcome.reason is INVALID and "(or its folder) was not a regular file" in \
        outcome.message


@pytest.mark.docker
def test_empty_directories_count_for_what_they_occupy_on_the_host(runner, tmp_path):
    result, output = contained(runner, tmp_path, (
        "import os\n"
        "for i in range(3000): os.mkdir(f'/output/d{i:04d}')\n"))
    assert result.reason is FailureReason.OUTPUT_QUOTA, result.message
    assert "would occupy 11.7 MiB once copied, more than its output quota of 10.0 MiB" in \
        result.message
    assert allocated_below(output) <= 10 * MiB


def test_a_polled_directory_area_survives_a_deep_tree(tmp_path):
    """Without root the area is a plain directory, walked while the container runs."""
    from runners.output_area import OutputArea

    area = OutputArea(tmp_path / "area", quota_bytes=10 * MiB)
    area.path.mkdir()
    fd = os.open(area.path, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(1500):
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    leaf = os.open("leaf", os.O_WRONLY | os.O_CREAT, dir_fd=fd)
    os.write(leaf, b"x" * 100)
    os.close(leaf)
    os.close(fd)
    assert not area.over_quota()
    collected = area.collect(tmp_path / "copy")
    assert collected.reason is INVALID and "more than 32 directories deep" in collected.message
    area.release()
    assert not area.path.exists()


def test_a_nifti_in_several_gzip_members_reads_whole(tmp_path, truth):
    from engine.medio import write_nifti

    write_nifti(truth, tmp_path / "one.nii.gz")
    raw = gzip.decompress((tmp_path / "one.nii.gz").read_bytes())
    members = b"".join(gzip.compress(raw[i:i + 1000]) for i in range(0, len(raw), 1000))
    plant(tmp_path, "case-001", "mask.nii.gz", members + b"trailing junk")
    spec = SegmentationOutput(filename="mask.nii.gz", labels=[0, 1, 2, 3])
    outcome = validate_segmentation(tmp_path, "case-001", spec, truth.geometry)
    assert outcome.valid and np.array_equal(outcome.mask, truth.array)
