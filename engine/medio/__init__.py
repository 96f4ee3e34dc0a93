"""Medical image I/O: NIfTI (nibabel), DICOM series (pydicom), MetaImage (our own parser).

`read_header` reads what a file declares without its voxels, so callers can check
geometry and size (decompression bombs) before paying for the data; `read_volume`
reads the image. Both pick the format from the path's name (never from its content):
a directory is a DICOM series. NIfTI and MetaImage readers open the one regular file
named, never a link, and nothing a header says makes them open another path (see
files.py).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from engine.medio.dicom import read_dicom_header, read_dicom_series, write_dicom_series
from engine.medio.geometry import GeometryTolerance, geometry_differences
from engine.medio.metaimage import read_metaimage, read_metaimage_header, write_metaimage
from engine.medio.nifti import read_nifti, read_nifti_header, write_nifti
from engine.medio.volume import Geometry, ImageHeader, MedioError, Volume

__all__ = [
    "Geometry", "GeometryTolerance", "ImageHeader", "MedioError", "Volume", "format_of",
    "geometry_differences", "is_image", "read_header", "read_volume", "write_dicom_series",
    "write_metaimage", "write_nifti", "write_volume",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
METAIMAGE_SUFFIXES = (".mha", ".mhd")


def format_of(path: Path) -> str:
    name = path.name.lower()
    if _is_real_directory(path) or name.endswith(".dcm"):
        return "dicom"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(METAIMAGE_SUFFIXES):
        return "metaimage"
    raise MedioError(f"{path.name}: unknown image format (expected .nii, .nii.gz, .mha, .mhd, "
                     "or a directory of DICOM slices)")


def _is_real_directory(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def is_image(path: Path) -> bool:
    try:
        format_of(path)
    except MedioError:
        return False
    return True


def read_header(path: Path) -> ImageHeader:
    path = Path(path)
    if not os.path.lexists(path):
        raise MedioError(f"{path.name} does not exist")
    kind = format_of(path)
    if kind == "nifti":
        return read_nifti_header(path)
    if kind == "metaimage":
        return read_metaimage_header(path)
    return read_dicom_header(path)


def read_volume(path: Path) -> Volume:
    path = Path(path)
    if not os.path.lexists(path):
        raise MedioError(f"{path.name} does not exist")
    kind = format_of(path)
    if kind == "nifti":
        return read_nifti(path)
    if kind == "metaimage":
        return read_metaimage(path)
    return read_dicom_series(path)


def write_volume(volume: Volume, path: Path) -> None:
    """By suffix: .nii/.nii.gz, .mha/.mhd; anything else is a directory of DICOM slices."""
    name = Path(path).name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        write_nifti(volume, path)
    elif name.endswith(METAIMAGE_SUFFIXES):
        write_metaimage(volume, path)
    else:
        write_dicom_series(volume, path)
