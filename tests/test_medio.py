"""Medical image I/O on real files: NIfTI, DICOM series, MetaImage."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from engine.medio import (
    Geometry,
    MedioError,
    Volume,
    geometry_differences,
    read_header,
    read_volume,
    write_dicom_series,
    write_metaimage,
    write_nifti,
)
from engine.medio.volume import affine_from_lps
from engine.synthetic import synth_case


@pytest.fixture(scope="module")
def ct() -> Volume:
    return synth_case("case-001", np.random.default_rng(7), size=32).image


def oblique_affine() -> np.ndarray:
    angle = np.deg2rad(12)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                         [0, 0, 1]])
    return affine_from_lps(rotation, (0.7, 0.7, 3.0), (-120.5, -80.25, 33.0))


def test_nifti_round_trip_keeps_voxels_and_geometry(tmp_path, ct):
    write_nifti(ct, tmp_path / "ct.nii.gz")
    back = read_volume(tmp_path / "ct.nii.gz")
    assert np.array_equal(back.array, ct.array) and back.array.dtype == np.int16
    assert geometry_differences(back.geometry, ct.geometry) == []
    assert back.geometry.orientation == "LPS"


def test_dicom_series_round_trip_with_oblique_orientation(tmp_path, ct):
    volume = Volume(ct.array, oblique_affine(), modality="CT")
    paths = write_dicom_series(volume, tmp_path / "series", uid_seed="t")
    assert len(paths) == ct.array.shape[2]
    back = read_volume(tmp_path / "series")
    assert back.format == "dicom" and back.modality == "CT"
    assert np.array_equal(back.array, ct.array)
    assert np.allclose(back.affine, volume.affine, atol=1e-4)


def test_dicom_slices_are_sorted_by_position_not_by_name(tmp_path, ct):
    write_dicom_series(ct, tmp_path / "series", uid_seed="t")
    files = sorted((tmp_path / "series").iterdir())
    for index, path in enumerate(reversed(files)):  # names now run against the positions
        path.rename(path.with_name(f"renamed-{index:04d}.dcm"))
    assert np.array_equal(read_volume(tmp_path / "series").array, ct.array)


def test_dicom_rescale_slope_and_intercept_are_applied(tmp_path, ct):
    write_dicom_series(ct, tmp_path / "series", uid_seed="t", rescale_intercept=-2048)
    first = pydicom.dcmread(sorted((tmp_path / "series").iterdir())[0])
    assert first.RescaleIntercept == -2048
    assert int(first.pixel_array.T[0, 0]) == int(ct.array[0, 0, 0]) + 2048  # stored value
    assert np.array_equal(read_volume(tmp_path / "series").array, ct.array)


def test_dicom_series_with_a_missing_slice_is_refused(tmp_path, ct):
    write_dicom_series(ct, tmp_path / "series", uid_seed="t")
    (tmp_path / "series" / "slice-0005.dcm").unlink()
    with pytest.raises(MedioError, match=r"1 slice\(s\) missing between positions"):
        read_volume(tmp_path / "series")


def test_dicom_series_with_inconsistent_spacing_is_refused(tmp_path, ct):
    write_dicom_series(ct, tmp_path / "series", uid_seed="t")
    path = tmp_path / "series" / "slice-0004.dcm"
    ds = pydicom.dcmread(path)
    ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1],
                               float(ds.ImagePositionPatient[2]) + 0.9]
    ds.save_as(path)
    with pytest.raises(MedioError, match="inconsistent slice spacing"):
        read_volume(tmp_path / "series")


def test_two_series_in_one_directory_are_refused(tmp_path, ct):
    write_dicom_series(ct, tmp_path / "mixed" / "a", uid_seed="a")
    write_dicom_series(ct, tmp_path / "mixed" / "b", uid_seed="b")
    with pytest.raises(MedioError, match="holds 2 DICOM series"):
        read_volume(tmp_path / "mixed")


def test_pydicom_sample_ct_slice(tmp_path):
    sample = tmp_path / "ct"
    sample.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), sample / "CT_small.dcm")
    volume = read_volume(sample)
    reference = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert volume.array.shape == (reference.Columns, reference.Rows, 1)
    expected = reference.pixel_array.T * float(reference.RescaleSlope) + float(
        reference.RescaleIntercept)
    assert np.array_equal(volume.array[:, :, 0], expected)
    assert volume.modality == "CT"
    assert np.allclose(volume.spacing[:2], [float(v) for v in reference.PixelSpacing][::-1])


def test_metaimage_round_trip(tmp_path, ct):
    volume = Volume(ct.array, oblique_affine())
    write_metaimage(volume, tmp_path / "ct.mha")
    back = read_volume(tmp_path / "ct.mha")
    assert np.array_equal(back.array, ct.array)
    assert np.allclose(back.affine, volume.affine, atol=1e-5)


def test_nifti_and_metaimage_agree_on_world_coordinates(tmp_path, ct):
    volume = Volume(ct.array, oblique_affine())
    write_nifti(volume, tmp_path / "a.nii.gz")
    write_metaimage(volume, tmp_path / "a.mha")
    assert np.allclose(read_header(tmp_path / "a.nii.gz").geometry.affine,
                       read_header(tmp_path / "a.mha").geometry.affine, atol=1e-5)


def test_geometry_differences_are_named():
    reference = Geometry((10, 10, 5), affine_from_lps(np.eye(3), (1, 1, 2), (0, 0, 0)))
    assert geometry_differences(reference, reference) == []
    shifted = Geometry((10, 10, 5), affine_from_lps(np.eye(3), (1, 1, 2), (0, 0, 1)))
    assert geometry_differences(shifted, reference) == ["origin is (0, 0, 1) mm, expected "
                                                        "(0, 0, 0) mm"]
    assert "shape" in geometry_differences(Geometry((10, 10, 6), reference.affine),
                                           reference)[0]
    flipped = Geometry((10, 10, 5), np.diag([1.0, 1.0, 2.0, 1.0]))
    assert any("orientation" in p for p in geometry_differences(flipped, reference))


def test_unknown_and_broken_files_are_refused_clearly(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(MedioError, match="unknown image format"):
        read_volume(tmp_path / "notes.txt")
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(MedioError, match="not a readable NIfTI"):
        read_header(tmp_path / "broken.nii.gz")


def test_four_d_nifti_is_refused(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.uint8), np.eye(4)), tmp_path / "4d.nii")
    with pytest.raises(MedioError, match="4 dimensions"):
        read_header(tmp_path / "4d.nii")
