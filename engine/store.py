"""Content-addressed blobs: the images' `docker save` tars (and later outputs), by sha256.

A blob is named by the sha256 of its bytes, computed while it is written, so a name can
never point at other bytes: a reader that wants to be sure re-hashes (`verify`). The
default store is a directory under the data dir; `BlobStore` is the interface an
S3-compatible store implements (put a stream, open a stream, has, size, delete, list).

    <root>/sha256/ab/abcdef...     a blob, read-only once written
    <root>/incoming/               blobs being written (renamed into place when whole)

Writes are atomic: a blob is visible only once all its bytes are on disk (written to
`incoming/`, fsynced, then renamed), so a crash mid-write leaves no blob, only a
temporary file that `remove_stale_incoming` clears.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Protocol

from engine.errors import EpreuveError, NotFound

CHUNK = 1 << 20
SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BlobTooLarge(EpreuveError):
    """More bytes than the caller allowed: nothing was stored."""

    http_status = 413


class BlobCorrupt(EpreuveError):
    """Stored bytes that no longer hash to their name, or an expected digest not met."""

    http_status = 422


class BlobMissing(NotFound):
    """No blob by that digest."""


@dataclass(frozen=True)
class StoredBlob:
    sha256: str
    size: int


class BlobStore(Protocol):
    def put(self, source: BinaryIO, *, expected_sha256: str | None = None,
            max_bytes: int | None = None) -> StoredBlob:
        """Store a stream; its sha256 is computed on the way (memory bounded by a chunk)."""

    def put_file(self, path: Path, *, expected_sha256: str | None = None) -> StoredBlob:
        """Store a file's bytes (moved into place where the backend can, else copied)."""

    def adopt(self, path: Path, sha256: str) -> StoredBlob:
        """Take a file this process wrote and hashed on the way (intake's copy of an
        archive): moved into place where the backend can, without reading it again; else
        its bytes are sent with that digest. The file is gone afterwards."""

    def has(self, sha256: str) -> bool: ...

    def size(self, sha256: str) -> int: ...

    def open(self, sha256: str) -> BinaryIO:
        """The blob's bytes as a binary stream (the caller closes it)."""

    def verify(self, sha256: str) -> bool:
        """Re-hash the stored bytes: True when they still match their name."""

    def delete(self, sha256: str) -> None: ...

    def digests(self) -> Iterator[str]: ...


def checked_digest(sha256: str) -> str:
    """A digest as a name: 64 lowercase hex characters, an optional `sha256:` prefix
    removed. Anything else (a path, `..`) is refused before it is joined to a path."""
    value = sha256.removeprefix("sha256:")
    if not SHA256.match(value):
        raise BlobMissing(f"{sha256[:80]!r} is not a sha256 digest")
    return value


class DirectoryStore:
    """The default store: a directory, blobs fanned out by their first two hex digits."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.blobs = self.root / "sha256"
        self.incoming = self.root / "incoming"

    def path(self, sha256: str) -> Path:
        digest = checked_digest(sha256)
        return self.blobs / digest[:2] / digest

    # -- writing ---------------------------------------------------------------------

    def put(self, source: BinaryIO, *, expected_sha256: str | None = None,
            max_bytes: int | None = None) -> StoredBlob:
        self.incoming.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix="blob-", dir=self.incoming)
        temporary = Path(name)
        try:
            digest, size = hashlib.sha256(), 0
            with os.fdopen(handle, "wb") as out:
                while chunk := source.read(CHUNK):
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise BlobTooLarge(f"more than {max_bytes} bytes: refused, nothing kept")
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            return self._place(temporary, digest.hexdigest(), size, expected_sha256)
        finally:
            temporary.unlink(missing_ok=True)

    def put_file(self, path: Path, *, expected_sha256: str | None = None) -> StoredBlob:
        with open(path, "rb") as source:
            return self.put(source, expected_sha256=expected_sha256)

    def adopt(self, path: Path, sha256: str) -> StoredBlob:
        """Move a file already hashed on the way in (an upload) into place, without reading
        it again. Only for files this process wrote itself and hashed; the name is trusted."""
        digest = checked_digest(sha256)
        size = path.stat().st_size
        try:
            return self._place(path, digest, size, None)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
        try:  # another file system: copied, and hashed again on the way
            return self.put_file(path, expected_sha256=digest)
        finally:
            path.unlink(missing_ok=True)

    def _place(self, temporary: Path, digest: str, size: int,
               expected: str | None) -> StoredBlob:
        if expected is not None and checked_digest(expected) != digest:
            raise BlobCorrupt(f"the bytes hash to sha256:{digest}, not {expected}: refused")
        final = self.path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # the same bytes again: one copy
            temporary.unlink(missing_ok=True)
        else:
            os.chmod(temporary, 0o444)
            os.replace(temporary, final)
        return StoredBlob(digest, size)

    # -- reading ---------------------------------------------------------------------

    def has(self, sha256: str) -> bool:
        try:
            return self.path(sha256).is_file()
        except BlobMissing:
            return False

    def size(self, sha256: str) -> int:
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            raise BlobMissing(f"no blob sha256:{checked_digest(sha256)} in the store") from None

    def open(self, sha256: str) -> BinaryIO:
        try:
            return open(self.path(sha256), "rb")
        except FileNotFoundError:
            raise BlobMissing(f"no blob sha256:{checked_digest(sha256)} in the store") from None

    def verify(self, sha256: str) -> bool:
        digest = hashlib.sha256()
        try:
            with self.open(sha256) as handle:
                while chunk := handle.read(CHUNK):
                    digest.update(chunk)
        except BlobMissing:
            return False
        return digest.hexdigest() == checked_digest(sha256)

    def delete(self, sha256: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(sha256).unlink()

    def digests(self) -> Iterator[str]:
        if not self.blobs.is_dir():
            return
        for fan in sorted(self.blobs.iterdir()):
            for blob in sorted(fan.iterdir()):
                if SHA256.match(blob.name):
                    yield blob.name

    def modified_at(self, sha256: str) -> datetime:
        """When the blob's file was last written (placed): its age for retention."""
        try:
            return datetime.fromtimestamp(self.path(sha256).stat().st_mtime, UTC)
        except FileNotFoundError:
            raise BlobMissing(f"no blob sha256:{checked_digest(sha256)} in the store") from None

    def stale_incoming(self, older_than_seconds: float = 3600.0) -> list[Path]:
        """Temporary files no writer has written to for that long (a crash mid-write): a
        writer that is alive writes all the time, so its file is never this old."""
        if not self.incoming.is_dir():
            return []
        cutoff = time.time() - older_than_seconds
        stale = []
        for entry in sorted(self.incoming.iterdir()):
            with contextlib.suppress(FileNotFoundError):
                if entry.is_file() and not entry.is_symlink() and entry.stat().st_mtime < cutoff:
                    stale.append(entry)
        return stale

    def remove_stale_incoming(self, older_than_seconds: float = 3600.0) -> int:
        """Remove temporary files left by writers that died (a crash mid-write)."""
        stale = self.stale_incoming(older_than_seconds)
        for entry in stale:
            entry.unlink(missing_ok=True)
        return len(stale)


def open_store(root: Path) -> DirectoryStore:
    """The store the settings name (today: a directory)."""
    return DirectoryStore(root)
