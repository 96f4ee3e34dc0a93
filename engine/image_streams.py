"""Bounded readers for image intake: nothing a participant sends is trusted with memory.

- `decompressed` reads plain, gzip, bzip2 or xz data (what `docker load` accepts)
  chunk by chunk with a bound on the output of every call, and counts what
  comes out against a `Budget`: a decompression bomb is stopped at the limit,
  never inflated into memory or onto the daemon's disk.
- `BoundedTarInfo` refuses long-name and pax headers larger than a few KiB
  before Python's tarfile reads them into memory.
- `EntryBudget` bounds the entries of all the layers together (inodes on disk).
- `scan_layer` walks one layer as a stream: its decompressed size, its diff id
  (sha256 of the decompressed tar), and what it does to /etc/passwd and
  /etc/group (contents, whiteouts, links), so that USER is resolved from the
  files the container would see.
"""

from __future__ import annotations

import bz2
import hashlib
import lzma
import posixpath
import tarfile
import zlib
from dataclasses import dataclass, field

from runners.image_user import MAX_ACCOUNT_FILE  # the runner reads them to the same bound

CHUNK = 1 << 20
MAX_HEADER_BYTES = 64 << 10  # a pax or GNU long-name header; real ones are a few hundred bytes
ACCOUNT_FILES = ("etc/passwd", "etc/group")
DELETED, UNREADABLE = "deleted", "unreadable"  # states of an account file besides its bytes
MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
         b"\x28\xb5\x2f\xfd": "zstd"}


class StreamRefused(ValueError):
    """The stream breaks a bound or cannot be read; the message says which."""


class BoundExceeded(StreamRefused):
    """A size or count bound was reached: the whole image is refused."""


def is_sparse(member: tarfile.TarInfo) -> bool:
    """A sparse entry (GNU `S`, or PAX `GNU.sparse.*`) is written out whole when extracted:
    its few bytes in the stream stand for as many as its header claims (terabytes), so
    no size counted on the stream would bound it. `docker save` never writes one."""
    return member.issparse() or any(key.startswith("GNU.sparse.")
                                    for key in member.pax_headers)


class Budget:
    """Decompressed bytes allowed for one image, shared by all its layers."""

    def __init__(self, limit: int, what: str):
        self.limit, self.what, self.used = limit, what, 0

    def spend(self, count: int) -> None:
        self.used += count
        if self.used > self.limit:
            raise BoundExceeded(f"{self.what} decompress to more than the {_size(self.limit)} "
                                f"allowed (measured at least {self.used} bytes before "
                                "stopping): slim the image")


class EntryBudget:
    """Entries allowed for one image, all its layers together: each becomes a file, a
    directory or a link on the daemon's disk (an inode), whatever its size, so a bound
    per layer would let many layers exhaust the disk's inodes."""

    def __init__(self, limit: int, what: str):
        self.limit, self.what, self.used = limit, what, 0

    def spend(self) -> None:
        self.used += 1
        if self.used > self.limit:
            raise BoundExceeded(f"{self.what} hold more than {self.limit} entries (files, "
                                "directories, links): slim the image")


def _size(count: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if count >= 1 << shift and count % (1 << shift) == 0:
            return f"{count >> shift} {unit}"
    return f"{count} bytes"


class _Peeked:
    """A reader whose first bytes were looked at, then handed back."""

    def __init__(self, raw, head: bytes):
        self.raw, self.head = raw, head

    def read(self, size: int = -1) -> bytes:
        if self.head:
            data, self.head = (self.head, b"") if size < 0 or size >= len(self.head) else (
                self.head[:size], self.head[size:])
            return data
        return self.raw.read(size)


def peek(raw, count: int = 512) -> tuple[bytes, _Peeked]:
    head = b""
    while len(head) < count:
        data = raw.read(count - len(head))
        if not data:
            break
        head += data
    return head, _Peeked(raw, head)


def compression_of(head: bytes) -> str:
    for magic, kind in MAGIC.items():
        if head.startswith(magic):
            return kind
    return "plain"


class _Zlib:
    """zlib's decompressobj with the interface of bz2's and lzma's decompressors."""

    def __init__(self):
        self.inner = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self.tail = b""

    def decompress(self, data: bytes, max_length: int) -> bytes:
        out = self.inner.decompress(self.tail + data, max_length)
        self.tail = self.inner.unconsumed_tail
        return out

    @property
    def needs_input(self) -> bool:
        return not self.tail

    @property
    def eof(self) -> bool:
        return self.inner.eof

    @property
    def unused_data(self) -> bytes:
        return self.inner.unused_data


DECOMPRESSORS = {"gzip": _Zlib, "bzip2": bz2.BZ2Decompressor, "xz": lzma.LZMADecompressor}
DECOMPRESS_ERRORS = (zlib.error, OSError, lzma.LZMAError, EOFError, ValueError)


class Decompressed:
    """Plain or decompressed bytes of `raw`, at most `size` per read, counted and hashed."""

    def __init__(self, raw, kind: str, budget: Budget | None):
        if kind == "zstd":
            raise StreamRefused("zstd compression is not accepted: save the image with "
                                "`docker save` (plain tar) or gzip it")
        self.raw, self.kind, self.budget = raw, kind, budget
        self.decompressor = DECOMPRESSORS[kind]() if kind != "plain" else None
        self.digest = hashlib.sha256()
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        size = CHUNK if size is None or size < 0 else min(size, CHUNK)
        data = self.raw.read(size) if self.decompressor is None else self._inflate(size)
        self.count += len(data)
        if self.budget is not None:
            self.budget.spend(len(data))
        self.digest.update(data)
        return data

    def _inflate(self, size: int) -> bytes:
        while True:
            decompressor = self.decompressor
            if decompressor.eof:  # concatenated streams are one stream to docker
                feed = decompressor.unused_data or self.raw.read(CHUNK)
                if not feed:
                    return b""
                self.decompressor = decompressor = DECOMPRESSORS[self.kind]()
            elif decompressor.needs_input:
                feed = self.raw.read(CHUNK)
                if not feed:
                    raise StreamRefused(f"the {self.kind} data ends before its end marker")
            else:
                feed = b""
            try:
                out = decompressor.decompress(feed, size)
            except DECOMPRESS_ERRORS as exc:
                raise StreamRefused(f"the {self.kind} data is corrupt ({exc})") from None
            if out:
                return out

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


def decompressed(raw, budget: Budget | None) -> Decompressed:
    head, reader = peek(raw, 6)
    return Decompressed(reader, compression_of(head), budget)


class BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads a pax or long-name header whole into memory: bound it first."""

    def _proc_gnulong(self, tar):
        self._bound()
        return super()._proc_gnulong(tar)

    def _proc_pax(self, tar):
        self._bound()
        return super()._proc_pax(tar)

    def _bound(self) -> None:
        if self.size > MAX_HEADER_BYTES:
            raise BoundExceeded(f"a tar header of {self.size} bytes (more than "
                                f"{MAX_HEADER_BYTES} allowed)")


def iterate(tar: tarfile.TarFile, max_members: int, what: str):
    """A stream's members, without tarfile keeping every one of them in memory."""
    count = 0
    while (member := tar.next()) is not None:
        tar.members.clear()
        count += 1
        if count > max_members:
            raise BoundExceeded(f"{what} has more than {max_members} entries")
        yield member


def clean_name(name: str) -> str:
    """The path a tar entry lands on, as Docker cleans it: `./a//b/` is `a/b`."""
    return posixpath.normpath("/" + name).lstrip("/")


@dataclass
class LayerScan:
    """One layer, as read: sizes, digest, and its effect on the account files."""

    size: int = 0
    diff_id: str = ""
    error: str | None = None  # not a readable tar (only an error if a layer is expected here)
    hides_lower_etc: bool = False  # a whiteout or opaque /etc, or /etc replaced
    account: dict[str, bytes | str] = field(default_factory=dict)  # path -> bytes or state


def scan_layer(raw, budget: Budget, entries: EntryBudget) -> LayerScan:
    """Read a layer blob to its end; bounds raise StreamRefused, a malformed tar is noted."""
    scan = LayerScan()
    head, raw = peek(raw, 6)
    kind = compression_of(head)
    if kind == "zstd":
        scan.error = "zstd-compressed layers are not accepted: rebuild with the default gzip"
        return scan
    reader = Decompressed(raw, kind, budget)
    try:
        with tarfile.open(fileobj=reader, mode="r|", tarinfo=BoundedTarInfo) as tar:
            scan.error = _scan_members(scan, tar, entries)
        reader.drain()
    except BoundExceeded:
        raise
    except (tarfile.TarError, StreamRefused) as exc:
        scan.error = scan.error or f"not a readable layer ({exc})"
        _drain_quietly(reader)
    scan.size, scan.diff_id = reader.count, "sha256:" + reader.digest.hexdigest()
    return scan


def _scan_members(scan: LayerScan, tar: tarfile.TarFile, entries: EntryBudget) -> str | None:
    """Note each entry's effect on the account files; the reason to refuse the layer, if any."""
    for member in iterate(tar, entries.limit, "a layer"):
        entries.spend()
        if is_sparse(member):
            return (f"refused: it holds the sparse file {member.name!r}, which would be written "
                    "out whole (add files with `docker build`)")
        _note_account_change(scan, member, tar)
    return None


def _drain_quietly(reader: Decompressed) -> None:
    """Count the rest of a malformed layer; corrupt compression ends the count (the caller
    still reads the raw bytes to the end)."""
    try:
        reader.drain()
    except BoundExceeded:
        raise
    except StreamRefused:
        pass


def _note_account_change(scan: LayerScan, member: tarfile.TarInfo, tar) -> None:
    name = clean_name(member.name)
    directory, _, base = name.rpartition("/")
    if name == ".wh.etc" or name == "etc/.wh..wh..opq":
        scan.hides_lower_etc = True
    elif name == "etc" and not member.isdir():
        scan.hides_lower_etc = True  # /etc replaced by a file or a link
        for path in ACCOUNT_FILES:
            scan.account[path] = UNREADABLE
    elif directory == "etc" and base.startswith(".wh.") and f"etc/{base[4:]}" in ACCOUNT_FILES:
        scan.account[f"etc/{base[4:]}"] = DELETED
    elif name in ACCOUNT_FILES:
        if member.isreg() and member.size <= MAX_ACCOUNT_FILE:
            scan.account[name] = tar.extractfile(member).read(MAX_ACCOUNT_FILE + 1)
        else:
            scan.account[name] = UNREADABLE


def merge_account_files(scans: list[LayerScan]) -> dict[str, bytes | str]:
    """/etc/passwd and /etc/group of the image's top layer, layers applied in order."""
    state: dict[str, bytes | str] = {path: DELETED for path in ACCOUNT_FILES}
    for scan in scans:
        if scan.hides_lower_etc:
            state = {path: DELETED for path in ACCOUNT_FILES}
        state.update(scan.account)
    return state
