"""DICOM series through pydicom: one directory of slices in, one `Volume` out, and back.

Reading: files are grouped by SeriesInstanceUID; a directory holding several
series is refused (say which one). Slices are sorted by their position along
the slice normal (ImagePositionPatient projected on the cross product of the
ImageOrientationPatient cosines), never by file name or InstanceNumber.
Orientation, pixel spacing and matrix size must agree across slices, slice
distances must be equal within tolerance (a gap names the missing positions),
and RescaleSlope/RescaleIntercept are applied per slice.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from engine.medio.volume import (
    Geometry,
    ImageHeader,
    MedioError,
    Volume,
    affine_from_lps,
    lps_parts,
)

ORIENTATION_TOLERANCE = 1e-4
SPACING_RELATIVE_TOLERANCE = 0.01  # slice distances may differ by 1% (scanner rounding)


def _dicom_files(source: Path | list[Path]) -> list[Path]:
    if isinstance(source, list):
        return sorted(source)
    if source.is_file():
        return [source]
    return sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith("."))


def _read_headers(files: list[Path]) -> dict[str, list[tuple[Path, Dataset]]]:
    series: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    for path in files:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError):
            continue  # not DICOM: a DICOMDIR's neighbours, notes, thumbnails
        if "ImagePositionPatient" not in header or "ImageOrientationPatient" not in header:
            continue  # not an image slice (a report, a presentation state)
        series[str(header.get("SeriesInstanceUID", "unknown"))].append((path, header))
    return series


def _choose_series(series: dict, where: str, series_uid: str | None) -> list:
    if not series:
        raise MedioError(f"{where}: no DICOM image slices found")
    if series_uid is not None:
        if series_uid not in series:
            raise MedioError(f"{where}: series {series_uid} is not there")
        return series[series_uid]
    if len(series) > 1:
        listing = ", ".join(f"{uid} ({len(s)} slices)" for uid, s in sorted(series.items()))
        raise MedioError(f"{where} holds {len(series)} DICOM series ({listing}); "
                         "keep one series per case")
    return next(iter(series.values()))


def _check_consistent(slices: list[tuple[Path, Dataset]], where: str) -> None:
    first = slices[0][1]
    for path, header in slices[1:]:
        if not np.allclose(np.asarray(header.ImageOrientationPatient, float),
                           np.asarray(first.ImageOrientationPatient, float),
                           atol=ORIENTATION_TOLERANCE):
            raise MedioError(f"{where}: {path.name} has a different ImageOrientationPatient "
                             "from the rest of the series")
        if not np.allclose(np.asarray(header.PixelSpacing, float),
                           np.asarray(first.PixelSpacing, float), rtol=1e-5):
            raise MedioError(f"{where}: {path.name} has PixelSpacing {list(header.PixelSpacing)}"
                             f", the series {list(first.PixelSpacing)}")
        if (header.Rows, header.Columns) != (first.Rows, first.Columns):
            raise MedioError(f"{where}: {path.name} is {header.Rows}x{header.Columns}, "
                             f"the series {first.Rows}x{first.Columns}")


def _slice_geometry(slices: list[tuple[Path, Dataset]], where: str):
    """Sort slices along the normal; return them with the LPS direction, spacing and origin."""
    cosines = np.asarray(slices[0][1].ImageOrientationPatient, float)
    row, column = cosines[:3], cosines[3:]
    normal = np.cross(row, column)
    positions = {path: float(np.dot(np.asarray(h.ImagePositionPatient, float), normal))
                 for path, h in slices}
    ordered = sorted(slices, key=lambda item: positions[item[0]])
    distances = np.diff([positions[path] for path, _ in ordered])
    if len(ordered) > 1:
        if np.any(np.isclose(distances, 0, atol=1e-3)):
            raise MedioError(f"{where}: two slices share one position: the series holds "
                             "duplicates")
        step = float(np.median(distances))
        off = np.flatnonzero(~np.isclose(distances, step, rtol=SPACING_RELATIVE_TOLERANCE))
        if off.size:
            index = int(off[0])
            gap = distances[index]
            missing = round(gap / step) - 1
            if missing >= 1 and np.isclose(gap, step * (missing + 1), rtol=0.05):
                raise MedioError(
                    f"{where}: {missing} slice(s) missing between positions "
                    f"{positions[ordered[index][0]]:.2f} mm and "
                    f"{positions[ordered[index + 1][0]]:.2f} mm (slice distance {step:.3g} mm)")
            raise MedioError(f"{where}: inconsistent slice spacing ({gap:.3g} mm where the "
                             f"series uses {step:.3g} mm)")
    else:
        step = float(slices[0][1].get("SliceThickness", 1.0) or 1.0)
    pixel_spacing = np.asarray(ordered[0][1].PixelSpacing, float)  # (between rows, between cols)
    direction = np.column_stack([row, column, normal])
    spacing = (pixel_spacing[1], pixel_spacing[0], step)
    origin = np.asarray(ordered[0][1].ImagePositionPatient, float)
    return ordered, direction, spacing, origin


def read_dicom_header(source: Path | list[Path], *, series_uid: str | None = None) -> ImageHeader:
    where = source.name if isinstance(source, Path) else "DICOM series"
    slices = _choose_series(_read_headers(_dicom_files(source)), where, series_uid)
    _check_consistent(slices, where)
    ordered, direction, spacing, origin = _slice_geometry(slices, where)
    first = ordered[0][1]
    shape = (int(first.Columns), int(first.Rows), len(ordered))
    dtype = np.dtype(np.int16 if first.get("PixelRepresentation", 0) else np.uint16)
    return ImageHeader(Geometry(shape, affine_from_lps(direction, spacing, origin)), dtype,
                       "dicom", str(first.get("Modality", "unknown")))


def read_dicom_series(source: Path | list[Path], *, series_uid: str | None = None) -> Volume:
    where = source.name if isinstance(source, Path) else "DICOM series"
    slices = _choose_series(_read_headers(_dicom_files(source)), where, series_uid)
    _check_consistent(slices, where)
    ordered, direction, spacing, origin = _slice_geometry(slices, where)
    planes, integral = [], True
    for path, header in ordered:
        try:
            pixels = pydicom.dcmread(path).pixel_array.astype(np.float64)
        except Exception as exc:
            raise MedioError(f"{where}: pixel data of {path.name} cannot be read ({exc})") \
                from None
        slope = float(header.get("RescaleSlope", 1) or 1)
        intercept = float(header.get("RescaleIntercept", 0) or 0)
        integral &= slope.is_integer() and intercept.is_integer()
        planes.append((pixels * slope + intercept).T)  # (rows, cols) -> (i = col, j = row)
    array = np.stack(planes, axis=-1)
    if integral and array.min() >= np.iinfo(np.int16).min and array.max() <= np.iinfo(
            np.int16).max:
        array = array.astype(np.int16)
    else:
        array = array.astype(np.float32)
    first = ordered[0][1]
    return Volume(array, affine_from_lps(direction, spacing, origin), "dicom",
                  str(first.get("Modality", "unknown")),
                  {"series_uid": str(first.get("SeriesInstanceUID", ""))})


def write_dicom_series(volume: Volume, directory: Path, *, patient_id: str = "ANONYMOUS",
                       series_description: str = "", rescale_intercept: int = -1024,
                       uid_seed: str | None = None) -> list[Path]:
    """Write a CT-like series, one file per slice, stored unsigned with an intercept.

    With `uid_seed` every UID is derived from it, so the same seed writes the same bytes."""
    direction, spacing, origin = lps_parts(volume.affine)
    stored = np.rint(np.asarray(volume.array, float) - rescale_intercept)
    if stored.min() < 0 or stored.max() > np.iinfo(np.uint16).max:
        raise MedioError("values do not fit 16 bits with this rescale intercept")
    stored = stored.astype(np.uint16)
    directory.mkdir(parents=True, exist_ok=True)
    def uid(*parts) -> str:
        return generate_uid(entropy_srcs=[uid_seed, *map(str, parts)]) if uid_seed else \
            generate_uid()

    study_uid, series_uid, frame_uid = uid("study"), uid("series"), uid("frame")
    now = dt.datetime(2026, 1, 1, 12, 0, 0)  # fixed: synthetic data must be reproducible
    paths = []
    for k in range(stored.shape[2]):
        ds = _slice_dataset(patient_id, series_description, study_uid, series_uid, frame_uid,
                            now, uid("slice", k))
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(v) for v in origin + direction[:, 2] * spacing[2] * k]
        ds.ImageOrientationPatient = [float(v) for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = int(stored.shape[1]), int(stored.shape[0])
        ds.RescaleIntercept, ds.RescaleSlope = rescale_intercept, 1
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        path = directory / f"slice-{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _slice_dataset(patient_id, description, study_uid, series_uid, frame_uid, when,
                   sop_uid) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.PatientID, ds.PatientName = patient_id, patient_id
    ds.Modality, ds.SeriesDescription = "CT", description
    ds.StudyDate = ds.SeriesDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = when.strftime("%H%M%S")
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    return ds
