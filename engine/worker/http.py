"""A node that reports to the server over HTTP: no database, no shared disk, no ground truth.

    coordinator = HttpCoordinator("https://epreuve.example", worker_token)
    agent = RemoteAgent(coordinator, runner, settings)      # settings: the node's data dir
    agent.run(stop)

`HttpCoordinator` implements the Coordinator protocol over the worker routes
(engine/api/workers.py). Each claimed attempt has its token, kept here in memory and sent
with every call about it. Connection errors and 5xx answers are retried with backoff (a
restarting server loses nothing); 409 means the attempt is no longer ours: `LeaseLost`
(heartbeat: False), and the agent stops that container at once.

`RemoteAgent` is the Agent with two node-side caches: the attempt's input files, fetched
by the manifest the server gives and verified file by file (kept per dataset version,
never ground truth: the server has no route for it), and pinned images' archives, fetched
by digest into a node-local store and loaded once (engine/image_presence.ensure_image).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

from engine.datasets import DatasetError, SealedDataset
from engine.errors import EpreuveError, LeaseLost, Unavailable
from engine.image_presence import ImageUnavailable, ensure_image
from engine.node_description import NodeDescription
from engine.store import DirectoryStore, checked_digest
from engine.worker.agent import Agent
from engine.worker.protocol import JobOutcome, JobTicket, PlatformFailure
from engine.worker.wire import (
    ATTEMPT_HEADER,
    ATTEMPT_TOKEN_HEADER,
    AWAITING_SCORING_HEADER,
    pack_outputs,
    ticket_from_json,
)
from runners.docker import DockerUnavailable

log = logging.getLogger(__name__)
API = "/api/v1/worker"
DEFAULT_IMAGE_CACHE_BYTES = 50 << 30
VERSION = re.compile(r"^[0-9a-f]{16,128}$")
RELATIVE = re.compile(r"^inputs/[A-Za-z0-9][A-Za-z0-9._-]{0,127}"  # the case
                      r"(/[A-Za-z0-9._][A-Za-z0-9._ -]{0,254})+$")  # its files
LOG_RETRY_SECONDS = 5.0  # a live log chunk: never worth holding a run's thread for


class ServerRefused(EpreuveError):
    """The server answered 4xx (other than 409) to a worker call: a bug or a bad token."""

    status: int | None = None


class ServerUnreachable(Unavailable):
    """The server did not answer within the retries."""


class CacheDiskFull(Unavailable):
    """The disk of a node's cache cannot hold what a job needs: the platform's, for
    organisers (which disk, how much was needed), never the team's."""


def _count(header: str | None) -> int:
    """A count the server put in a header (an older server puts none: 0)."""
    try:
        return max(0, int(header or 0))
    except ValueError:
        return 0


class HttpCoordinator:
    def __init__(self, server_url: str, token: str, *, wait_seconds: float = 20.0,
                 retry_seconds: float = 300.0, timeout: float = 60.0):
        self.client = httpx.Client(base_url=server_url.rstrip("/"), timeout=timeout,
                                   headers={"Authorization": f"Bearer {token}"})
        self.wait_seconds = wait_seconds
        self.retry_seconds = retry_seconds  # how long a report is retried before giving up
        self._tokens: dict[tuple[int, int], str] = {}
        self.lease_seconds = 60.0
        self.description: NodeDescription | None = None  # registered before the first claim
        self.node_id: int | None = None
        self.gpu_latest: Mapping[str, Any] = {}  # the node's GPUs' latest readings
        self._awaiting_scoring = 0  # as the last claim that found nothing heard

    def close(self) -> None:
        self.client.close()

    # -- the protocol --------------------------------------------------------------------

    def register(self) -> None:
        """This node in the server's registry: its id goes with every claim."""
        if self.description is not None and self.node_id is None:
            response = self._send("POST", f"{API}/nodes/register",
                                  json=self.description.to_json())
            self.node_id = int(response.json()["node_id"])

    def lease(self, capacity: int, *, min_gpus: int = 0) -> JobTicket | None:
        try:
            self.register()
            wanted = {"gpus": capacity, "wait_seconds": self.wait_seconds,
                      "node_id": self.node_id,
                      **({"min_gpus": min_gpus} if min_gpus else {})}  # absent: any server
            response = self._send("POST", f"{API}/jobs/claim", json=wanted,
                                  timeout=self.wait_seconds + 30)
        except ServerUnreachable as exc:
            log.warning("no job claimed: %s", exc)
            self._awaiting_scoring = 0  # unknown: a server that is gone scores nothing
            return None
        except ServerRefused as exc:
            if self.node_id is None or exc.status != 404:
                raise
            log.warning("the server does not know node %s: registering again", self.node_id)
            self.node_id = None
            return None
        if response.status_code == 204:
            awaiting = _count(response.headers.get(AWAITING_SCORING_HEADER))
            if awaiting and awaiting != self._awaiting_scoring:
                log.info("%d run(s) of this node still being scored on the server", awaiting)
            self._awaiting_scoring = awaiting
            return None
        body = response.json()
        ticket = ticket_from_json(body["ticket"])
        self._tokens[(ticket.job_id, ticket.attempt)] = body["attempt_token"]
        self.lease_seconds = float(body.get("lease_seconds") or self.lease_seconds)
        return ticket

    def awaiting_scoring(self) -> int:
        return self._awaiting_scoring

    def started(self, ticket: JobTicket) -> None:
        self._call(ticket, "POST", f"{API}/jobs/{ticket.job_id}/start")

    def heartbeat(self, ticket: JobTicket) -> bool:
        try:
            self._call(ticket, "POST", f"{API}/jobs/{ticket.job_id}/heartbeat",
                       retry_seconds=min(self.retry_seconds, 30.0),
                       json={"node_id": self.node_id, "gpus": dict(self.gpu_latest)})
        except LeaseLost:
            return False
        return True

    def log(self, ticket: JobTicket, text: str) -> None:
        """A chunk of the container's log (the server keeps a bounded amount per attempt).
        Retried briefly only: a live chunk that cannot be sent is dropped, the run goes on."""
        for start in range(0, len(text), 60_000):
            self._call(ticket, "POST", f"{API}/jobs/{ticket.job_id}/logs",
                       json={"text": text[start:start + 60_000]},
                       retry_seconds=min(self.retry_seconds, LOG_RETRY_SECONDS))

    def complete(self, ticket: JobTicket, outcome: JobOutcome) -> None:
        """Upload the outputs (one tar), then complete with the result as data; the server
        stores it and answers at once (202), its scorer scores it. The node's copy of the
        outputs is removed once the server has them."""
        output_dir = Path(outcome.output_dir)
        try:
            with tempfile.TemporaryDirectory(prefix="epreuve-outputs-") as scratch:
                archive = pack_outputs(output_dir, Path(scratch) / "outputs.tar")
                self._call(ticket, "PUT", f"{API}/outputs/{ticket.job_id}",
                           content=lambda: _file_chunks(archive),
                           headers={"Content-Type": "application/octet-stream"})
            self._call(ticket, "POST", f"{API}/jobs/{ticket.job_id}/complete",
                       json=json.loads(json.dumps({
                           "result": outcome.result.to_dict(), "gpu_usage": outcome.gpu_usage,
                           "node": outcome.node, "run_spec": outcome.run_spec}, default=str)),
                       timeout=max(600.0, self.lease_seconds))
        finally:  # the server has them, or the attempt is over: never kept on the node
            shutil.rmtree(output_dir, ignore_errors=True)
        self._tokens.pop((ticket.job_id, ticket.attempt), None)

    def retry(self, ticket: JobTicket, message: str, detail: str | None = None, *,
              node: Mapping[str, Any] | None = None) -> None:
        self._call(ticket, "POST", f"{API}/jobs/{ticket.job_id}/retry",
                   json=json.loads(json.dumps({
                       "message": message[:4000],
                       "detail": None if detail is None else detail[-100_000:],
                       "node": dict(node or {})}, default=str)))
        self._tokens.pop((ticket.job_id, ticket.attempt), None)

    def maintenance(self) -> None:
        """Nothing: the server sweeps expired leases on its own clock."""

    # -- inputs and images ---------------------------------------------------------------

    def inputs(self, ticket: JobTicket) -> dict:
        return self._call(ticket, "GET", f"{API}/jobs/{ticket.job_id}/inputs").json()

    def download_input(self, ticket: JobTicket, path: str, target) -> None:
        self._stream(f"{API}/jobs/{ticket.job_id}/inputs/{path}", target,
                     headers=self._fence(ticket))

    def download_image(self, archive_sha256: str, target,
                       before: Callable[[int | None], None] | None = None) -> None:
        """The archive's bytes into `target`; `before` learns its size (None when the server
        does not say) before a byte is written, to make room for it."""
        self._stream(f"{API}/images/{checked_digest(archive_sha256)}", target, before=before)

    # -- transport -------------------------------------------------------------------------

    def _fence(self, ticket: JobTicket) -> dict[str, str]:
        token = self._tokens.get((ticket.job_id, ticket.attempt))
        if token is None:
            raise LeaseLost(f"job {ticket.job_id} attempt {ticket.attempt} was not claimed by "
                            "this node")
        return {ATTEMPT_HEADER: str(ticket.attempt), ATTEMPT_TOKEN_HEADER: token}

    def _call(self, ticket: JobTicket, method: str, url: str, *,
              headers: dict[str, str] | None = None, **kwargs) -> httpx.Response:
        return self._send(method, url, headers={**self._fence(ticket), **(headers or {})},
                          **kwargs)

    def _send(self, method: str, url: str, *, retry_seconds: float | None = None,
              content: Callable[[], Any] | None = None, **kwargs) -> httpx.Response:
        """One call, retried with backoff on connection errors and 5xx; 409 is LeaseLost."""
        deadline = time.monotonic() + (self.retry_seconds if retry_seconds is None
                                       else retry_seconds)
        pause = 0.5
        while True:
            try:
                response = self.client.request(
                    method, url, **({} if content is None else {"content": content()}),
                    **kwargs)
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code < 500:
                    return _checked(response)
                problem = f"HTTP {response.status_code}"
            if time.monotonic() + pause > deadline:
                raise ServerUnreachable(f"{method} {url}: {problem}")
            log.info("%s %s failed (%s); again in %.1fs", method, url, problem, pause)
            time.sleep(pause)
            pause = min(pause * 2, 10.0)

    def _stream(self, url: str, target, headers: dict[str, str] | None = None,
                before: Callable[[int | None], None] | None = None) -> None:
        with self.client.stream("GET", url, headers=headers) as response:
            if response.status_code >= 400:
                response.read()
                _checked(response)
            if before is not None:
                length = response.headers.get("Content-Length", "")
                before(int(length) if length.isdigit() else None)
            for chunk in response.iter_bytes(1 << 20):
                target.write(chunk)


def _checked(response: httpx.Response) -> httpx.Response:
    if response.status_code == 409:
        raise LeaseLost(_message(response))
    if response.status_code >= 400:
        refused = ServerRefused(f"HTTP {response.status_code}: {_message(response)}")
        refused.status = response.status_code
        raise refused
    return response


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])[:500]
    except (ValueError, KeyError, TypeError):
        return response.text[:500]


def _file_chunks(path: Path):
    with open(path, "rb") as source:
        while chunk := source.read(1 << 20):
            yield chunk


class RemoteAgent(Agent):
    """The Agent of a node that shares nothing with the server but its API."""

    coordinator: HttpCoordinator

    store: DirectoryStore

    def __init__(self, coordinator: HttpCoordinator, runner, settings, *,
                 image_cache_bytes: int = DEFAULT_IMAGE_CACHE_BYTES, **kwargs):
        kwargs.setdefault("store", DirectoryStore(settings.data_dir / "image-cache"))
        super().__init__(coordinator, runner, settings, **kwargs)
        coordinator.description = self.describe()  # sent once, when registering
        coordinator.gpu_latest = self.gpu_latest
        self.inputs_cache = settings.data_dir / "inputs-cache"
        self.image_cache_bytes = image_cache_bytes  # the archives' disk budget (LRU)
        # slots share the cache: one slot's eviction must not take the archive another
        # slot fetched and is about to load
        self._image_lock = threading.Lock()

    def _dataset(self, ticket: JobTicket) -> SealedDataset:
        """The attempt's inputs in the node's cache, each file verified against the sha256
        the server's manifest gives: a dataset of inputs only. Fetched under the heartbeat
        (a large test set takes longer than a lease)."""
        with self._heartbeats(ticket) as lost:
            try:
                dataset = self._fetched_inputs(ticket)
            except CacheDiskFull as exc:
                raise PlatformFailure("fetching the inputs", exc) from exc
        if lost.is_set():
            raise LeaseLost(f"job {ticket.job_id} was taken back while its inputs were fetched")
        return dataset

    def _fetched_inputs(self, ticket: JobTicket) -> SealedDataset:
        listing = self.coordinator.inputs(ticket)
        version = str(listing.get("version", ""))
        if version != ticket.dataset_version or not VERSION.match(version):
            raise DatasetError(f"the server's inputs are of version {version[:16]!r}, not "
                               f"the job's {ticket.dataset_version[:16]}")
        root = self.inputs_cache / version
        for entry in listing["files"]:
            _cached_input(self.coordinator, ticket, root, entry)
        manifest = {"format": listing.get("format"), "task": listing["task"],
                    "cases": listing["cases"], "files": listing["files"]}
        return SealedDataset(root=root, version=version, manifest=manifest)

    def prepare_image(self, ticket: JobTicket) -> None:
        """The pinned image, loaded from the node's image cache, fetched by digest from
        the server first where the cache lacks it (under the heartbeat, before the run:
        never against the participant's time)."""
        digest = ticket.image_archive_sha256
        try:
            with self._image_lock:
                if digest and not self.runner.has_image(ticket.image_id):
                    _cached_blob(self.coordinator, self.store, digest, self.image_cache_bytes)
                ensure_image(self.runner, self.store, ticket.image_id, digest)
        except DockerUnavailable:
            pass  # no daemon to ask: the run reports it (INFRASTRUCTURE)
        except (ImageUnavailable, CacheDiskFull) as exc:
            raise PlatformFailure("loading the image", exc) from exc


def _cached_input(coordinator: HttpCoordinator, ticket: JobTicket, root: Path,
                  entry: dict) -> None:
    path, expected = str(entry["path"]), str(entry["sha256"])
    if not RELATIVE.match(path) or ".." in path.split("/"):
        raise DatasetError(f"the server named an input {path[:200]!r} outside inputs/")
    target = root / path
    if target.is_file() and not target.is_symlink() and _sha256(target) == expected:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        handle, name = tempfile.mkstemp(prefix=".fetch-", dir=target.parent)
    except OSError as exc:
        raise _disk_full(exc, "inputs cache", root, f"the input {path}") from exc
    try:
        with os.fdopen(handle, "wb") as out:
            try:
                coordinator.download_input(ticket, path, out)
            except OSError as exc:
                raise _disk_full(exc, "inputs cache", root, f"the input {path}") from exc
        if _sha256(Path(name)) != expected:
            raise DatasetError(f"the input {path} fetched from the server does not match "
                               "its manifest's sha256")
        os.chmod(name, 0o444)
        os.replace(name, target)
    finally:
        Path(name).unlink(missing_ok=True)


def _cached_blob(coordinator: HttpCoordinator, store: DirectoryStore, digest: str,
                 budget: int) -> None:
    """The archive in the node's image cache: fetched (verified against its digest on the
    way in) where missing, marked as just used, and the least recently used others evicted
    past the cache's disk budget."""
    digest = checked_digest(digest)
    if not store.has(digest):
        _fetched_blob(coordinator, store, digest)
    os.utime(store.path(digest))  # its last use: what eviction goes by
    evict_least_recently_used(store, budget, keep=digest)


def _fetched_blob(coordinator: HttpCoordinator, store: DirectoryStore, digest: str) -> None:
    """Fetch the archive straight into the cache's disk (hashed on the way, moved into
    place only once it matches its name), after making room for it. A disk too small is
    `CacheDiskFull`; nothing partial is ever left where a verified archive would be."""
    what = f"the image archive sha256:{digest}"
    try:
        store.incoming.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix="fetch-", dir=store.incoming)
    except OSError as exc:
        raise _disk_full(exc, "image cache", store.root, what) from exc
    try:
        hashing = hashlib.sha256()
        with os.fdopen(handle, "wb") as out:
            def write(chunk: bytes) -> None:
                hashing.update(chunk)
                out.write(chunk)

            try:
                coordinator.download_image(digest, _Writer(write), before=lambda size: (
                    make_room(store, size, keep=digest, what=what)))
                out.flush()
                os.fsync(out.fileno())
            except OSError as exc:
                raise _disk_full(exc, "image cache", store.root, what,
                                 needed=out.tell()) from exc
        if hashing.hexdigest() != digest:
            raise ImageUnavailable(f"the server sent bytes hashing to sha256:"
                                   f"{hashing.hexdigest()} for {what}: nothing was kept")
        store.adopt(Path(name), digest)
    finally:
        Path(name).unlink(missing_ok=True)


class _Writer:
    def __init__(self, write: Callable[[bytes], None]):
        self.write = write


HEADROOM_BYTES = 16 << 20  # a disk filled to its last byte fails its other writers


def make_room(store: DirectoryStore, needed: int | None, *, keep: str, what: str) -> list[str]:
    """Evict the least recently used archives (never `keep`) until the cache's disk has
    `needed` bytes free; CacheDiskFull when even an empty cache would not hold them.
    Returns the digests evicted."""
    if needed is None:
        return []
    evicted = []
    by_age = sorted((store.path(d).stat().st_mtime, d) for d in store.digests() if d != keep)
    while shutil.disk_usage(store.root).free < needed + HEADROOM_BYTES and by_age:
        _, digest = by_age.pop(0)
        store.delete(digest)
        evicted.append(digest)
    free = shutil.disk_usage(store.root).free
    if free < needed + HEADROOM_BYTES:
        raise CacheDiskFull(
            f"the node's image cache at {store.root} has {_mib(free)} free (after evicting "
            f"{len(evicted)} older archive(s)); {what} needs {_mib(needed)} and "
            f"{_mib(HEADROOM_BYTES)} of headroom. Free space on that disk, or give the cache "
            "a larger one")
    if evicted:
        log.info("evicted %d archive(s) from the image cache to make room for %s",
                 len(evicted), what)
    return evicted


def _disk_full(exc: OSError, cache: str, root: Path, what: str,
               needed: int | None = None) -> OSError | CacheDiskFull:
    """ENOSPC as CacheDiskFull, naming the disk and the need; any other OSError as it is."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return exc
    free = shutil.disk_usage(root).free if root.exists() else 0
    need = "" if needed is None else f" (more than the {_mib(needed)} written so far)"
    return CacheDiskFull(f"the node's {cache} at {root} is full ({_mib(free)} free): "
                         f"{what} did not fit{need}. Free space on that disk, or give the "
                         "cache a larger one")


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def evict_least_recently_used(store: DirectoryStore, budget: int, *, keep: str) -> list[str]:
    """Delete the least recently used archives until the cache is within `budget` bytes
    (never `keep`, the one about to be loaded). Returns the digests evicted."""
    entries = []
    for digest in store.digests():
        info = store.path(digest).stat()
        entries.append((info.st_mtime, digest, info.st_size))
    total = sum(size for _, _, size in entries)
    evicted = []
    for _, digest, size in sorted(entries):
        if total <= budget:
            break
        if digest == keep:
            continue
        store.delete(digest)
        evicted.append(digest)
        total -= size
    return evicted


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
