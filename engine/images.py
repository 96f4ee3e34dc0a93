"""Image intake: a participant's `docker save` tar becomes a validated image, pinned by id.

The archive is read once, as a stream, with every bound checked before memory
or disk is spent: the archive's size, the number of its entries, each JSON
member (read only when it is smaller than its bound), and the decompressed
size of its layers (counted while they are decompressed, against the phase's
`image_size`). The tar's sha256 is computed on the way. What intake checks:

- paths: no absolute path, no `..`, no device, no hard link, no sparse file (in
  the archive or a layer: it is written out at the size its header claims), symbolic links only
  inside the archive and never as a directory of another entry, no name twice
  (`./manifest.json` is `manifest.json`); manifest.json a regular file;
- shapes: manifest.json a list of one image, with a string Config and a list of
  string Layers, each a layer of the archive; a config object whose diff ids
  are the layers' own digests; malformed JSON is refused with the reason;
- the config: this node's architecture, an ENTRYPOINT or CMD, VOLUMEs at
  plain absolute paths, a WorkingDir and an Env the runtime can start (an
  absolute WORKDIR outside the sandbox's mounts, no empty name, no NUL), and a
  USER that is not root BY NUMBER: resolved to uid:gid through the image's own
  /etc/passwd and /etc/group (read from its layers, whiteouts applied), as runc
  would (`00`, `+0`, `toor` are root).

While it is read, intake writes its own copy of the archive: the same layers
and config, a manifest.json of our own without RepoTags, and no `repositories`,
`index.json` or `oci-layout` (Docker tags from all of them). That copy, which
the participant never touches, is what the Docker Engine loads, so a tar can
never move a tag on the node (`epreuve/base:3.11`, an evaluator's tag). The
image is then known by its id (the sha256 of its config) only, and runs as the
resolved numbers. Submitting the same image again is recognised by its id.

That copy is also what the platform keeps: it is hashed while it is written and put in
the content-addressed store (`engine/store.py`) under that sha256, the image's
`archive_sha256`, so that any node can load the image again by digest
(`engine/image_presence.py`). A refused image keeps nothing.

Every refusal raises `ImageInvalid` (IMAGE_INVALID) with the reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import posixpath
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import docker
import docker.errors

from engine.errors import EpreuveError, Unavailable
from engine.image_streams import (
    CHUNK,
    DELETED,
    UNREADABLE,
    BoundedTarInfo,
    Budget,
    EntryBudget,
    LayerScan,
    StreamRefused,
    clean_name,
    decompressed,
    is_sparse,
    iterate,
    merge_account_files,
    peek,
    scan_layer,
)
from engine.scoring.evaluation_image import EvaluationImageUnusable
from engine.store import BlobStore
from runners.docker import (  # one volume policy, one name per architecture
    ARCH_ALIASES,
    MAX_VOLUMES,
    cleaned_volume,
    image_settings_problem,
)
from runners.image_tags import put_back, tag_targets
from runners.image_user import (
    ResolvedUser,
    UserUnresolvable,
    go_atoi,
    numeric_pair,
    resolve_user,
)

DEFAULT_MAX_TAR_BYTES = 20 << 30
DEFAULT_MAX_IMAGE_BYTES = 20 << 30  # decompressed layers; a phase may set `image_size`
MAX_ARCHIVE_MEMBERS = 10_000
MAX_IMAGE_ENTRIES = 2_000_000  # of all the layers together: files, directories, links
MAX_CONTROL_JSON = 1 << 20  # manifest.json, repositories, index.json, oci-layout
MAX_CONFIG_JSON = 8 << 20
BLOCK = tarfile.BLOCKSIZE
CONTROL_FILES = ("manifest.json", "repositories", "index.json", "oci-layout")
PROTECTED_TAGS = ("epreuve/base:3.11",)  # checked after every load, named or not
Progress = Callable[[int, int | None], None]  # (bytes done, total or None)


class ImageInvalid(EpreuveError, ValueError):
    """The image cannot be accepted; the message says why and what to do."""


class ImageNotKept(Unavailable):
    """An accepted image whose archive the store could not keep (a full disk, a store that
    does not answer): nothing was submitted; trying again later is right."""


@dataclass(frozen=True)
class PinnedImage:
    image_id: str  # sha256:<config digest>, what containers are created from
    tar_sha256: str  # the participant's upload, as sent
    archive_sha256: str  # our loadable tag-free copy, kept in the store under this digest
    layers: list[str]  # RootFS diff ids
    reference: str
    architecture: str
    user: str  # "uid:gid", resolved at intake: what the container runs as
    size_bytes: int


@dataclass
class Inspection:
    """What one reading of an archive established."""

    entry: dict  # the manifest's one image, as checked (Config, Layers)
    config: dict
    image_id: str
    tar_sha256: str
    user: ResolvedUser
    archive_sha256: str = ""  # of the copy written to `copy_to`
    named_tags: list[str] = field(default_factory=list)  # tags the archive asked for
    layers_bytes: int = 0


@dataclass
class _Blob:
    offset: int  # of its data in our copy
    size: int
    layer: LayerScan | None = None


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


class _CopyWriter:
    """Our own tar, written entry by entry: fresh headers (no owner, mode or xattr of the
    participant's), the data as read, then the end-of-archive blocks."""

    def __init__(self, handle):
        self.handle = handle
        self.offset = 0
        self.digest = hashlib.sha256()  # the store's name for the copy: no second reading

    def _write(self, data: bytes) -> None:
        self.handle.write(data)
        self.digest.update(data)
        self.offset += len(data)

    def header(self, name: str, kind: bytes, size: int = 0, linkname: str = "") -> int:
        info = tarfile.TarInfo(name)
        info.type, info.size, info.linkname = kind, size, linkname
        info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
        self._write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        return self.offset

    def data(self, chunk: bytes) -> None:
        self._write(chunk)

    def pad(self) -> None:
        if self.offset % BLOCK:
            self._write(b"\0" * (BLOCK - self.offset % BLOCK))

    def file(self, name: str, content: bytes) -> None:
        self.header(name, tarfile.REGTYPE, len(content))
        self.data(content)
        self.pad()

    def close(self) -> None:
        self._write(b"\0" * (2 * BLOCK))
        self.handle.flush()


class _Tee:
    """Reads a member's data and writes every byte read to our copy."""

    def __init__(self, source, writer: _CopyWriter):
        self.source, self.writer = source, writer

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(CHUNK if size is None or size < 0 else size)
        self.writer.data(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


def inspect_tar(path: Path, *, max_bytes: int = DEFAULT_MAX_TAR_BYTES,
                max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                progress: Progress | None = None, copy_to: Path | None = None) -> Inspection:
    """Check an archive in one streamed reading; write the copy to load to `copy_to`."""
    total = path.stat().st_size
    if total > max_bytes:
        raise ImageInvalid(f"the image archive is {total >> 20} MiB, more than the "
                           f"{max_bytes >> 20} MiB allowed")
    if copy_to is None:
        with tempfile.TemporaryDirectory(prefix="epreuve-intake-") as scratch:
            return inspect_tar(path, max_bytes=max_bytes, max_image_bytes=max_image_bytes,
                               progress=progress, copy_to=Path(scratch) / "image.tar")
    target = Path(copy_to)
    with open(path, "rb") as raw, open(target, "wb") as out:
        os.chmod(target, 0o600)
        reader = _HashingReader(raw, max_bytes, progress, total)
        writer = _CopyWriter(out)
        try:
            members, control, blobs, links, budget = _read_archive(
                reader, writer, Budget(max_image_bytes, "the image's layers"), max_bytes)
            while reader.read(CHUNK):  # hash the tar's padding too
                pass
        except (tarfile.TarError, StreamRefused, OSError) as exc:
            raise ImageInvalid(_unreadable(exc)) from None
        _check_tree(members, links)
        entry, named_tags = _checked_manifest(control)
        config_name = _resolve(entry["Config"], members, links, "the config")
        out.flush()  # the config is read back from the copy
        config_bytes = _read_copy(target, blobs[config_name], MAX_CONFIG_JSON, "the config")
        writer.file("manifest.json", _own_manifest(config_name, [
            _resolve(layer, members, links, "a layer") for layer in entry["Layers"]]))
        writer.close()
    config = _json_object(config_bytes, "the image config")
    check_config(config, node_architecture())
    scans = _layer_scans(entry, config, members, links, blobs)
    named_tags += _repositories_tags(control.get("repositories"))
    return Inspection(entry=entry, config=config,
                      image_id="sha256:" + hashlib.sha256(config_bytes).hexdigest(),
                      tar_sha256=reader.digest.hexdigest(),
                      user=image_user(config, scans), named_tags=named_tags,
                      layers_bytes=budget.used, archive_sha256=writer.digest.hexdigest())


def _own_manifest(config_name: str, layers: list[str]) -> bytes:
    """The copy's manifest: no tags. Bounded like the participant's, so that the copy
    always ends with a small manifest (what a load cut short by `image_presence` needs)."""
    manifest = json.dumps([{"Config": config_name, "RepoTags": None, "Layers": layers}])
    if len(manifest) > MAX_CONTROL_JSON:
        raise ImageInvalid(f"the image's manifest would be more than {MAX_CONTROL_JSON} bytes "
                           "(too many layers, or names too long): create it with `docker build`")
    return manifest.encode()


def _unreadable(exc: Exception) -> str:
    if isinstance(exc, StreamRefused):
        return f"the image archive was refused: {exc}"
    return f"not a readable `docker save` archive ({exc})"


def _read_archive(reader, writer: _CopyWriter, budget: Budget, max_bytes: int):
    """One pass over the archive: check each entry, copy it, scan blobs that may be layers."""
    members: dict[str, str] = {}  # clean name -> kind (control, file, dir, link)
    control: dict[str, bytes] = {}
    blobs: dict[str, _Blob] = {}
    links: dict[str, str] = {}  # clean name -> clean target
    outer = decompressed(reader, Budget(max_bytes, "the archive"))  # docker load takes those
    entries = EntryBudget(MAX_IMAGE_ENTRIES, "the image's layers")
    with tarfile.open(fileobj=outer, mode="r|", tarinfo=BoundedTarInfo) as tar:
        for member in iterate(tar, MAX_ARCHIVE_MEMBERS, "the image archive"):
            name = _checked_member(member, members)
            if name in CONTROL_FILES:
                members[name] = "control"
                control[name] = _read_control(tar, member, name)
            elif member.isreg():
                members[name] = "file"
                blobs[name] = _copy_blob(tar, member, name, writer, budget, entries)
            elif member.isdir():
                members[name] = "dir"
                writer.header(name, tarfile.DIRTYPE)
            else:  # a symbolic link inside the archive (_checked_member refused the rest)
                members[name] = "link"
                links[name] = clean_name(posixpath.join(posixpath.dirname(name),
                                                        member.linkname))
                writer.header(name, tarfile.SYMTYPE, linkname=member.linkname)
    return members, control, blobs, links, budget


def _checked_member(member: tarfile.TarInfo, seen: dict[str, str]) -> str:
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts:
        raise ImageInvalid(f"the archive contains the unsafe path {member.name!r}")
    name = clean_name(member.name)
    if name in ("", "."):
        if member.isdir():
            return "."
        raise ImageInvalid(f"the archive contains an entry without a name: {member.name!r}")
    if is_sparse(member):  # expanded when copied and loaded: the archive's size bounds nothing
        raise ImageInvalid(f"the archive contains the sparse file {member.name!r}: create the "
                           "archive with `docker save`")
    if name in seen:
        raise ImageInvalid(f"the archive contains {name!r} twice: Docker would use one "
                           "copy and intake another")
    if name in CONTROL_FILES:
        if not member.isreg():
            raise ImageInvalid(f"the archive's {name} is not a regular file (a link or a "
                               "directory): create the archive with `docker save`")
        return name
    if member.isdev() or member.isfifo():
        raise ImageInvalid(f"the archive contains a device or pipe: {member.name!r}")
    if member.islnk():
        raise ImageInvalid(f"the archive contains a hard link: {member.name!r}")
    if member.issym():
        joined = posixpath.normpath(posixpath.join(posixpath.dirname(name), member.linkname))
        if member.linkname.startswith("/") or joined in (".", "..") or joined.startswith("../"):
            raise ImageInvalid(f"the archive contains a link leaving it: {member.name!r} -> "
                               f"{member.linkname!r}")
    elif not (member.isreg() or member.isdir()):
        raise ImageInvalid(f"the archive contains an entry of an unknown type: {member.name!r}")
    return name


def _read_control(tar: tarfile.TarFile, member: tarfile.TarInfo, name: str) -> bytes:
    if member.size > MAX_CONTROL_JSON:
        raise ImageInvalid(f"the archive's {name} is {member.size} bytes, more than the "
                           f"{MAX_CONTROL_JSON} allowed")
    return tar.extractfile(member).read(MAX_CONTROL_JSON + 1)


def _copy_blob(tar, member, name, writer: _CopyWriter, budget: Budget,
               entries: EntryBudget) -> _Blob:
    offset = writer.header(name, tarfile.REGTYPE, member.size)
    tee = _Tee(tar.extractfile(member), writer)
    head, stream = peek(tee, 512)
    blob = _Blob(offset, member.size)
    if not head.lstrip().startswith((b"{", b"[")):  # JSON is a config, anything else a layer
        blob.layer = scan_layer(stream, budget, entries)
    tee.drain()
    writer.pad()
    return blob


def _check_tree(members: dict[str, str], links: dict[str, str]) -> None:
    """No entry below a link or a file: extracting it would write through the link."""
    for name in members:
        parent = posixpath.dirname(name)
        while parent:
            if members.get(parent) in ("link", "file"):
                raise ImageInvalid(f"the archive's {name!r} lies below the "
                                   f"{members[parent]} {parent!r}")
            parent = posixpath.dirname(parent)


def _json(data: bytes, what: str):
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ImageInvalid(f"{what} is not valid JSON ({exc})") from None


def _json_object(data: bytes, what: str) -> dict:
    value = _json(data, what)
    if not isinstance(value, dict):
        raise ImageInvalid(f"{what} is a JSON {type(value).__name__}, an object was expected")
    return value


def _checked_manifest(control: dict[str, bytes]) -> tuple[dict, list[str]]:
    if "manifest.json" not in control:
        raise ImageInvalid("the archive has no manifest.json: create it with "
                           "`docker save IMAGE -o image.tar`")
    manifest = _json(control["manifest.json"], "the archive's manifest.json")
    if not isinstance(manifest, list) or not manifest:
        raise ImageInvalid("the archive's manifest.json is not a list of images: create it "
                           "with `docker save IMAGE -o image.tar`")
    if len(manifest) != 1:
        raise ImageInvalid(f"the archive holds {len(manifest)} images; submit exactly one")
    entry = manifest[0]
    if not isinstance(entry, dict):
        raise ImageInvalid(f"the manifest's image is a JSON {type(entry).__name__}, an "
                           "object with Config and Layers was expected")
    config, layers = entry.get("Config"), entry.get("Layers")
    if not isinstance(config, str) or not config:
        raise ImageInvalid("the manifest's image has no Config (a path in the archive)")
    if not isinstance(layers, list) or not all(isinstance(x, str) and x for x in layers):
        raise ImageInvalid("the manifest's Layers is not a list of paths in the archive")
    tags = entry.get("RepoTags") or []
    if not isinstance(tags, list):
        raise ImageInvalid("the manifest's RepoTags is not a list")
    return {"Config": config, "Layers": layers}, [t for t in tags if isinstance(t, str)]


def _repositories_tags(data: bytes | None) -> list[str]:
    """The tags a legacy `repositories` file asks for (it is never loaded: we drop it)."""
    if data is None:
        return []
    repositories = _json_object(data, "the archive's repositories file")
    tags = []
    for repository, named in repositories.items():
        if not isinstance(named, dict):
            raise ImageInvalid("the archive's repositories file is malformed (a repository "
                               "maps to something else than tags)")
        tags += [f"{repository}:{tag}" for tag in named]
    return tags


def _resolve(path: str, members: dict[str, str], links: dict[str, str], what: str) -> str:
    """A manifest path to the regular file it names, following the archive's own links."""
    name = clean_name(path)
    for _ in range(8):
        if members.get(name) != "link":
            break
        name = links[name]
    if members.get(name) != "file":
        raise ImageInvalid(f"the manifest names {what} {path!r} that is not a file of the "
                           "archive")
    return name


def _read_copy(copy: Path, blob: _Blob, bound: int, what: str) -> bytes:
    if blob.size > bound:
        raise ImageInvalid(f"{what} is {blob.size} bytes, more than the {bound} allowed")
    if blob.layer is not None:
        raise ImageInvalid(f"{what} is not JSON")
    with open(copy, "rb") as handle:
        handle.seek(blob.offset)
        return handle.read(blob.size)


def _layer_scans(entry: dict, config: dict, members, links, blobs) -> list[LayerScan]:
    diff_ids = (config.get("rootfs") or {}).get("diff_ids")
    if not isinstance(diff_ids, list):
        raise ImageInvalid("the image config has no rootfs.diff_ids")
    if len(diff_ids) != len(entry["Layers"]):
        raise ImageInvalid(f"the manifest lists {len(entry['Layers'])} layers, the config "
                           f"{len(diff_ids)}")
    scans = []
    for path, diff_id in zip(entry["Layers"], diff_ids, strict=True):
        scan = blobs[_resolve(path, members, links, "a layer")].layer
        if scan is None or scan.error:
            raise ImageInvalid(f"the layer {path!r} is " + (scan.error if scan else "not a tar"))
        if scan.diff_id != diff_id:
            raise ImageInvalid(f"the layer {path!r} has the digest {scan.diff_id}, the config "
                               f"says {diff_id}")
        scans.append(scan)
    return scans


def check_config(config: dict, node_arch: str) -> None:
    """The config's shape and what a node needs: its architecture, something to run,
    VOLUMEs it can cover. The user is decided by number (`image_user`)."""
    if not isinstance(config.get("architecture"), str) or not isinstance(
            config.get("os", "linux"), str):
        raise ImageInvalid("the image config names no architecture and os")
    architecture = config["architecture"]
    if architecture != node_arch:
        raise ImageInvalid(f"the image is built for {architecture}, but the nodes run "
                           f"{node_arch}: rebuild with --platform linux/{node_arch}")
    if config.get("os", "linux") != "linux":
        raise ImageInvalid(f"the image is for {config.get('os')}; a linux image is expected")
    settings = _settings(config)
    rootfs = config.get("rootfs")
    if rootfs is not None and not (isinstance(rootfs, dict) and isinstance(
            rootfs.get("diff_ids"), list) and all(isinstance(d, str) for d in rootfs["diff_ids"])):
        raise ImageInvalid("the image config's rootfs.diff_ids is not a list of digests")
    if not isinstance(settings.get("User") or "", str):
        raise ImageInvalid("the image config's User is not a string")
    user = (settings.get("User") or "").strip()
    name, _, group = user.partition(":")
    if name in ("", "root") or go_atoi(name) == 0:
        raise ImageInvalid(f"the image runs as root (USER {user!r} is uid 0): add a non-root "
                           "user to the Dockerfile (RUN useradd -u 1000 -m algorithm, then "
                           "USER 1000:1000)")
    if group == "root" or (group and go_atoi(group) == 0):
        raise ImageInvalid(f"the image runs as root (USER {user!r} is group id 0): give a "
                           "non-root group, e.g. USER 1000:1000")
    for key in ("Entrypoint", "Cmd"):
        value = settings.get(key)
        if value is not None and not (isinstance(value, list)
                                      and all(isinstance(v, str) for v in value)):
            raise ImageInvalid(f"the image config's {key} is not a list of strings")
    if not (settings.get("Entrypoint") or settings.get("Cmd")):
        raise ImageInvalid("the image has no ENTRYPOINT or CMD: the platform would not know "
                           "what to run")
    check_volumes(settings.get("Volumes"))
    problem = image_settings_problem(settings)
    if problem is not None:
        raise ImageInvalid(problem)


def _settings(config: dict) -> dict:
    settings = config.get("config")
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise ImageInvalid("the image config's `config` is not an object")
    return settings


def check_volumes(volumes) -> list[str]:
    """The image's VOLUMEs, cleaned. Each is covered by a size-limited tmpfs at run time,
    so none may be a path the sandbox mounts itself or a kernel file system."""
    if volumes is None:
        return []
    if not isinstance(volumes, dict):
        raise ImageInvalid("the image config's Volumes is not an object")
    if len(volumes) > MAX_VOLUMES:
        raise ImageInvalid(f"the image declares {len(volumes)} VOLUMEs; at most "
                           f"{MAX_VOLUMES} are allowed")
    cleaned = []
    for path in volumes:
        clean = cleaned_volume(path)
        if clean is None:
            raise ImageInvalid(f"the image declares VOLUME {path!r}: volumes must be absolute "
                               "paths outside /, /input, /output, /proc, /sys and /dev (each "
                               "becomes a small tmpfs; write results to /output)")
        cleaned.append(clean)
    return cleaned


def image_user(config: dict, scans: list[LayerScan]) -> ResolvedUser:
    """The image's USER as numbers, through its own /etc/passwd and /etc/group; root (uid 0,
    gid 0, or a member of group 0) is refused."""
    spec = (_settings(config).get("User") or "").strip()
    files = merge_account_files(scans)
    try:
        if numeric_pair(spec) is not None:  # both numbers: runc reads no file
            user = resolve_user(spec, None, None)
        else:
            user = resolve_user(spec, _account_text(files, "etc/passwd", spec),
                                _account_text(files, "etc/group", spec))
    except UserUnresolvable as exc:
        raise ImageInvalid(f"{exc}: use USER uid:gid with numbers, e.g. USER 1000:1000") \
            from None
    root = user.root_part()
    if root is not None:
        raise ImageInvalid(f"the image's USER {spec!r} runs with {root}: add a non-root user "
                           "and group (RUN useradd -u 1000 -m algorithm, then USER "
                           "1000:1000)")
    return user


def _account_text(files: dict, path: str, spec: str) -> str | None:
    value = files[path]
    if value == DELETED:
        return None
    if value == UNREADABLE:
        raise ImageInvalid(f"the image's /{path} is not a regular file of at most 1 MiB, so "
                           f"USER {spec!r} cannot be resolved: use USER uid:gid with numbers")
    return value.decode("utf-8", "replace")


def pin_tar(path: Path, client: docker.DockerClient, *, store: BlobStore,
            reference: str | None = None, max_bytes: int = DEFAULT_MAX_TAR_BYTES,
            max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, work_dir: Path | None = None,
            progress: Progress | None = None, load_progress: Progress | None = None,
            ) -> PinnedImage:
    """Check, load our own copy (unless the daemon already has this exact image), keep the
    copy in the store by its digest, and pin. `work_dir` on the store's file system lets
    the copy be moved into the store rather than copied."""
    scratch = Path(tempfile.mkdtemp(prefix="epreuve-intake-", dir=work_dir))
    try:
        copy = scratch / "image.tar"
        inspection = inspect_tar(path, max_bytes=max_bytes, max_image_bytes=max_image_bytes,
                                 progress=progress, copy_to=copy)
        image_id = inspection.image_id
        tags_before = _tag_targets(client, [*PROTECTED_TAGS, *inspection.named_tags])
        loaded = not _present(client, image_id)
        try:
            if loaded:
                _load(copy, client, load_progress)
            if not _present(client, image_id):
                raise ImageInvalid("the Docker Engine did not load the image the archive "
                                   "describes: create the archive with `docker save`")
            _check_tags_unmoved(client, tags_before, image_id)
            attributes = client.api.inspect_image(image_id)
            _check_read_alike(inspection.config, attributes)
        except ImageInvalid:
            if loaded:  # refused: nothing of it stays on the node
                with contextlib.suppress(docker.errors.APIError):
                    client.api.remove_image(image_id)
            raise
        archive_sha256 = _keep(copy, inspection.archive_sha256, store)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return PinnedImage(
        image_id=image_id,
        tar_sha256=inspection.tar_sha256,
        archive_sha256=archive_sha256,
        layers=list(inspection.config["rootfs"]["diff_ids"]),
        reference=reference or path.name,  # never the archive's own tags: they name nothing
        architecture=inspection.config["architecture"],
        user=inspection.user.spec,
        size_bytes=int(attributes.get("Size") or 0),
    )


def _keep(copy: Path, sha256: str, store: BlobStore) -> str:
    """The accepted copy into the store, under the digest computed while it was written."""
    try:
        return store.adopt(copy, sha256).sha256
    except (OSError, EpreuveError) as exc:
        raise ImageNotKept(f"the image was accepted, but the image store could not keep "
                           f"its archive ({exc}): nothing was submitted, try again later"
                           ) from exc


SETTINGS_DECIDED = ("User", "WorkingDir", "Env", "Entrypoint", "Cmd", "Volumes")


def _check_read_alike(config: dict, attributes: dict) -> None:
    """What intake decided on is what the Docker Engine read. Go matches JSON keys to
    fields regardless of case (`user`, even `Volumeſ`, set User and Volumes) and the last
    one wins: a config read one way here and another way there is refused."""
    settings, theirs = _settings(config), attributes.get("Config") or {}
    differing = [key for key in SETTINGS_DECIDED
                 if (settings.get(key) or None) != (theirs.get(key) or None)]
    if (attributes.get("Architecture"), attributes.get("Os") or "linux") != (
            config.get("architecture"), config.get("os") or "linux"):
        differing.append("architecture/os")
    if differing:
        raise ImageInvalid(f"the image config reads differently to the Docker Engine "
                           f"({', '.join(differing)}): a key is repeated or spelled in "
                           "another case; create the image with `docker build`")


def _present(client: docker.DockerClient, image_id: str) -> bool:
    try:
        return client.api.inspect_image(image_id)["Id"] == image_id
    except docker.errors.ImageNotFound:
        return False


def _tag_targets(client: docker.DockerClient, tags: list[str]) -> dict[str, str | None]:
    return tag_targets(client.api, tags)


def _check_tags_unmoved(client: docker.DockerClient, before: dict[str, str | None],
                        image_id: str) -> None:
    """Belt and braces: the copy we load names no tag, so no tag of the node may now point
    at the loaded image; one that does is put back where it was. (A tag moved elsewhere
    meanwhile is someone else's doing, e.g. a rebuild of the base image, and left alone.)"""
    moved = [tag for tag, target in before.items()
             if target != image_id and _tag_targets(client, [tag])[tag] == image_id]
    for tag in moved:
        put_back(client.api, tag, before[tag])
    if moved:
        raise ImageInvalid(f"the archive moved the node's tags {moved} (put back): refused")


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


def pin_evaluation_image(reference: str, client: docker.DockerClient | None = None) -> str:
    """The id of the organisers' image on this node, checked like a participant's config
    (architecture, something to run, not root by name or number, VOLUMEs)."""
    client = client or docker.DockerClient(
        base_url=os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock")
    try:
        attributes = client.api.inspect_image(reference)
    except docker.errors.ImageNotFound:
        raise EvaluationImageUnusable(
            f"the evaluation image {reference!r} is not on this node: load it (docker load) "
            "before creating the challenge; it is pinned by id when the challenge is created"
        ) from None
    except docker.errors.DockerException as exc:
        raise EvaluationImageUnusable(f"the evaluation image {reference!r} cannot be "
                                      f"inspected: {exc}") from None
    try:
        check_config({"architecture": attributes.get("Architecture"),
                      "os": attributes.get("Os") or "linux",
                      "config": attributes.get("Config") or {}}, node_architecture())
    except ImageInvalid as exc:
        raise EvaluationImageUnusable(f"the evaluation image {reference!r}: {exc}") from None
    return attributes["Id"]
