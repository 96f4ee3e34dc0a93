"""Image intake: a participant's `docker save` tar becomes a validated, pinned image.

The tar is read once, as a stream, under a size cap: its sha256 is computed
while its members are checked (no absolute paths, no `..`, no links or devices
at the top level, exactly one image, a readable config). The config must name
this node's architecture, a non-root user and an ENTRYPOINT or CMD. Only then
is it loaded into the Docker Engine (streamed, never pulled) and pinned by
image id (the sha256 of its config), the tar's sha256 and its layer digests.
Submitting the same image again is recognised by its image id, not duplicated.

Every refusal raises `ImageInvalid` (IMAGE_INVALID) with the reason.
"""

from __future__ import annotations

import hashlib
import json
import platform
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import docker
import docker.errors

DEFAULT_MAX_TAR_BYTES = 20 << 30
CHUNK = 1 << 20
ARCH_ALIASES = {"x86_64": "amd64", "aarch64": "arm64"}
Progress = Callable[[int, int | None], None]  # (bytes done, total or None)


class ImageInvalid(ValueError):
    """The image cannot be accepted; the message says why and what to do."""


@dataclass(frozen=True)
class PinnedImage:
    image_id: str  # sha256:<config digest>, what containers are created from
    tar_sha256: str
    layers: list[str]  # RootFS diff ids
    reference: str
    architecture: str
    user: str
    size_bytes: int


def node_architecture() -> str:
    machine = platform.machine()
    return ARCH_ALIASES.get(machine, machine)


class _HashingReader:
    """A file object that hashes and counts what passes through, and stops at a cap."""

    def __init__(self, handle, cap: int, progress: Progress | None, total: int | None):
        self.handle, self.cap, self.progress, self.total = handle, cap, progress, total
        self.digest = hashlib.sha256()
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.count += len(data)
        if self.count > self.cap:
            raise ImageInvalid(f"the image archive is larger than the {self.cap >> 20} MiB "
                               "allowed: slim the image (multi-stage build, no caches)")
        self.digest.update(data)
        if self.progress:
            self.progress(self.count, self.total)
        return data


def inspect_tar(path: Path, *, max_bytes: int = DEFAULT_MAX_TAR_BYTES,
                progress: Progress | None = None) -> tuple[dict, dict, str]:
    """(manifest entry, image config, tar sha256), reading the archive once as a stream."""
    total = path.stat().st_size
    if total > max_bytes:
        raise ImageInvalid(f"the image archive is {total >> 20} MiB, more than the "
                           f"{max_bytes >> 20} MiB allowed")
    manifest, blobs = None, {}
    with open(path, "rb") as raw:
        reader = _HashingReader(raw, max_bytes, progress, total)
        try:
            with tarfile.open(fileobj=reader, mode="r|*") as tar:
                for member in tar:
                    _check_member(member)
                    if member.isfile() and member.name == "manifest.json":
                        manifest = json.loads(tar.extractfile(member).read())
                    elif member.isfile() and _may_be_config(member):
                        blobs[member.name] = tar.extractfile(member).read()
                while reader.read(CHUNK):  # hash the tar's padding too
                    pass
        except (tarfile.TarError, OSError, json.JSONDecodeError) as exc:
            raise ImageInvalid(f"not a readable `docker save` archive ({exc})") from None
    if not isinstance(manifest, list) or not manifest:
        raise ImageInvalid("the archive has no manifest.json: create it with "
                           "`docker save IMAGE -o image.tar`")
    if len(manifest) != 1:
        raise ImageInvalid(f"the archive holds {len(manifest)} images; submit exactly one")
    entry = manifest[0]
    config_bytes = blobs.get(entry.get("Config", ""))
    if config_bytes is None:
        raise ImageInvalid("the archive's manifest names a config that is not in it")
    config = json.loads(config_bytes)
    config["_id"] = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    return entry, config, reader.digest.hexdigest()


def _may_be_config(member: tarfile.TarInfo) -> bool:
    """Configs are small JSON files: <digest>.json (classic) or blobs/sha256/<digest> (OCI)."""
    if member.size > (4 << 20):
        return False
    return member.name.endswith(".json") or member.name.startswith("blobs/")


def _check_member(member: tarfile.TarInfo) -> None:
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts:
        raise ImageInvalid(f"the archive contains the unsafe path {member.name!r}")
    if member.isdev() or member.isfifo():
        raise ImageInvalid(f"the archive contains a device or pipe: {member.name!r}")
    if (member.issym() or member.islnk()) and (PurePosixPath(member.linkname).is_absolute()
                                               or ".." in PurePosixPath(member.linkname).parts):
        raise ImageInvalid(f"the archive contains a link leaving it: {member.name!r} -> "
                           f"{member.linkname!r}")


def check_config(config: dict, node_arch: str) -> None:
    architecture = config.get("architecture")
    if architecture != node_arch:
        raise ImageInvalid(f"the image is built for {architecture}, but the nodes run "
                           f"{node_arch}: rebuild with --platform linux/{node_arch}")
    if config.get("os", "linux") != "linux":
        raise ImageInvalid(f"the image is for {config.get('os')}; a linux image is expected")
    settings = config.get("config") or {}
    user = (settings.get("User") or "").strip()
    if user.split(":")[0] in ("", "root", "0"):
        raise ImageInvalid("the image runs as root: add a non-root user to the Dockerfile "
                           "(RUN useradd -u 1000 -m algorithm, then USER algorithm)")
    if not (settings.get("Entrypoint") or settings.get("Cmd")):
        raise ImageInvalid("the image has no ENTRYPOINT or CMD: the platform would not know "
                           "what to run")


def pin_tar(path: Path, client: docker.DockerClient, *, reference: str | None = None,
            max_bytes: int = DEFAULT_MAX_TAR_BYTES, progress: Progress | None = None,
            load_progress: Progress | None = None) -> PinnedImage:
    """Validate, load (unless the daemon already has this exact image) and pin."""
    entry, config, tar_sha256 = inspect_tar(path, max_bytes=max_bytes, progress=progress)
    check_config(config, node_architecture())
    image_id = config["_id"]
    try:
        client.api.inspect_image(image_id)
    except docker.errors.ImageNotFound:
        _load(path, client, load_progress)
    attributes = client.api.inspect_image(image_id)  # the daemon agrees on the id
    tags = entry.get("RepoTags") or []
    return PinnedImage(
        image_id=image_id,
        tar_sha256=tar_sha256,
        layers=list((config.get("rootfs") or {}).get("diff_ids") or []),
        reference=reference or (tags[0] if tags else path.name),
        architecture=config["architecture"],
        user=(config.get("config") or {}).get("User", ""),
        size_bytes=int(attributes.get("Size") or 0),
    )


def _load(path: Path, client: docker.DockerClient, progress: Progress | None) -> None:
    total = path.stat().st_size
    with open(path, "rb") as raw:
        reader = _HashingReader(raw, total + 1, progress, total)
        try:
            client.api.load_image(_Chunks(reader))
        except docker.errors.APIError as exc:
            raise ImageInvalid(f"the Docker Engine refused the archive: {exc.explanation}") \
                from None


class _Chunks:
    """Iterable of chunks: requests streams it as the request body (the tar is never in RAM)."""

    def __init__(self, reader: _HashingReader):
        self.reader = reader

    def __iter__(self):
        while chunk := self.reader.read(CHUNK):
            yield chunk


def save_image(reference: str, destination: Path, client: docker.DockerClient,
               progress: Progress | None = None) -> Path:
    """`docker save` a local image to a tar, streamed, so that it goes through intake."""
    try:
        image = client.images.get(reference)
    except docker.errors.ImageNotFound:
        raise ImageInvalid(f"no local image {reference!r}: build it or give the path of a "
                           "`docker save` tar") from None
    total = int(image.attrs.get("Size") or 0) or None
    written = 0
    with open(destination, "wb") as handle:
        for chunk in image.save(chunk_size=CHUNK, named=True):
            handle.write(chunk)
            written += len(chunk)
            if progress:
                progress(written, total)
    return destination

