"""The command line as a client of an Épreuve server (EPREUVE_SERVER, EPREUVE_TOKEN).

`upload_image` sends a `docker save` tar (or saves a local image first) with the tus
protocol in chunks, and resumes an interrupted upload: the upload's URL is remembered in a
small state file under the data dir, keyed by the server and the tar's path, size and
modification time, and the server is asked where to continue (HEAD). The submission is then
created with an Idempotency-Key derived from the upload, so a retried request (or a rerun
of the command) never makes a second one. The other calls are thin: status, leaderboard,
cancel, and waiting for the server's check of the image.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx

from engine.errors import EpreuveError, NotFound, Unavailable

TUS = {"Tus-Resumable": "1.0.0"}
CHUNK_BYTES = 32 << 20  # one PATCH request: large enough to be fast, small to lose little
READ_BYTES = 1 << 20
RETRIES = 5
LEADERBOARD_PAGE = 200
Progress = Callable[[int, int], None]  # (bytes sent, total)


class ApiError(EpreuveError):
    """The server refused: its message, with its HTTP status."""

    def __init__(self, status: int, error_type: str, message: str, reason: str | None = None):
        super().__init__(message)
        self.http_status = status
        self.error_type = error_type
        self.reason = reason
        if status == Unavailable.http_status:  # the server's platform is not there
            self.exit_code = Unavailable.exit_code

    @property
    def not_found(self) -> bool:
        return self.http_status == NotFound.http_status


class ServerUnreachable(Unavailable):
    """The server did not answer."""


@dataclass(frozen=True)
class UploadResult:
    upload_url: str
    upload_id: str
    sha256: str
    size: int


class Api:
    """An authenticated session with one server."""

    def __init__(self, server: str, token: str, *, timeout: float = 60.0):
        self.server = server.rstrip("/")
        self.http = httpx.Client(base_url=self.server, timeout=timeout,
                                 headers={"Authorization": f"Bearer {token}"})

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def request(self, method: str, url: str, **kwargs) -> httpx.Response:
        try:
            response = self.http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"no answer from {self.server}: {exc}") from None
        if response.status_code >= 400:
            raise _api_error(response)
        return response

    # -- the API's reading calls -----------------------------------------------------

    def submission(self, submission_id: int) -> dict:
        return self.request("GET", f"/api/v1/submissions/{submission_id}").json()

    def leaderboard(self, challenge: str, phase: str, *, limit: int = 50,
                    offset: int = 0) -> dict:
        return self.request("GET", f"/api/v1/challenges/{quote(challenge, safe='')}/phases/"
                                   f"{quote(phase, safe='')}/leaderboard",
                            params={"limit": limit, "offset": offset}).json()

    def leaderboard_entries(self, challenge: str, phase: str) -> list[dict]:
        """Every entry, page after page."""
        entries: list[dict] = []
        offset: int | None = 0
        while offset is not None:
            page = self.leaderboard(challenge, phase, limit=LEADERBOARD_PAGE, offset=offset)
            entries += page["items"]
            following = page.get("next_offset")
            offset = following if isinstance(following, int) and following > offset else None
        return entries

    def nodes(self, *, retired: bool = False) -> list[dict]:
        """The node registry (organisers and admins); retired nodes only when asked."""
        return self.request("GET", "/api/v1/nodes",
                            params={"retired": "true"} if retired else None).json()["items"]

    def retire_node(self, node_id: int) -> dict:
        """Take a node gone for good out of the registry (admins)."""
        return self.request("POST", f"/api/v1/nodes/{int(node_id)}/retire").json()

    def cancel(self, submission_id: int) -> dict:
        return self.request("POST", f"/api/v1/submissions/{submission_id}/cancel").json()

    def intake(self, intake_id: int) -> dict:
        return self.request("GET", f"/api/v1/intakes/{intake_id}").json()

    def create_submission(self, upload_id: str, challenge: str, phase: str, *,
                          source_url: str | None = None, license_id: str | None = None,
                          idempotency_key: str | None = None) -> dict:
        """The intake of an uploaded image; retrying with the same key is safe."""
        body = {"upload_id": upload_id, "challenge": challenge, "phase": phase,
                "source_url": source_url, "license": license_id}
        key = idempotency_key or f"upload-{upload_id}"
        for attempt in range(RETRIES):
            try:
                return self.request("POST", "/api/v1/submissions", json=body,
                                    headers={"Idempotency-Key": key}).json()
            except ServerUnreachable:
                if attempt == RETRIES - 1:
                    raise
                time.sleep(2 ** attempt)
        raise AssertionError("unreachable")

    def wait_for_intake(self, intake_id: int, progress: Progress | None = None, *,
                        poll_seconds: float = 1.0) -> dict:
        """Until the server's check of the image ends: accepted or refused."""
        while True:
            intake = self.intake(intake_id)
            if progress and intake.get("bytes_total"):
                progress(intake["bytes_checked"], intake["bytes_total"])
            if intake["status"] != "validating":
                return intake
            time.sleep(poll_seconds)

    # -- uploading -------------------------------------------------------------------

    def upload(self, tar: Path, challenge: str, phase: str, *, state_dir: Path,
               progress: Progress | None = None, chunk_bytes: int = CHUNK_BYTES
               ) -> UploadResult:
        """Upload the tar, resuming the upload of an earlier run when the server has it
        (remembered until the caller forgets it, once the upload is submitted)."""
        size = tar.stat().st_size
        state = UploadState(state_dir, self.server, tar)
        url = state.url()
        offset = self._offset(url) if url else None
        if offset is None:
            url = self._create(size, challenge, phase, tar.name)
            state.remember(url)
            offset = 0
        with open(tar, "rb") as source:
            offset = self._send(url, source, offset, size, progress, chunk_bytes)
        head = self.request("HEAD", url, headers=TUS)
        return UploadResult(url, url.rstrip("/").rsplit("/", 1)[-1],
                            head.headers.get("Epreuve-Upload-Sha256", ""), size)

    def _offset(self, url: str) -> int | None:
        """Where the server's copy of an upload ends; None when it has it no more."""
        try:
            response = self.request("HEAD", url, headers=TUS)
        except ApiError as exc:
            if exc.http_status in (404, 410):
                return None
            raise
        return int(response.headers["Upload-Offset"])

    def _create(self, size: int, challenge: str, phase: str, filename: str) -> str:
        metadata = ",".join(f"{key} {base64.b64encode(value.encode()).decode()}"
                            for key, value in (("challenge", challenge), ("phase", phase),
                                               ("filename", filename[:200])))
        response = self.request("POST", "/api/v1/uploads", headers={
            **TUS, "Upload-Length": str(size), "Upload-Metadata": metadata})
        return str(self.http.base_url.join(response.headers["Location"]))

    def _send(self, url: str, source, offset: int, size: int, progress: Progress | None,
              chunk_bytes: int) -> int:
        """PATCH chunk after chunk; on a lost connection or a conflict, ask the offset
        again and continue from there (a few times, with backoff)."""
        failures = 0
        if progress:
            progress(offset, size)
        while offset < size:
            count = min(chunk_bytes, size - offset)
            source.seek(offset)
            try:
                response = self.request("PATCH", url, content=_read_exactly(source, count),
                                        headers={**TUS, "Upload-Offset": str(offset),
                                                 "Content-Type":
                                                     "application/offset+octet-stream",
                                                 "Content-Length": str(count)})
                offset = int(response.headers["Upload-Offset"])
                failures = 0
            except (ServerUnreachable, ApiError) as exc:
                retriable = isinstance(exc, ServerUnreachable) or exc.http_status in (409, 423) \
                    or exc.http_status >= 500
                failures += 1
                if not retriable or failures > RETRIES:
                    raise
                time.sleep(min(2 ** failures / 4, 10))
                known = self._offset(url)
                if known is None:
                    raise NotFound("the server no longer has this upload (expired): run "
                                   "the command again to start a new one") from None
                offset = known
            if progress:
                progress(offset, size)
        return offset


def _read_exactly(source, count: int):
    """The next `count` bytes, as an iterator of small pieces (never a whole chunk)."""
    left = count
    while left > 0 and (piece := source.read(min(READ_BYTES, left))):
        left -= len(piece)
        yield piece


def _api_error(response: httpx.Response) -> ApiError:
    try:
        error = response.json()["error"]
        return ApiError(response.status_code, error.get("type", ""), error["message"],
                        error.get("reason"))
    except (ValueError, KeyError, TypeError):
        return ApiError(response.status_code, "", f"the server answered {response.status_code}"
                        f" {response.reason_phrase}")


class UploadState:
    """Where an interrupted upload of this tar went: one small JSON file per tar."""

    def __init__(self, state_dir: Path, server: str, tar: Path):
        stat = tar.stat()
        identity = f"{server}\n{tar.resolve()}\n{stat.st_size}\n{stat.st_mtime_ns}"
        self.path = Path(state_dir) / "uploads" / \
            f"{hashlib.sha256(identity.encode()).hexdigest()[:32]}.json"

    def url(self) -> str | None:
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
            return str(json.loads(self.path.read_text())["url"])
        return None

    def remember(self, url: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"url": url}))
        os.replace(temporary, self.path)

    def forget(self) -> None:
        self.path.unlink(missing_ok=True)


def upload_image(server: str, token: str, image: str, challenge: str, phase: str, *,
                 state_dir: Path, progress: Progress | None = None,
                 save_progress: Progress | None = None, source_url: str | None = None,
                 license_id: str | None = None) -> dict:
    """Upload a tar (or `docker save` a local image into a tar kept under `state_dir` until
    it is submitted, so that an interrupted upload resumes), then create the submission:
    the server's intake, answered at once (the check of the image follows)."""
    tar = Path(image)
    saved = None
    if not tar.is_file():
        tar = saved = _saved(image, Path(state_dir), save_progress)
    with Api(server, token) as api:
        uploaded = api.upload(tar, challenge, phase, state_dir=state_dir, progress=progress)
        intake = api.create_submission(uploaded.upload_id, challenge, phase,
                                       source_url=source_url, license_id=license_id)
        # forgotten only now: a rerun after a failed POST finds the whole upload and
        # retries the POST with the same key
        UploadState(state_dir, api.server, tar).forget()
    if saved is not None:
        saved.unlink(missing_ok=True)
    return intake


def _saved(reference: str, state_dir: Path, progress: Progress | None) -> Path:
    """The image saved once to `<state_dir>/saved/<image id>.tar` (renamed into place
    when whole; a rerun after an interruption reuses it and resumes its upload)."""
    import docker
    import docker.errors

    from engine.images import ImageInvalid, save_image

    client = docker.DockerClient(base_url=os.environ.get("DOCKER_HOST")
                                 or "unix:///var/run/docker.sock")
    try:
        image_id = client.images.get(reference).id.removeprefix("sha256:")
    except docker.errors.ImageNotFound:
        raise ImageInvalid(f"no local image {reference!r} and no file by that name: build "
                           "it or give the path of a `docker save` tar") from None
    tar = state_dir / "saved" / f"{image_id}.tar"
    if not tar.is_file():
        tar.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=tar.parent) as scratch:
            partial = save_image(reference, Path(scratch) / "image.tar", client, progress)
            os.replace(partial, tar)
    return tar
