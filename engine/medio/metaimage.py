"""MetaImage (.mha, .mhd + raw) through SimpleITK, as Grand Challenge algorithms write it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from engine.medio.volume import (
    Geometry,
    ImageHeader,
    MedioError,
    Volume,
    affine_from_lps,
    lps_parts,
)

# SimpleITK pixel ids -> numpy dtypes (scalar types only: a mask or a CT is scalar)
_PIXEL_TYPES = {
    sitk.sitkUInt8: np.uint8, sitk.sitkInt8: np.int8, sitk.sitkUInt16: np.uint16,
    sitk.sitkInt16: np.int16, sitk.sitkUInt32: np.uint32, sitk.sitkInt32: np.int32,
    sitk.sitkUInt64: np.uint64, sitk.sitkInt64: np.int64, sitk.sitkFloat32: np.float32,
    sitk.sitkFloat64: np.float64,
}


def _reader(path: Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO("MetaImageIO")
    try:
        reader.ReadImageInformation()  # the header only
    except RuntimeError as exc:
        raise MedioError(f"{path.name} is not a readable MetaImage file ({_first_line(exc)})") \
            from None
    return reader


def read_metaimage_header(path: Path) -> ImageHeader:
    reader = _reader(path)
    if reader.GetDimension() != 3:
        raise MedioError(f"{path.name} has {reader.GetDimension()} dimensions; a 3-D volume is "
                         "expected")
    if reader.GetNumberOfComponents() != 1:
        raise MedioError(f"{path.name} has vector pixels; a scalar image is expected")
    dtype = _PIXEL_TYPES.get(reader.GetPixelID())
    if dtype is None:
        raise MedioError(f"{path.name} has an unsupported pixel type "
                         f"{sitk.GetPixelIDValueAsString(reader.GetPixelID())}")
    direction = np.asarray(reader.GetDirection(), float).reshape(3, 3)
    affine = affine_from_lps(direction, reader.GetSpacing(), reader.GetOrigin())
    return ImageHeader(Geometry(tuple(int(n) for n in reader.GetSize()), affine),
                       np.dtype(dtype), "metaimage")


def read_metaimage(path: Path) -> Volume:
    header = read_metaimage_header(path)
    try:
        image = sitk.ReadImage(str(path), imageIO="MetaImageIO")
    except RuntimeError as exc:
        raise MedioError(f"{path.name}: voxel data cannot be read ({_first_line(exc)})") from None
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # (z, y, x) -> (i, j, k)
    return Volume(np.ascontiguousarray(array), header.geometry.affine, "metaimage")


def write_metaimage(volume: Volume, path: Path) -> None:
    direction, spacing, origin = lps_parts(volume.affine)
    image = sitk.GetImageFromArray(np.asarray(volume.array).transpose(2, 1, 0))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
