"""DICOM series through pydicom: one directory of slices in, one `Volume` out, and back.

Reading: files are grouped by SeriesInstanceUID; a directory holding several
series is refused (say which one). A series is frames: one per classic slice
file, or many in one multi-frame (enhanced) file, whose geometry comes from its
Per-frame and Shared Functional Groups. Frames are sorted by their position
along the slice normal (ImagePositionPatient projected on the cross product of
the ImageOrientationPatient cosines), never by file name or InstanceNumber.
Orientation, pixel spacing and matrix size must agree across frames, slice
distances must be equal within tolerance (a gap names the missing positions),
and RescaleSlope/RescaleIntercept are applied per frame. A transfer syntax no
installed decoder handles is refused by UID and name before any pixel is read;
a missing tag is named with its number.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from engine.medio.volume import (
    ImageHeader,
    MedioError,
    Volume,
    affine_from_lps,
    checked_geometry,
    lps_parts,
    reads_hostile_bytes,
)

ORIENTATION_TOLERANCE = 1e-4
SPACING_RELATIVE_TOLERANCE = 0.01  # slice distances may differ by 1% (scanner rounding)


@dataclass(frozen=True)
class Frame:
    """One 2-D plane of a series: a classic slice file, or one frame of a multi-frame file."""

    path: Path
    number: int  # 0-based frame index within its file
    position: tuple[float, ...]  # ImagePositionPatient, LPS mm
    orientation: tuple[float, ...]  # ImageOrientationPatient: row then column cosines
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    thickness: float | None
    slope: float
    intercept: float
    rows: int
    columns: int
    multi: bool = False  # from a multi-frame file

    @property
    def label(self) -> str:
        return f"frame {self.number + 1} of {self.path.name}" if self.multi else \
            f"slice {self.path.name}"


def tag_name(keyword: str) -> str:
    """'ImagePositionPatient (0020,0032)': how a tag is named in an error."""
    tag = tag_for_keyword(keyword)
    return keyword if tag is None else f"{keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X})"


def transfer_syntax_name(syntax: UID) -> str:
    name = syntax.name
    return name if name != str(syntax) else "not a transfer syntax this platform knows"


def check_decodable(syntax: UID | None, what: str) -> UID:
    """The syntax, or a MedioError naming it when no installed decoder reads its pixel data."""
    if not syntax:
        raise MedioError(f"{what} has no {tag_name('TransferSyntaxUID')} in its file meta")
    syntax = UID(str(syntax))
    try:
        available = get_decoder(syntax).is_available
    except (NotImplementedError, ValueError):
        available = False
    if not available:
        raise MedioError(
            f"{what} uses transfer syntax {syntax} ({transfer_syntax_name(syntax)}), which "
            "no installed decoder reads; send it uncompressed or as RLE, JPEG-LS, JPEG 2000 "
            "or JPEG lossless")
    return syntax


def _dicom_files(source: Path | list[Path]) -> list[Path]:
    if isinstance(source, list):
        return sorted(source)
    if source.is_file():
        return [source]
    return sorted(p for p in source.rglob("*") if p.is_file() and not p.is_symlink()
                  and not p.name.startswith("."))


def _read_headers(files: list[Path], where: str) -> dict[str, list[tuple[Path, Dataset]]]:
    series: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    for path in files:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, IsADirectoryError):
            continue  # not DICOM: a DICOMDIR's neighbours, notes, thumbnails
        except Exception as exc:  # a DICOM preamble, then damage: pydicom raises many types
            raise MedioError(f"{where}: {path.name} is a damaged DICOM file ({exc})") from None
        if "Rows" not in header:
            continue  # not an image (a report, a presentation state, a DICOMDIR)
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
        listing = ", ".join(f"{uid} ({len(s)} files)" for uid, s in sorted(series.items()))
        raise MedioError(f"{where} holds {len(series)} DICOM series ({listing}); "
                         "keep one series per folder")
    return next(iter(series.values()))


def _numbers(item: Dataset, keyword: str, count: int, what: str) -> tuple[float, ...]:
    if keyword not in item or item[keyword].value in (None, ""):
        raise MedioError(f"{what} has no {tag_name(keyword)}")
    try:
        value = item[keyword].value
        values = tuple(float(v) for v in (value if isinstance(value, list | tuple | MultiValue)
                                          else [value]))
    except (TypeError, ValueError):
        raise MedioError(f"{what}: {tag_name(keyword)} is not numeric") from None
    if len(values) != count or not np.all(np.isfinite(values)):
        raise MedioError(f"{what}: {tag_name(keyword)} holds {len(values)} value(s), "
                         f"{count} finite numbers expected")
    return values


def _optional_number(item: Dataset | None, keyword: str, default: float | None):
    if item is None or keyword not in item or item[keyword].value in (None, ""):
        return default
    try:
        value = float(item[keyword].value)
    except (TypeError, ValueError):
        return default
    return value if np.isfinite(value) else default


def _matrix(header: Dataset, what: str) -> tuple[int, int]:
    rows, columns = (int(_numbers(header, k, 1, what)[0]) for k in ("Rows", "Columns"))
    if rows < 1 or columns < 1:
        raise MedioError(f"{what} is {rows}x{columns} pixels")
    samples = int(header.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise MedioError(f"{what} has {samples} samples per pixel (colour); a greyscale "
                         "volume is expected")
    return rows, columns


def _spacing(item: Dataset, what: str) -> tuple[float, float]:
    spacing = _numbers(item, "PixelSpacing", 2, what)
    if min(spacing) <= 0:
        raise MedioError(f"{what}: {tag_name('PixelSpacing')} {list(spacing)} is not positive")
    return spacing[0], spacing[1]


def _classic_frame(path: Path, header: Dataset) -> Frame:
    what = f"slice {path.name}"
    rows, columns = _matrix(header, what)
    return Frame(path, 0, _numbers(header, "ImagePositionPatient", 3, what),
                 _numbers(header, "ImageOrientationPatient", 6, what), _spacing(header, what),
                 _optional_number(header, "SliceThickness", None),
                 _optional_number(header, "RescaleSlope", 1.0) or 1.0,
                 _optional_number(header, "RescaleIntercept", 0.0), rows, columns)


def _group_item(group: Dataset | None, sequence: str) -> Dataset | None:
    if group is None or sequence not in group or not group[sequence].value:
        return None
    return group[sequence].value[0]


def _functional(per_frame: Dataset, shared: Dataset | None, sequence: str) -> Dataset | None:
    """A functional group macro: the frame's own, else the shared one."""
    return _group_item(per_frame, sequence) or _group_item(shared, sequence)


def _multiframe_frames(path: Path, header: Dataset) -> list[Frame]:
    what = f"multi-frame file {path.name}"
    rows, columns = _matrix(header, what)
    count = int(_numbers(header, "NumberOfFrames", 1, what)[0])
    groups = header.get("PerFrameFunctionalGroupsSequence")
    if not groups:
        raise MedioError(f"{what} has no {tag_name('PerFrameFunctionalGroupsSequence')}: its "
                         "frames cannot be placed in space")
    if len(groups) != count:
        raise MedioError(f"{what}: {tag_name('PerFrameFunctionalGroupsSequence')} has "
                         f"{len(groups)} items for {count} frames")
    shared = _group_item(header, "SharedFunctionalGroupsSequence") if \
        "SharedFunctionalGroupsSequence" in header else None
    frames = []
    for number, group in enumerate(groups):
        where = f"frame {number + 1} of {path.name}"
        located = {}
        for sequence, keyword in (("PlanePositionSequence", "ImagePositionPatient"),
                                  ("PlaneOrientationSequence", "ImageOrientationPatient"),
                                  ("PixelMeasuresSequence", "PixelSpacing")):
            item = _functional(group, shared, sequence)
            if item is None:
                raise MedioError(f"{where} has no {tag_name(sequence)} (in its Per-frame or "
                                 "the Shared Functional Groups)")
            located[keyword] = item
        measures = located["PixelSpacing"]
        transform = _functional(group, shared, "PixelValueTransformationSequence") or header
        frames.append(Frame(
            path, number, _numbers(located["ImagePositionPatient"], "ImagePositionPatient", 3,
                                   where),
            _numbers(located["ImageOrientationPatient"], "ImageOrientationPatient", 6, where),
            _spacing(measures, where), _optional_number(measures, "SliceThickness", None),
            _optional_number(transform, "RescaleSlope", 1.0) or 1.0,
            _optional_number(transform, "RescaleIntercept", 0.0), rows, columns, multi=True))
    return frames


def _frames(slices: list[tuple[Path, Dataset]], where: str) -> list[Frame]:
    frames = []
    for path, header in slices:
        check_decodable(header.file_meta.get("TransferSyntaxUID"), f"{where}: {path.name}")
        multi = "PerFrameFunctionalGroupsSequence" in header or int(
            _optional_number(header, "NumberOfFrames", 1) or 1) > 1
        try:
            frames += _multiframe_frames(path, header) if multi else [_classic_frame(path,
                                                                                     header)]
        except MedioError as exc:
            raise MedioError(f"{where}: {exc}") from None
    return frames


def _check_consistent(frames: list[Frame], where: str) -> None:
    first = frames[0]
    for frame in frames[1:]:
        if not np.allclose(frame.orientation, first.orientation, atol=ORIENTATION_TOLERANCE):
            raise MedioError(f"{where}: {frame.label} has a different ImageOrientationPatient "
                             "from the rest of the series")
        if not np.allclose(frame.pixel_spacing, first.pixel_spacing, rtol=1e-5):
            raise MedioError(f"{where}: {frame.label} has PixelSpacing "
                             f"{list(frame.pixel_spacing)}, the series "
                             f"{list(first.pixel_spacing)}")
        if (frame.rows, frame.columns) != (first.rows, first.columns):
            raise MedioError(f"{where}: {frame.label} is {frame.rows}x{frame.columns}, "
                             f"the series {first.rows}x{first.columns}")


def _slice_geometry(frames: list[Frame], where: str):
    """Sort frames along the normal; return them with the LPS direction, spacing and origin."""
    cosines = np.asarray(frames[0].orientation, float)
    row, column = cosines[:3], cosines[3:]
    normal = np.cross(row, column)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise MedioError(f"{where}: {tag_name('ImageOrientationPatient')} "
                         f"{list(cosines)} is not two orthogonal unit vectors")
    ordered = sorted(frames, key=lambda f: float(np.dot(f.position, normal)))
    positions = [float(np.dot(f.position, normal)) for f in ordered]
    distances = np.diff(positions)
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
                    f"{positions[index]:.2f} mm and {positions[index + 1]:.2f} mm "
                    f"(slice distance {step:.3g} mm)")
            raise MedioError(f"{where}: inconsistent slice spacing ({gap:.3g} mm where the "
                             f"series uses {step:.3g} mm)")
    else:
        step = ordered[0].thickness if ordered[0].thickness and ordered[0].thickness > 0 \
            else 1.0
    direction = np.column_stack([row, column, normal])
    spacing = (ordered[0].pixel_spacing[1], ordered[0].pixel_spacing[0], step)
    return ordered, direction, spacing, np.asarray(ordered[0].position, float)


def _series(source: Path | list[Path], series_uid: str | None):
    where = source.name if isinstance(source, Path) else "DICOM series"
    slices = _choose_series(_read_headers(_dicom_files(source), where), where, series_uid)
    frames = _frames(slices, where)
    _check_consistent(frames, where)
    return where, slices, _slice_geometry(frames, where)


@reads_hostile_bytes
def read_dicom_header(source: Path | list[Path], *, series_uid: str | None = None) -> ImageHeader:
    where, slices, (ordered, direction, spacing, origin) = _series(source, series_uid)
    first = slices[0][1]
    shape = (ordered[0].columns, ordered[0].rows, len(ordered))
    dtype = np.dtype(np.int16 if first.get("PixelRepresentation", 0) else np.uint16)
    return ImageHeader(checked_geometry(shape, affine_from_lps(direction, spacing, origin),
                                        where), dtype, "dicom",
                       str(first.get("Modality", "unknown")))


def _decode(path: Path, frames: int, rows: int, columns: int, where: str) -> np.ndarray:
    """Every frame of one file as (frames, rows, columns), or a MedioError naming the file."""
    try:
        dataset = pydicom.dcmread(path)
        pixels = np.asarray(dataset.pixel_array)
    except Exception as exc:  # decoders raise many types for damaged data
        raise MedioError(f"{where}: pixel data of {path.name} cannot be decoded ({exc})") \
            from None
    pixels = pixels.reshape((1, *pixels.shape)) if pixels.ndim == 2 else pixels
    if pixels.shape != (frames, rows, columns):
        raise MedioError(f"{where}: pixel data of {path.name} decodes to "
                         f"{list(pixels.shape)}, the header declares {[frames, rows, columns]}")
    return pixels


@reads_hostile_bytes
def read_dicom_series(source: Path | list[Path], *, series_uid: str | None = None) -> Volume:
    where, slices, (ordered, direction, spacing, origin) = _series(source, series_uid)
    frame_counts: dict[Path, int] = defaultdict(int)
    for frame in ordered:
        frame_counts[frame.path] += 1
    decoded = {path: _decode(path, count, ordered[0].rows, ordered[0].columns, where)
               for path, count in frame_counts.items()}
    planes, integral = [], True
    for frame in ordered:
        pixels = decoded[frame.path][frame.number].astype(np.float64)
        integral &= frame.slope.is_integer() and frame.intercept.is_integer()
        planes.append((pixels * frame.slope + frame.intercept).T)  # (rows, cols) -> (i, j)
    array = np.stack(planes, axis=-1)
    if not (np.abs(array) <= np.finfo(np.float32).max).all():  # NaN fails this too
        raise MedioError(f"{where}: RescaleSlope and RescaleIntercept give voxel values "
                         "beyond any finite 32-bit number")
    if integral and array.min() >= np.iinfo(np.int16).min and array.max() <= np.iinfo(
            np.int16).max:
        array = array.astype(np.int16)
    else:
        array = array.astype(np.float32)
    first = slices[0][1]
    syntaxes = sorted({str(header.file_meta.TransferSyntaxUID) for _, header in slices})
    geometry = checked_geometry(array.shape, affine_from_lps(direction, spacing, origin), where)
    return Volume(array, geometry.affine, "dicom",
                  str(first.get("Modality", "unknown")),
                  {"series_uid": str(first.get("SeriesInstanceUID", "")),
                   "transfer_syntaxes": syntaxes})


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
