"""DICOM as hospitals send it: compressed transfer syntaxes, multi-frame (enhanced) files,
missing tags, and the one-series-per-subfolder layout. Real files, sealed and staged."""

from __future__ import annotations

import json
import shutil

import gdcm
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    MPEG2MPML,
    UID,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from engine.datasets import DICOM_LAYOUT, DatasetError, data_card, seal, stage
from engine.medio import MedioError, Volume, read_volume, write_dicom_series
from engine.medio.volume import affine_from_lps, lps_parts
from engine.synthetic import synth_case, synth_dataset

SIZE = 32  # JPEG 2000's default five decompositions need at least 32 pixels a side


@pytest.fixture(scope="module")
def ct() -> Volume:
    return synth_case("case-001", np.random.default_rng(5), size=SIZE).image


def oblique(volume: Volume) -> Volume:
    angle = np.deg2rad(17)
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)],
                         [0, np.sin(angle), np.cos(angle)]])
    return Volume(volume.array, affine_from_lps(rotation, (0.8, 0.75, 2.5), (-90.0, 12.5, 40.0)),
                  modality="CT")


def compress_in_place(path, syntax: UID) -> None:
    if syntax == JPEGLosslessSV1:  # pydicom has no encoder for it: GDCM transcodes
        reader = gdcm.ImageReader()
        reader.SetFileName(str(path))
        assert reader.Read()
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
        change.SetInput(reader.GetImage())
        assert change.Change()
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(path))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        assert writer.Write()
        return
    ds = pydicom.dcmread(path)
    ds.compress(syntax)
    ds.save_as(path)


def dicom_dataset(root, syntax: UID | None = None):
    synth_dataset(root, cases=2, seed=8, size=SIZE, image_format="dicom")
    series = root / "inputs/case-002/ct"
    original = read_volume(series)
    if syntax is not None:
        for path in sorted(series.iterdir()):
            compress_in_place(path, syntax)
    return series, original


def enhanced_ct(volume: Volume, path, *, order=None, per_frame_geometry=False,
                drop_position_of_frame: int | None = None):
    """One multi-frame Enhanced CT file from a volume, frames stored in `order`."""
    direction, spacing, origin = lps_parts(volume.affine)
    stored = np.rint(np.asarray(volume.array, float) + 1024).astype(np.uint16)
    depth = stored.shape[2]
    order = list(range(depth)) if order is None else order
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = EnhancedCTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "CT", "ANONYMOUS"
    ds.Rows, ds.Columns, ds.NumberOfFrames = stored.shape[1], stored.shape[0], depth
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0

    def orientation():
        item = Dataset()
        item.ImageOrientationPatient = [float(v) for v in (*direction[:, 0], *direction[:, 1])]
        return item

    def measures():
        item = Dataset()
        item.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        item.SliceThickness = float(spacing[2])
        return item

    transform = Dataset()
    transform.RescaleIntercept, transform.RescaleSlope, transform.RescaleType = -1024, 1, "HU"
    shared = Dataset()
    shared.PixelValueTransformationSequence = [transform]
    if not per_frame_geometry:
        shared.PlaneOrientationSequence = [orientation()]
        shared.PixelMeasuresSequence = [measures()]
    ds.SharedFunctionalGroupsSequence = [shared]
    groups = []
    for number, k in enumerate(order):
        group = Dataset()
        if number + 1 != drop_position_of_frame:
            position = Dataset()
            position.ImagePositionPatient = [float(v) for v in
                                             origin + direction[:, 2] * spacing[2] * k]
            group.PlanePositionSequence = [position]
        if per_frame_geometry:
            group.PlaneOrientationSequence = [orientation()]
            group.PixelMeasuresSequence = [measures()]
        groups.append(group)
    ds.PerFrameFunctionalGroupsSequence = groups
    ds.PixelData = b"".join(np.ascontiguousarray(stored[:, :, k].T).tobytes() for k in order)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# -- compressed transfer syntaxes: sealed, recorded, staged, decoded equal -------------------


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless,
                                    JPEGLosslessSV1], ids=lambda s: s.name.split(" ")[0])
def test_a_compressed_series_seals_stages_and_decodes_to_the_original(tmp_path, syntax):
    root = tmp_path / "ds"
    series, original = dicom_dataset(root, syntax)
    assert {str(pydicom.dcmread(p).file_meta.TransferSyntaxUID) for p in series.iterdir()} == {
        str(syntax)}
    recorded = [{"uid": str(syntax), "name": syntax.name}]

    dataset = seal(root)
    assert dataset.case("case-002")["inputs"][0]["transfer_syntaxes"] == recorded
    assert dataset.case("case-001")["inputs"][0]["transfer_syntaxes"] == [
        {"uid": str(ExplicitVRLittleEndian), "name": "Explicit VR Little Endian"}]
    staged = stage(dataset, ["case-002"], tmp_path / "input")
    listing = json.loads((staged / "cases.json").read_text())
    assert listing["cases"][0]["images"] == [{"name": "ct", "format": "dicom",
                                              "modality": "CT", "transfer_syntaxes": recorded}]
    back = read_volume(staged / "case-002" / "ct")
    assert np.array_equal(back.array, original.array) and back.array.dtype == np.int16
    assert np.array_equal(back.affine, original.affine)
    card = data_card(dataset)
    assert f"- DICOM transfer syntaxes: Explicit VR Little Endian, {syntax.name}\n" in card


@pytest.mark.parametrize("syntax, name", [
    (MPEG2MPML, "MPEG2 Main Profile / Main Level"),
    (UID("1.2.826.0.1.3680043.10.999.1"), "not a transfer syntax this platform knows")])
def test_a_syntax_no_decoder_reads_is_refused_at_seal_by_uid_and_name(tmp_path, syntax, name):
    root = tmp_path / "ds"
    series, _ = dicom_dataset(root)
    path = series / "slice-0007.dcm"
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([ds.PixelData])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, implicit_vr=False, little_endian=True)
    with pytest.raises(DatasetError) as refused:
        seal(root)
    assert str(refused.value) == (
        f"case 'case-002': inputs/case-002/ct cannot be read: ct: slice-0007.dcm uses transfer "
        f"syntax {syntax} ({name}), which no installed decoder reads; send it uncompressed or "
        "as RLE, JPEG-LS, JPEG 2000 or JPEG lossless")


def test_damaged_compressed_pixel_data_is_refused_naming_the_slice(tmp_path):
    root = tmp_path / "ds"
    series, _ = dicom_dataset(root, JPEGLSLossless)
    path = series / "slice-0003.dcm"
    ds = pydicom.dcmread(path)
    fragment = bytearray(ds.PixelData)
    ds.PixelData = bytes(fragment[: len(fragment) // 2])
    ds.save_as(path)
    with pytest.raises(DatasetError, match=r"case 'case-002': inputs/case-002/ct cannot be "
                                           r"read: ct: pixel data of slice-0003\.dcm cannot be "
                                           "decoded"):
        seal(root)


# -- multi-frame (enhanced) DICOM is a volume ------------------------------------------------


@pytest.mark.parametrize("per_frame_geometry", [False, True], ids=["shared", "per-frame"])
def test_an_enhanced_file_reads_as_the_same_volume_as_the_classic_series(tmp_path, ct,
                                                                         per_frame_geometry):
    volume = oblique(ct)
    write_dicom_series(volume, tmp_path / "classic", uid_seed="c")
    shuffled = list(np.random.default_rng(0).permutation(ct.array.shape[2]))
    enhanced_ct(volume, tmp_path / "enhanced" / "ct.dcm", order=shuffled,
                per_frame_geometry=per_frame_geometry)
    classic, enhanced = read_volume(tmp_path / "classic"), read_volume(tmp_path / "enhanced")
    assert enhanced.array.shape == ct.array.shape
    assert np.array_equal(enhanced.array, classic.array)
    assert np.array_equal(enhanced.array, ct.array)
    assert np.allclose(enhanced.affine, classic.affine, atol=1e-6)


def test_a_compressed_enhanced_file_seals_as_one_volume(tmp_path, ct):
    root = tmp_path / "ds"
    synth_dataset(root, cases=1, seed=5, size=SIZE, image_format="dicom")
    shutil.rmtree(root / "inputs/case-001/ct")
    path = enhanced_ct(ct, root / "inputs/case-001/ct/enhanced.dcm")
    compress_in_place(path, JPEGLSLossless)
    dataset = seal(root)
    image = dataset.case("case-001")["inputs"][0]
    assert image["shape"] == list(ct.array.shape)
    assert image["transfer_syntaxes"] == [{"uid": str(JPEGLSLossless), "name": JPEGLSLossless.name}]
    assert np.array_equal(read_volume(root / "inputs/case-001/ct").array, ct.array)


def test_an_enhanced_frame_without_a_position_is_named(tmp_path, ct):
    enhanced_ct(ct, tmp_path / "enhanced" / "ct.dcm", drop_position_of_frame=3)
    with pytest.raises(MedioError) as refused:
        read_volume(tmp_path / "enhanced")
    assert str(refused.value) == ("enhanced: frame 3 of ct.dcm has no PlanePositionSequence "
                                  "(0020,9113) (in its Per-frame or the Shared Functional "
                                  "Groups)")


# -- missing tags are named; the layout is one series per subfolder ---------------------------


@pytest.mark.parametrize("keyword, tag", [("ImagePositionPatient", "(0020,0032)"),
                                          ("ImageOrientationPatient", "(0020,0037)"),
                                          ("PixelSpacing", "(0028,0030)")])
def test_a_slice_missing_a_geometry_tag_is_named_at_seal(tmp_path, keyword, tag):
    root = tmp_path / "ds"
    series, _ = dicom_dataset(root)
    for index, path in enumerate(sorted(series.iterdir()), start=1):
        path.rename(series / f"IM{index:04d}")
    ds = pydicom.dcmread(series / "IM0003")
    delattr(ds, keyword)
    ds.save_as(series / "IM0003")
    with pytest.raises(DatasetError) as refused:
        seal(root)
    assert str(refused.value) == (f"case 'case-002': inputs/case-002/ct cannot be read: ct: "
                                  f"slice IM0003 has no {keyword} {tag}")


@pytest.mark.parametrize("suffix", [".dcm", ""])
def test_slices_lying_flat_in_the_case_folder_are_refused_with_the_layout(tmp_path, suffix):
    root = tmp_path / "ds"
    series, _ = dicom_dataset(root)
    for index, path in enumerate(sorted(series.iterdir()), start=1):
        path.rename(series.parent / f"IM{index:04d}{suffix}")
    series.rmdir()
    with pytest.raises(DatasetError) as refused:
        seal(root)
    assert str(refused.value) == (
        f"case 'case-002': 21 DICOM file(s) lie directly in inputs/case-002/ (IM0001{suffix}, "
        f"IM0002{suffix}, IM0003{suffix}, ...); {DICOM_LAYOUT}")
    assert DICOM_LAYOUT == ("a DICOM case is one series in a subfolder: "
                            "inputs/<case>/<series>/*.dcm")
