"""NIfTI-1/2 single files (.nii, .nii.gz). Headers are read without touching voxel data.

We read the bytes ourselves (one regular file, never a link) and hand nibabel only
bytes in memory: an `.hdr`/`.img` pair, or a header whose magic says its data lies
in another file (`ni1`, `ni2`), is refused, so nothing in a header can make us
open a second path. A `.nii.gz` is decompressed only as far as the header's
declared size, so a gzip bomb costs nothing.
"""

from __future__ import annotations

import io
import math
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.volumeutils import apply_read_scaling

from engine.medio.files import inflate_at_most, open_regular, read_at_most
from engine.medio.volume import (
    ImageHeader,
    MedioError,
    Volume,
    checked_geometry,
    reads_hostile_bytes,
)

NIFTI1_SIZE, NIFTI2_SIZE = 348, 540
MAX_VOX_OFFSET = 16 << 20  # header extensions beyond this are not an image's business
_SINGLE_FILE_MAGIC = {NIFTI1_SIZE: b"n+1\x00", NIFTI2_SIZE: b"n+2\x00"}


@reads_hostile_bytes
def read_nifti_header(path: Path) -> ImageHeader:
    path = Path(path)
    with open_regular(path) as fd:
        header, _ = _header(fd, path)
    return _describe(header, path.name)


@reads_hostile_bytes
def read_nifti(path: Path) -> Volume:
    path = Path(path)
    with open_regular(path) as fd:
        header, compressed = _header(fd, path)
        described = _describe(header, path.name)
        offset = int(header.get_data_offset())
        wanted = offset + described.declared_bytes
        raw = inflate_at_most(fd, wanted, what=path.name) if compressed else \
            read_at_most(fd, wanted)
    if len(raw) != wanted:
        raise MedioError(f"{path.name}: voxel data cannot be read (expected "
                         f"{described.declared_bytes} bytes, the file holds "
                         f"{max(0, len(raw) - offset)})")
    _check_extensions(raw, header, offset, path.name)
    dtype = header.get_data_dtype()
    array = np.frombuffer(raw, dtype=dtype, count=math.prod(header.get_data_shape()),
                          offset=offset).reshape(header.get_data_shape(), order="F")
    slope, inter = header.get_slope_inter()
    array = apply_read_scaling(array.astype(dtype.newbyteorder("=")), slope, inter)
    return Volume(np.asarray(array).reshape(described.geometry.shape),
                  described.geometry.affine, "nifti")


def write_nifti(volume: Volume, path: Path) -> None:
    image = nib.Nifti1Image(np.asarray(volume.array), volume.affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(volume.affine, code=1)  # scanner coordinates
    image.set_sform(volume.affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))


def _header(fd: int, path: Path) -> tuple[nib.Nifti1Header, bool]:
    """The parsed header (no extensions) and whether the file is gzip-compressed."""
    name = path.name
    compressed = path.name.lower().endswith(".gz")
    if compressed:
        if read_at_most(fd, 2) != b"\x1f\x8b":
            raise MedioError(f"{name} is not a readable NIfTI file (not gzip-compressed)")
        head = inflate_at_most(fd, NIFTI2_SIZE, what=f"{name} is not a readable NIfTI file")
    else:
        head = read_at_most(fd, NIFTI2_SIZE)
    size = _header_size(head, name)
    magic = head[344:348] if size == NIFTI1_SIZE else head[4:8]
    if magic != _SINGLE_FILE_MAGIC[size]:
        raise MedioError(f"{name} is not a readable NIfTI file: magic {magic!r}, expected "
                         f"{_SINGLE_FILE_MAGIC[size]!r} (a single-file .nii; .hdr/.img pairs "
                         "are refused)")
    klass = nib.Nifti1Header if size == NIFTI1_SIZE else nib.Nifti2Header
    try:
        header = klass.from_fileobj(io.BytesIO(head[:size]), check=True)
    except Exception as exc:  # nibabel raises many types for broken headers
        raise MedioError(f"{name} is not a readable NIfTI file ({exc})") from None
    offset = header.get_data_offset()
    if not math.isfinite(offset) or offset != int(offset):
        raise MedioError(f"{name}: vox_offset {offset} is not a whole number of bytes")
    if offset == 0:  # unset: right after the header and its 4 extension flag bytes
        header.set_data_offset(size + 4)
    elif not size + 4 <= offset <= MAX_VOX_OFFSET:
        raise MedioError(f"{name}: vox_offset {offset} lies outside [{size + 4}, "
                         f"{MAX_VOX_OFFSET}]")
    return header, compressed


def _check_extensions(raw: bytes, header: nib.Nifti1Header, offset: int, name: str) -> None:
    """Header extensions are never used, but a chain that claims more bytes than lie
    before the voxels (or a negative size) is a header that lies: refused, as any reader
    that follows the chain would misread the file."""
    size = header.sizeof_hdr
    if raw[size] == 0:  # extender flag: no extensions
        return
    position = size + 4
    while position + 8 <= offset:
        esize = struct.unpack(f"{header.endianness}i", raw[position:position + 4])[0]
        if esize == 0:
            return  # zero padding up to the voxels
        if esize < 8 or position + esize > offset:
            raise MedioError(f"{name}: a header extension at byte {position} claims {esize} "
                             f"bytes; the voxels start at byte {offset}")
        position += esize


def _header_size(head: bytes, name: str) -> int:
    if len(head) >= 4:
        for order in "<>":
            size = struct.unpack(f"{order}i", head[:4])[0]
            if size in _SINGLE_FILE_MAGIC and len(head) >= size:
                return size
    raise MedioError(f"{name} is not a readable NIfTI file (no NIfTI-1 or NIfTI-2 header)")


def _describe(header: nib.Nifti1Header, name: str) -> ImageHeader:
    shape = tuple(int(n) for n in header.get_data_shape())
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise MedioError(f"{name} has {len(shape)} dimensions {shape}; a 3-D volume is expected")
    dtype = header.get_data_dtype()
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise MedioError(f"{name} has data type {dtype}; a scalar image is expected")
    try:
        affine = np.asarray(header.get_best_affine(), float)
    except Exception as exc:
        raise MedioError(f"{name}: its orientation cannot be read ({exc})") from None
    try:
        header.get_slope_inter()
    except Exception as exc:  # nibabel refuses e.g. a finite slope with a NaN intercept
        raise MedioError(f"{name}: its intensity scaling cannot be read ({exc})") from None
    return ImageHeader(checked_geometry(shape, affine, name),
                       np.dtype(dtype.newbyteorder("=")), "nifti")
