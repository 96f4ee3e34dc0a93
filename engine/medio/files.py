"""Opening an image file without following anything: the only way the readers touch a path.

A reader gets the bytes of the one regular file it was asked for. A symbolic link,
a directory, a named pipe or a device at that name is refused before anything is
read (a FIFO is opened non-blocking, so that it cannot stall the reader), and
nothing a file says can make a reader open another path: detached data (MetaImage
`ElementDataFile`) is resolved by the reader itself, as a plain name in the same
directory, opened relative to that directory's descriptor.
"""

from __future__ import annotations

import contextlib
import os
import stat
import zlib
from collections.abc import Iterator
from pathlib import Path

from engine.medio.volume import MedioError

READ_CHUNK = 1 << 20
_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
               | getattr(os, "O_CLOEXEC", 0))


@contextlib.contextmanager
def open_regular(path: Path, *, dir_fd: int | None = None) -> Iterator[int]:
    """A descriptor on `path` if it is a regular file; links, FIFOs, devices are refused."""
    name = Path(path).name
    try:
        fd = os.open(path, _OPEN_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        raise MedioError(f"{name} does not exist") from None
    except OSError as exc:
        if exc.errno in (getattr(os, "ELOOP", -1), getattr(os, "EMLINK", -1)):
            raise MedioError(f"{name} is a symbolic link; links are never followed") from None
        raise MedioError(f"{name} cannot be opened ({exc.strerror})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise MedioError(f"{name} is not a regular file ({_kind(mode)}); links, "
                             "directories and devices are refused")
        os.set_blocking(fd, True)
        yield fd
    finally:
        os.close(fd)


def read_at_most(fd: int, limit: int, offset: int = 0) -> bytes:
    """Up to `limit` bytes from `offset` (fewer at the end of the file)."""
    parts, wanted = [], limit
    while wanted > 0:
        chunk = os.pread(fd, min(wanted, READ_CHUNK), offset)
        if not chunk:
            break
        parts.append(chunk)
        offset += len(chunk)
        wanted -= len(chunk)
    return b"".join(parts)


def read_exactly(fd: int, count: int, offset: int, what: str) -> bytes:
    data = read_at_most(fd, count, offset)
    if len(data) != count:
        raise MedioError(f"{what}: expected {count} bytes of voxel data, the file holds "
                         f"{len(data)}")
    return data


def inflate_at_most(fd: int, limit: int, offset: int = 0, *, what: str) -> bytes:
    """Up to `limit` decompressed bytes of a zlib or gzip stream (several gzip members
    too); never decompresses more than asked, so a small bomb costs nothing."""
    out, produced = [], 0
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # zlib or gzip, detected
    pending = b""
    while produced < limit:
        if not pending:
            pending = os.pread(fd, READ_CHUNK, offset)
            offset += len(pending)
            if not pending:
                break
        try:
            chunk = inflater.decompress(pending, limit - produced)
        except zlib.error as exc:
            raise MedioError(f"{what}: compressed data is corrupt ({exc})") from None
        out.append(chunk)
        produced += len(chunk)
        pending = inflater.unconsumed_tail
        if inflater.eof:
            pending = inflater.unused_data + pending
            if not pending and produced < limit:
                pending = os.pread(fd, READ_CHUNK, offset)
                offset += len(pending)
            if not pending or not pending.startswith(b"\x1f\x8b"):
                break  # the end of the stream (trailing bytes that are no member: ignored)
            inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)
    return b"".join(out)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a special file"
