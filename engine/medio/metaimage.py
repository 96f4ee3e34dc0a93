"""MetaImage (.mha, .mhd + raw), as Grand Challenge algorithms write it.

Read by our own bounded parser, never by ITK: MetaIO follows whatever the header's
`ElementDataFile` names (an absolute path, `../`, a `LIST` of files, a `%d`
pattern), which would let a participant's header make the scorer read the ground
truth. Here a `.mha` must hold its data (`ElementDataFile = LOCAL`), and a `.mhd`
may name one plain file beside it, opened relative to that directory without
following links. SimpleITK only writes.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from engine.medio.files import inflate_at_most, open_regular, read_at_most, read_exactly
from engine.medio.volume import (
    ImageHeader,
    MedioError,
    Volume,
    affine_from_lps,
    checked_geometry,
    lps_parts,
    reads_hostile_bytes,
)

MAX_HEADER_BYTES = 64 << 10
MAX_HEADER_LINES = 256
_ELEMENT_TYPES = {
    "MET_CHAR": np.int8, "MET_UCHAR": np.uint8, "MET_SHORT": np.int16,
    "MET_USHORT": np.uint16, "MET_INT": np.int32, "MET_UINT": np.uint32,
    "MET_LONG": np.int32, "MET_ULONG": np.uint32, "MET_LONG_LONG": np.int64,
    "MET_ULONG_LONG": np.uint64, "MET_FLOAT": np.float32, "MET_DOUBLE": np.float64,
}
_SYNONYMS = {"Position": "Offset", "Origin": "Offset", "Rotation": "TransformMatrix",
             "Orientation": "TransformMatrix", "ElementByteOrderMSB": "BinaryDataByteOrderMSB"}
_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,200}")


@dataclass(frozen=True)
class _Parsed:
    header: ImageHeader
    data_file: str  # "LOCAL" or a plain name beside the header
    data_offset: int  # LOCAL: where the voxels start in the file itself
    compressed: bool
    compressed_size: int | None
    big_endian: bool
    header_size: int  # detached data: bytes to skip (-1: the data ends the file)


@reads_hostile_bytes
def read_metaimage_header(path: Path) -> ImageHeader:
    with open_regular(path) as fd:
        return _parse(fd, Path(path)).header


@reads_hostile_bytes
def read_metaimage(path: Path) -> Volume:
    path = Path(path)
    with open_regular(path) as fd:
        parsed = _parse(fd, path)
        if parsed.data_file == "LOCAL":
            raw = _voxel_bytes(fd, parsed, parsed.data_offset, path.name)
        else:
            raw = _detached_bytes(path, parsed)
    header = parsed.header
    dtype = header.dtype.newbyteorder(">" if parsed.big_endian else "<")
    # x varies fastest on disk: Fortran order is (i, j, k) without moving a byte; the copy
    # makes it writable and native-endian
    array = np.frombuffer(raw, dtype=dtype).reshape(header.geometry.shape, order="F")
    return Volume(array.astype(header.dtype), header.geometry.affine, "metaimage")


def write_metaimage(volume: Volume, path: Path) -> None:
    direction, spacing, origin = lps_parts(volume.affine)
    image = sitk.GetImageFromArray(np.asarray(volume.array).transpose(2, 1, 0))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)


# -- the header -----------------------------------------------------------------------------


def _parse(fd: int, path: Path) -> _Parsed:
    fields, data_offset = _header_fields(read_at_most(fd, MAX_HEADER_BYTES), path.name)
    name = path.name
    if fields.get("ObjectType", "Image") != "Image":
        raise MedioError(f"{name}: ObjectType is {fields['ObjectType']!r}, expected Image")
    if fields.get("NDims") != "3":
        raise MedioError(f"{name} has NDims = {fields.get('NDims')}; a 3-D volume is expected")
    if _flag(fields, "BinaryData", True, name) is not True:
        raise MedioError(f"{name}: ASCII voxel data (BinaryData = False) is not supported")
    if fields.get("ElementNumberOfChannels", "1") != "1":
        raise MedioError(f"{name} has vector pixels; a scalar image is expected")
    element = fields.get("ElementType")
    if element not in _ELEMENT_TYPES:
        raise MedioError(f"{name} has an unsupported ElementType {element!r}")
    shape = _ints(fields, "DimSize", name)
    if any(n <= 0 for n in shape):
        raise MedioError(f"{name}: DimSize {list(shape)} must be positive")
    spacing = _floats(fields, "ElementSpacing", name, fields.get("ElementSize", "1 1 1"), 3)
    if any(s <= 0 for s in spacing):
        raise MedioError(f"{name}: ElementSpacing {list(spacing)} must be positive")
    origin = _floats(fields, "Offset", name, "0 0 0", 3)
    matrix = np.asarray(_floats(fields, "TransformMatrix", name, "1 0 0 0 1 0 0 0 1", 9))
    direction = matrix.reshape(3, 3).T  # each row of TransformMatrix is one axis
    header = ImageHeader(checked_geometry(shape, affine_from_lps(direction, spacing, origin),
                                          name),
                         np.dtype(_ELEMENT_TYPES[element]), "metaimage")
    return _Parsed(header, _data_file(fields, path), data_offset,
                   _flag(fields, "CompressedData", False, name),
                   _optional_int(fields, "CompressedDataSize", name),
                   _flag(fields, "BinaryDataByteOrderMSB", False, name),
                   _optional_int(fields, "HeaderSize", name) or 0)


def _header_fields(head: bytes, name: str) -> tuple[dict[str, str], int]:
    """`Key = Value` lines up to ElementDataFile, which must come last; where data starts."""
    fields: dict[str, str] = {}
    offset = 0
    for _ in range(MAX_HEADER_LINES):
        end = head.find(b"\n", offset)
        if end < 0:
            break
        line = head[offset:end].rstrip(b"\r")
        offset = end + 1
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            raise MedioError(f"{name}: the header is not ASCII text") from None
        key, sep, value = (part.strip() for part in text.partition("="))
        if not sep or not _KEY.fullmatch(key):
            raise MedioError(f"{name}: header line {text[:60]!r} is not 'Key = Value'")
        key = _SYNONYMS.get(key, key)
        if key in fields:
            raise MedioError(f"{name}: header field {key} is given twice")
        fields[key] = value
        if key == "ElementDataFile":
            return fields, offset
    raise MedioError(f"{name} is not a MetaImage file: no ElementDataFile line in its first "
                     f"{MAX_HEADER_LINES} header lines")


def _data_file(fields: dict[str, str], path: Path) -> str:
    value = fields["ElementDataFile"]
    suffix = path.name.lower().rsplit(".", 1)[-1]
    if value == "LOCAL":
        return value
    if suffix == "mha":
        raise MedioError(f"{path.name}: ElementDataFile is {value[:80]!r}; a .mha file must "
                         "hold its own voxel data (ElementDataFile = LOCAL)")
    if not _PLAIN_NAME.fullmatch(value) or value in (".", "..") or value.upper() == "LIST" \
            or value == path.name:
        raise MedioError(f"{path.name}: ElementDataFile is {value[:80]!r}; it may only name "
                         "one file beside the header (no path, no list, no pattern), or be "
                         "LOCAL")
    return value


def _flag(fields: dict[str, str], key: str, default: bool, name: str) -> bool:
    value = fields.get(key)
    if value is None:
        return default
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise MedioError(f"{name}: {key} is {value[:40]!r}, expected True or False")


def _ints(fields: dict[str, str], key: str, name: str) -> tuple[int, ...]:
    parts = fields.get(key, "").split()
    if len(parts) != 3 or not all(re.fullmatch(r"\d{1,9}", p) for p in parts):
        raise MedioError(f"{name}: {key} must be three positive integers, got "
                         f"{fields.get(key, '')[:60]!r}")
    return tuple(int(p) for p in parts)


def _optional_int(fields: dict[str, str], key: str, name: str) -> int | None:
    value = fields.get(key)
    if value is None:
        return None
    if not re.fullmatch(r"-?\d{1,18}", value):
        raise MedioError(f"{name}: {key} is {value[:40]!r}, not an integer")
    return int(value)


def _floats(fields: dict[str, str], key: str, name: str, default: str,
            count: int) -> tuple[float, ...]:
    parts = fields.get(key, default).split()
    try:
        values = tuple(float(p) for p in parts if len(p) <= 40)
    except ValueError:
        values = ()
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise MedioError(f"{name}: {key} must be {count} finite numbers, got "
                         f"{fields.get(key, default)[:80]!r}")
    return values


# -- the voxels -----------------------------------------------------------------------------


def _voxel_bytes(fd: int, parsed: _Parsed, offset: int, name: str) -> bytes:
    expected = parsed.header.declared_bytes
    if parsed.compressed:
        raw = inflate_at_most(fd, expected, offset, what=name)
        if len(raw) != expected:
            raise MedioError(f"{name}: expected {expected} bytes of voxel data, the compressed "
                             f"stream holds {len(raw)}")
        return raw
    return read_exactly(fd, expected, offset, name)


def _detached_bytes(path: Path, parsed: _Parsed) -> bytes:
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        with open_regular(Path(parsed.data_file), dir_fd=directory) as fd:
            offset = parsed.header_size
            if offset < 0:  # MetaIO: -1 means the data ends the file
                offset = os.fstat(fd).st_size - parsed.header.declared_bytes
            if offset < 0 or (offset and parsed.compressed):
                raise MedioError(f"{path.name}: HeaderSize {parsed.header_size} does not fit "
                                 f"{parsed.data_file}")
            return _voxel_bytes(fd, parsed, offset, parsed.data_file)
    finally:
        os.close(directory)
