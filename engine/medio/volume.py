"""One image in memory, whatever file it came from: voxels plus where they are in the patient.

Conventions (the same for every format):
- `array` is indexed (i, j, k): i and j in-plane, k across slices;
- `affine` maps a voxel index (i, j, k, 1) to RAS+ millimetres, nibabel's convention:
  +x towards the patient's Right, +y Anterior, +z Superior. DICOM and MetaImage store
  LPS (+x Left, +y Posterior); their readers and writers convert.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import nibabel as nib
import numpy as np

from engine.errors import EpreuveError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
MIN_SPACING_MM, MAX_SPACING_MM = 1e-6, 1e6
MIN_AXIS_VOLUME = 1e-3  # |det| of the unit axes: below it two axes (nearly) coincide
_Read = TypeVar("_Read", bound=Callable)


class MedioError(EpreuveError, ValueError):
    """A file that cannot be read as a medical image; the message says which and why."""


@dataclass(frozen=True)
class Geometry:
    """Where the voxels are, without the voxels: enough to compare before reading data."""

    shape: tuple[int, ...]
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def origin(self) -> tuple[float, ...]:
        return tuple(float(v) for v in self.affine[:3, 3])

    @property
    def orientation(self) -> str:
        return "".join(nib.aff2axcodes(self.affine))

    def describe(self) -> dict:
        return {
            "shape": list(self.shape),
            "spacing": [round(s, 6) for s in self.spacing],
            "origin": [round(v, 4) for v in self.origin],
            "orientation": self.orientation,
        }


def checked_geometry(shape, affine, name: str) -> Geometry:
    """The grid a header declares, if it is one: three positive dimensions, a finite affine
    whose axes have a sane length and span the space. Every reader checks through here, so
    no later comparison or message meets a degenerate grid."""
    dims = tuple(int(n) for n in shape)
    if len(dims) != 3 or any(n <= 0 for n in dims):
        raise MedioError(f"{name}: dimensions {list(dims)} must be three positive numbers")
    matrix = np.asarray(affine, dtype=float)
    if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        raise MedioError(f"{name}: its affine (orientation, spacing, origin) holds "
                         "non-finite numbers")
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    if not ((spacing >= MIN_SPACING_MM) & (spacing <= MAX_SPACING_MM)).all():
        raise MedioError(f"{name}: voxel spacing {[float(f'{s:.4g}') for s in spacing]} mm "
                         f"lies outside [{MIN_SPACING_MM:g}, {MAX_SPACING_MM:g}]")
    axes = matrix[:3, :3] / spacing[None, :]
    if abs(np.linalg.det(axes)) < MIN_AXIS_VOLUME or None in nib.aff2axcodes(matrix):
        raise MedioError(f"{name}: its orientation is degenerate (two axes point the same "
                         "way or an axis is zero)")
    return Geometry(dims, matrix)


def reads_hostile_bytes(reader: _Read) -> _Read:
    """A reader of untrusted bytes fails with a MedioError: whatever the parsing libraries
    raise on a crafted file (ValueError, OverflowError, RecursionError, their own types) is
    the file's fault. An OSError is the host's (a failing disk, no descriptors left: opening
    the file itself is checked in files.py), and a MemoryError the worker's: both pass."""

    @functools.wraps(reader)
    def guarded(source, *args, **kwargs):
        try:
            return reader(source, *args, **kwargs)
        except (MedioError, MemoryError, OSError):
            raise
        except Exception as exc:
            name = getattr(source, "name", "the image")
            raise MedioError(f"{name} cannot be read ({type(exc).__name__}: "
                             f"{str(exc)[:200]})") from None

    return guarded  # type: ignore[return-value]


@dataclass(frozen=True)
class ImageHeader:
    """What a file declares before its data is read."""

    geometry: Geometry
    dtype: np.dtype
    format: str
    modality: str = "unknown"

    @property
    def declared_bytes(self) -> int:
        # Python integers: a hostile header's dimensions must not wrap around int64
        return math.prod(int(n) for n in self.geometry.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Volume:
    array: np.ndarray
    affine: np.ndarray
    format: str = "nifti"
    modality: str = "unknown"
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise MedioError(f"expected a 3-D volume, got {self.array.ndim} dimensions")
        if self.affine.shape != (4, 4):
            raise MedioError(f"expected a 4x4 affine, got shape {self.affine.shape}")

    @property
    def geometry(self) -> Geometry:
        return Geometry(tuple(int(n) for n in self.array.shape), np.asarray(self.affine, float))

    @property
    def spacing(self) -> tuple[float, ...]:
        return self.geometry.spacing

    def describe(self) -> dict:
        return {**self.geometry.describe(), "dtype": str(self.array.dtype),
                "format": self.format, "modality": self.modality}


def affine_from_lps(direction: np.ndarray, spacing, origin) -> np.ndarray:
    """RAS+ affine from an LPS direction matrix (columns = axes), spacing and origin."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(direction, float) * np.asarray(spacing, float)[None, :]
    affine[:3, 3] = np.asarray(origin, float)
    return LPS_TO_RAS @ affine


def lps_parts(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(direction, spacing, origin) in LPS from a RAS+ affine; refuses shear."""
    lps = LPS_TO_RAS @ np.asarray(affine, float)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing[None, :]
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise MedioError("the affine has shear: it cannot be written as DICOM or MetaImage")
    return direction, spacing, lps[:3, 3]
