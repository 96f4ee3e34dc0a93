"""NIfTI-1/2 (.nii, .nii.gz) through nibabel. Headers are read without touching voxel data."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from engine.medio.volume import Geometry, ImageHeader, MedioError, Volume


def _load(path: Path) -> nib.spatialimages.SpatialImage:
    try:
        image = nib.load(str(path))  # lazy: only the header is read here
    except Exception as exc:  # nibabel raises many types for broken files
        raise MedioError(f"{path.name} is not a readable NIfTI file ({exc})") from None
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise MedioError(f"{path.name} is not a NIfTI image")
    return image


def read_nifti_header(path: Path) -> ImageHeader:
    image = _load(path)
    shape = tuple(int(n) for n in image.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise MedioError(f"{path.name} has {len(shape)} dimensions {shape}; a 3-D volume is "
                         "expected")
    return ImageHeader(Geometry(shape, np.asarray(image.affine, float)),
                       np.dtype(image.get_data_dtype()), "nifti")


def read_nifti(path: Path) -> Volume:
    header = read_nifti_header(path)
    image = _load(path)
    try:
        array = np.asanyarray(image.dataobj)  # keeps the stored dtype, applies scaling if any
    except Exception as exc:
        raise MedioError(f"{path.name}: voxel data cannot be read ({exc})") from None
    return Volume(array.reshape(header.geometry.shape), header.geometry.affine, "nifti")


def write_nifti(volume: Volume, path: Path) -> None:
    image = nib.Nifti1Image(np.asarray(volume.array), volume.affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(volume.affine, code=1)  # scanner coordinates
    image.set_sform(volume.affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
