"""Resumable uploads of image tars: bytes streamed to disk, hashed on the way, then stored.

An upload is created with the length its owner declares (at most the phase's cap), then
appended to at its current offset only, in any number of requests, until it is whole; it
then moves into the content-addressed store under the sha256 computed while it arrived.

    <uploads_dir>/<id>.json    the upload's state (owner, length, metadata, expiry), written
                               atomically: a server killed at any moment finds it again
    <uploads_dir>/<id>.part    the bytes received so far: its size IS the offset

The offset is the size of the part file, so nothing acknowledged can be lost or counted
twice after a crash. A running sha256 per upload is kept in this process; when it does not
cover exactly the bytes on disk (after a restart, or another server process appended), the
prefix is hashed again once. Unfinished uploads expire (default 24 h after their last
append) and `sweep` removes them. Only the owner's team sees an upload: for anyone else it
does not exist (404), so an upload id can be neither probed nor touched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

from engine.errors import Conflict, EpreuveError, NotFound
from engine.store import CHUNK, DirectoryStore

DEFAULT_EXPIRY = timedelta(hours=24)
UPLOAD_ID = re.compile(r"^[A-Za-z0-9_-]{32}$")
MAX_METADATA_BYTES = 4096  # Upload-Metadata: a few short fields, never a payload


class UploadNotFound(NotFound):
    """No such upload for this caller (or it expired)."""


class OffsetMismatch(Conflict):
    """The client's offset is not the upload's: it must ask (HEAD) and continue from there."""


class UploadBusy(Conflict):
    """Another request is appending to this upload right now."""


class UploadTooLarge(EpreuveError):
    """More bytes than allowed: the declared length, or the phase's cap."""

    http_status = 413


class UploadIncomplete(Conflict):
    """The upload is not whole yet: it cannot be submitted."""


@dataclass(frozen=True)
class Owner:
    """Who created an upload: its token, and the team that may use it."""

    token_id: int
    team_id: int | None

    def may_touch(self, upload: Upload) -> bool:
        if self.team_id is not None:
            return upload.team_id == self.team_id
        return upload.token_id == self.token_id


@dataclass(frozen=True)
class Upload:
    id: str
    token_id: int
    team_id: int | None
    length: int
    metadata: dict[str, str]
    created_at: datetime
    expires_at: datetime
    offset: int = 0
    sha256: str | None = None  # once complete: the blob in the store

    @property
    def complete(self) -> bool:
        return self.sha256 is not None

    def to_json(self) -> str:
        data = asdict(self)
        data["created_at"] = self.created_at.isoformat()
        data["expires_at"] = self.expires_at.isoformat()
        data.pop("offset")  # the part file's size is the offset
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, offset: int) -> Upload:
        data = json.loads(text)
        data["created_at"] = datetime.fromisoformat(data["created_at"])
        data["expires_at"] = datetime.fromisoformat(data["expires_at"])
        return cls(**data, offset=offset)


class _RunningHash:
    """The sha256 of an upload's first `covered` bytes, kept between requests."""

    def __init__(self, digest=None, covered: int = 0):
        self.digest = digest or hashlib.sha256()
        self.covered = covered


class UploadArea:
    """The upload directory of one server (every process of it shares the directory)."""

    def __init__(self, root: Path, store: DirectoryStore, *,
                 expiry: timedelta = DEFAULT_EXPIRY):
        self.root = Path(root)
        self.store = store
        self.expiry = expiry
        self._hashes: dict[str, _RunningHash] = {}
        self._lock = threading.Lock()

    # -- paths ---------------------------------------------------------------------

    def _state_path(self, upload_id: str) -> Path:
        return self.root / f"{upload_id}.json"

    def _part_path(self, upload_id: str) -> Path:
        return self.root / f"{upload_id}.part"

    # -- state -----------------------------------------------------------------------

    def create(self, owner: Owner, length: int, *, cap: int, metadata: dict[str, str],
               now: datetime | None = None) -> Upload:
        """A new, empty upload of `length` bytes; its id is random (unguessable)."""
        if length < 0:
            raise EpreuveError("Upload-Length must be a number of bytes, 0 or more")
        if length > cap:
            raise UploadTooLarge(f"the upload declares {length} bytes; this phase accepts "
                                 f"image archives of at most {cap} bytes")
        if len(json.dumps(metadata)) > MAX_METADATA_BYTES:
            raise EpreuveError(f"Upload-Metadata is over {MAX_METADATA_BYTES} bytes")
        now = now or datetime.now(UTC)
        self.root.mkdir(parents=True, exist_ok=True)
        upload = Upload(id=secrets.token_urlsafe(24), token_id=owner.token_id,
                        team_id=owner.team_id, length=length, metadata=dict(metadata),
                        created_at=now, expires_at=now + self.expiry)
        self._part_path(upload.id).touch(mode=0o600, exist_ok=False)
        self._write_state(upload)
        if length == 0:
            return self._finish(upload, open(self._part_path(upload.id), "rb"))
        return upload

    def get(self, upload_id: str, owner: Owner, *, now: datetime | None = None) -> Upload:
        upload = self._read(upload_id)
        if upload is None or not owner.may_touch(upload) or self._expired(upload, now):
            raise UploadNotFound(f"no upload {upload_id[:40]!r}: it never existed, expired, "
                                 "or belongs to another team; start a new upload")
        return upload

    def delete(self, upload_id: str, owner: Owner) -> None:
        upload = self.get(upload_id, owner)
        self._remove(upload.id)

    def _read(self, upload_id: str) -> Upload | None:
        if not UPLOAD_ID.match(upload_id):  # never joined to a path unchecked
            return None
        try:
            text = self._state_path(upload_id).read_text()
        except FileNotFoundError:
            return None
        part = self._part_path(upload_id)
        upload = Upload.from_json(text, part.stat().st_size if part.exists() else 0)
        if upload.complete:
            if part.exists():  # a crash between recording the digest and storing the bytes
                self._move_to_store(upload.id, upload.sha256)
            return replace(upload, offset=upload.length)
        return upload if part.exists() else None

    def _write_state(self, upload: Upload) -> None:
        """Atomically: a temporary file, fsynced, renamed over the old state."""
        handle, name = tempfile.mkstemp(prefix=f".{upload.id}-", dir=self.root)
        try:
            with os.fdopen(handle, "w") as out:
                out.write(upload.to_json())
                out.flush()
                os.fsync(out.fileno())
            os.replace(name, self._state_path(upload.id))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)

    def _expired(self, upload: Upload, now: datetime | None) -> bool:
        return (now or datetime.now(UTC)) >= upload.expires_at

    def _remove(self, upload_id: str) -> None:
        with self._lock:
            self._hashes.pop(upload_id, None)
        self._part_path(upload_id).unlink(missing_ok=True)
        self._state_path(upload_id).unlink(missing_ok=True)

    # -- appending ---------------------------------------------------------------------

    @contextlib.contextmanager
    def appending(self, upload_id: str, owner: Owner, offset: int) -> Iterator[Appender]:
        """Hold the upload (one writer at a time, across processes) from `offset`, which
        must be its current offset. Bytes written stay even when the request breaks off
        (a client that vanished resumes from them); bytes past the declared length undo
        the whole request (413)."""
        upload = self.get(upload_id, owner)
        if upload.complete:
            raise OffsetMismatch(f"upload {upload_id} is complete ({upload.length} bytes): "
                                 "nothing more to send")
        try:
            part = open(self._part_path(upload.id), "r+b")  # noqa: SIM115 (closed below)
        except FileNotFoundError:
            raise UploadNotFound(f"no upload {upload_id[:40]!r}: it expired") from None
        with part:
            try:
                fcntl.flock(part.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UploadBusy(f"upload {upload_id} is being written by another request: "
                                 "ask its offset (HEAD) and try again") from None
            size = part.seek(0, os.SEEK_END)
            if offset != size:
                raise OffsetMismatch(f"Upload-Offset {offset} is not the upload's offset "
                                     f"{size}: ask it (HEAD) and continue from there")
            appender = Appender(upload, part, self._running_hash(upload.id, part, size))
            try:
                yield appender
            except UploadTooLarge:
                appender.undo()
                raise
            finally:
                appender.settle()
                self._keep_hash(upload.id, appender.hash)
            if appender.offset == upload.length:
                self._finish(upload, part, appender.hash)
            else:
                self._write_state(replace(upload, expires_at=datetime.now(UTC) + self.expiry))

    def _busy(self, upload_id: str) -> bool:
        """A request is appending to it (whatever its expiry says, it is alive)."""
        try:
            with open(self._part_path(upload_id), "rb") as part:
                try:
                    fcntl.flock(part.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return True
                fcntl.flock(part.fileno(), fcntl.LOCK_UN)
        except FileNotFoundError:
            pass
        return False

    def _running_hash(self, upload_id: str, part: BinaryIO, size: int) -> _RunningHash:
        with self._lock:
            running = self._hashes.pop(upload_id, None)
        if running is not None and running.covered == size:
            return running
        running = _RunningHash()  # a restart, or another process appended: hash the prefix
        part.seek(0)
        while running.covered < size and (chunk := part.read(min(CHUNK, size - running.covered))):
            running.digest.update(chunk)
            running.covered += len(chunk)
        part.seek(size)
        return running

    def _keep_hash(self, upload_id: str, running: _RunningHash) -> None:
        with self._lock:
            self._hashes[upload_id] = running

    def _finish(self, upload: Upload, part: BinaryIO, running: _RunningHash | None = None
                ) -> Upload:
        """Whole: into the store under the digest computed on the way; the state remembers
        the digest, so the submission can name the upload."""
        running = running or _RunningHash()
        with part:
            os.fsync(part.fileno())
        done = replace(upload, sha256=running.digest.hexdigest(), offset=upload.length,
                       expires_at=datetime.now(UTC) + self.expiry)
        self._write_state(done)  # first the digest, then the move: `_read` finishes a move
        self._move_to_store(upload.id, done.sha256)
        with self._lock:
            self._hashes.pop(upload.id, None)
        return done

    def _move_to_store(self, upload_id: str, sha256: str) -> None:
        part = self._part_path(upload_id)
        try:
            self.store.adopt(part, sha256)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            self.store.put_file(part, expected_sha256=sha256)  # another filesystem: copied
            part.unlink(missing_ok=True)

    # -- expiry ------------------------------------------------------------------------

    def sweep(self, now: datetime | None = None) -> int:
        """Remove expired uploads (their blobs, once complete, stay in the store)."""
        removed = 0
        if not self.root.is_dir():
            return removed
        for state in self.root.glob("*.json"):
            upload = self._read(state.stem)
            if upload is not None and self._expired(upload, now) and not self._busy(upload.id):
                self._remove(upload.id)
                removed += 1
        for part in self.root.glob("*.part"):  # a crash between creating the part and state
            if not self._state_path(part.stem).exists() and _older_than(part, self.expiry, now):
                part.unlink(missing_ok=True)
                removed += 1
        return removed


def _older_than(path: Path, age: timedelta, now: datetime | None) -> bool:
    with contextlib.suppress(FileNotFoundError):
        modified = datetime.fromtimestamp(path.stat().st_mtime, UTC)
        return (now or datetime.now(UTC)) - modified > age
    return False


class Appender:
    """Writes one request's bytes to an upload: hashed on the way, never past its length."""

    def __init__(self, upload: Upload, part: BinaryIO, running: _RunningHash):
        self.upload = upload
        self.part = part
        self.hash = running
        self.start = running.covered
        self.offset = running.covered
        self._start_digest = running.digest.copy()

    def write(self, chunk: bytes) -> None:
        if self.offset + len(chunk) > self.upload.length:
            raise UploadTooLarge(f"the request carries more than the {self.upload.length} "
                                 "bytes the upload declared: refused, this request undone")
        self.part.write(chunk)
        self.hash.digest.update(chunk)
        self.offset += len(chunk)
        self.hash.covered = self.offset

    def undo(self) -> None:
        """Back to where this request started (its other bytes would be a lie)."""
        self.part.truncate(self.start)
        self.part.seek(self.start)
        self.offset = self.start
        self.hash = _RunningHash(self._start_digest, self.start)

    def settle(self) -> None:
        """What was written is on disk before the offset is acknowledged."""
        self.part.flush()
        os.fsync(self.part.fileno())
