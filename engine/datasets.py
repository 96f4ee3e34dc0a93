"""Sealed datasets: a test set whose every byte is accounted for, staged inputs-only.

Layout of a dataset directory:

    dataset.json                 optional description: name, task, modality, labels,
                                 classes, license, citation
    inputs/<case_id>/...         what the participant's container may see
    ground_truth/<case_id>/...   what only the scorer reads (segmentation), or
    ground_truth/labels.csv      case_id,label (classification)
    manifest.json                written by `seal`: every file with size and sha256,
                                 and per-case metadata

The dataset's version is the sha256 of manifest.json. Sealing makes every file
read-only; `verify` names each added, missing or changed file.

Verifying a large test set before every run must not mean re-hashing it. A
`VerificationCache` remembers, per file, the (size, mtime, inode, ctime) seen when
its hash last matched. A file whose stat is unchanged is trusted; any other is
re-hashed. ctime cannot be set back by a user (every write and every chmod or
utime moves it), so restoring an old mtime after tampering does not fool the
cache. A full re-hash still happens when the last one is older than
`full_every` (a day by default), or on demand (`verify --full`).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from engine.medio import MedioError, geometry_differences, is_image, read_header

MANIFEST = "manifest.json"
DESCRIPTION = "dataset.json"
MANIFEST_FORMAT = "epreuve-dataset/1"
LABELS_TABLE = "labels.csv"
CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
HASH_CHUNK = 1 << 20
DEFAULT_FULL_EVERY_SECONDS = 24 * 3600


class DatasetError(ValueError):
    """The dataset cannot be sealed, verified or staged as it is; the message says why."""


# -- manifest ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseEntry:
    case_id: str
    inputs: list[dict]  # one per image: name, format, modality, shape, spacing, ...
    ground_truth: dict | None  # segmentation: the label map's name and geometry
    label: str | None  # classification: the class


@dataclass(frozen=True)
class SealedDataset:
    root: Path
    version: str
    manifest: dict

    @property
    def case_ids(self) -> list[str]:
        return [case["case_id"] for case in self.manifest["cases"]]

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def description(self) -> dict:
        return self.manifest.get("description", {})

    def case(self, case_id: str) -> dict:
        for case in self.manifest["cases"]:
            if case["case_id"] == case_id:
                return case
        raise DatasetError(f"case {case_id!r} is not in dataset {self.version[:12]}")

    def files(self) -> dict[str, dict]:
        return {entry["path"]: entry for entry in self.manifest["files"]}

    def ground_truth_path(self, case_id: str) -> Path:
        entry = self.case(case_id)["ground_truth"]
        if entry is None:
            raise DatasetError(f"case {case_id!r} has no ground-truth image")
        return self.root / "ground_truth" / case_id / entry["name"]

    def labels(self) -> dict[str, str]:
        return {case["case_id"]: case["label"] for case in self.manifest["cases"]
                if case.get("label") is not None}


def load(root: Path) -> SealedDataset:
    """A sealed dataset as its manifest describes it (not verified: see `verify`)."""
    root = Path(root)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise DatasetError(f"{root} is not sealed: no {MANIFEST} (run `epreuve dataset seal`)")
    data = manifest_path.read_bytes()
    manifest = json.loads(data)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DatasetError(f"{manifest_path} is not an Épreuve manifest ({MANIFEST_FORMAT})")
    return SealedDataset(root, hashlib.sha256(data).hexdigest(), manifest)


# -- sealing -----------------------------------------------------------------------------


def seal(root: Path) -> SealedDataset:
    """Check the dataset, write its manifest, make its files read-only. Refusals name the case."""
    root = Path(root)
    description = _read_description(root)
    task = description.get("task", "segmentation")
    case_ids = _input_case_ids(root)
    labels = _read_labels(root) if task == "classification" else {}
    problems = _case_problems(root, case_ids, task, labels)
    if problems:
        raise DatasetError("cannot seal " + str(root) + ":\n  " + "\n  ".join(problems))
    cases = [_case_entry(root, case_id, task, labels, description) for case_id in case_ids]
    files = [{"path": rel, "size": size, "sha256": digest}
             for rel, size, digest in _hash_tree(root)]
    manifest = {
        "format": MANIFEST_FORMAT,
        "task": task,
        "description": description,
        "cases": [case.__dict__ for case in cases],
        "files": files,
    }
    _make_read_only(root, [f["path"] for f in files])
    manifest_path = root / MANIFEST
    if manifest_path.exists():
        manifest_path.chmod(0o644)
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    manifest_path.chmod(0o444)
    return load(root)


def _read_description(root: Path) -> dict:
    path = root / DESCRIPTION
    if not path.exists():
        return {}
    try:
        description = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path} is not valid JSON: {exc}") from None
    task = description.get("task", "segmentation")
    if task not in ("segmentation", "classification"):
        raise DatasetError(f"{path}: task must be segmentation or classification, not {task!r}")
    return description


def _input_case_ids(root: Path) -> list[str]:
    inputs = root / "inputs"
    if not inputs.is_dir():
        raise DatasetError(f"{root} has no inputs/ directory")
    ids = sorted(p.name for p in inputs.iterdir() if not p.name.startswith("."))
    if not ids:
        raise DatasetError(f"{inputs} holds no cases")
    return ids


def _read_labels(root: Path) -> dict[str, str]:
    path = root / "ground_truth" / LABELS_TABLE
    if not path.is_file():
        raise DatasetError(f"classification dataset without ground_truth/{LABELS_TABLE}")
    labels: dict[str, str] = {}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"case_id", "label"} <= set(reader.fieldnames):
            raise DatasetError(f"{path} needs the columns case_id,label")
        for line, row in enumerate(reader, start=2):
            case_id = (row["case_id"] or "").strip()
            if case_id in labels:
                raise DatasetError(f"{path} line {line}: duplicate case id {case_id!r}")
            labels[case_id] = (row["label"] or "").strip()
    return labels


def _case_problems(root: Path, case_ids: list[str], task: str, labels: dict) -> list[str]:
    problems = []
    lowered: dict[str, str] = {}
    for case_id in case_ids:
        if not CASE_ID.match(case_id):
            problems.append(f"case {case_id!r}: ids are letters, digits, '.', '_', '-' "
                            "(at most 128, starting with a letter or digit)")
        if case_id.lower() in lowered:
            problems.append(f"case {case_id!r}: duplicate of {lowered[case_id.lower()]!r} "
                            "(ids must differ in more than letter case)")
        lowered[case_id.lower()] = case_id
        if task == "segmentation":
            truth = root / "ground_truth" / case_id
            if not truth.is_dir() or not any(truth.iterdir()):
                problems.append(f"case {case_id!r}: no ground truth in ground_truth/{case_id}/")
        elif labels.get(case_id, "") == "":
            problems.append(f"case {case_id!r}: no label in ground_truth/{LABELS_TABLE}")
    known = set(case_ids)
    if task == "segmentation" and (root / "ground_truth").is_dir():
        for extra in sorted(p.name for p in (root / "ground_truth").iterdir()):
            if extra not in known and not extra.startswith("."):
                problems.append(f"ground truth for case {extra!r}, which has no inputs")
    for extra in sorted(set(labels) - known):
        problems.append(f"label for case {extra!r}, which has no inputs")
    for path in root.rglob("*"):
        if path.is_symlink():
            problems.append(f"{path.relative_to(root)} is a symbolic link: datasets hold "
                            "regular files only")
    return problems


def _image_entries(directory: Path) -> list[Path]:
    """The images of a case: image files, and directories (DICOM series)."""
    entries = sorted(p for p in directory.iterdir() if not p.name.startswith("."))
    return [p for p in entries if p.is_dir() or is_image(p)]


def _case_entry(root: Path, case_id: str, task: str, labels: dict, description: dict) -> CaseEntry:
    images = _image_entries(root / "inputs" / case_id)
    if not images:
        raise DatasetError(f"case {case_id!r}: no image in inputs/{case_id}/")
    inputs = [_describe_image(path, case_id, description) for path in images]
    truth = None
    if task == "segmentation":
        masks = _image_entries(root / "ground_truth" / case_id)
        if len(masks) != 1:
            raise DatasetError(f"case {case_id!r}: expected one ground-truth image in "
                               f"ground_truth/{case_id}/, found {len(masks)}")
        truth = _describe_image(masks[0], case_id, {"modality": "SEG"})
        header = read_header(masks[0])
        first_input = read_header(images[0])
        mismatch = geometry_differences(header.geometry, first_input.geometry)
        if mismatch:
            raise DatasetError(f"case {case_id!r}: ground truth does not lie on the input's "
                               f"voxel grid: {'; '.join(mismatch)}")
    return CaseEntry(case_id, inputs, truth, labels.get(case_id))


def _describe_image(path: Path, case_id: str, description: dict) -> dict:
    try:
        header = read_header(path)
    except MedioError as exc:
        raise DatasetError(f"case {case_id!r}: {path.name} cannot be read: {exc}") from None
    modality = header.modality if header.modality != "unknown" else description.get(
        "modality", "unknown")
    return {"name": path.name, "format": header.format, "modality": modality,
            "dtype": str(header.dtype), **header.geometry.describe()}


def _walk_files(root: Path) -> Iterator[Path]:
    for directory, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(directory) / name
            if path.parent == root and name == MANIFEST:
                continue
            yield path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_tree(root: Path) -> list[tuple[str, int, str]]:
    return [(path.relative_to(root).as_posix(), path.stat().st_size, sha256_file(path))
            for path in _walk_files(root)]


def _make_read_only(root: Path, relative_paths: Iterable[str]) -> None:
    for rel in relative_paths:
        path = root / rel
        path.chmod(stat.S_IMODE(path.stat().st_mode) & ~0o222 | 0o444)


# -- verification ------------------------------------------------------------------------


@dataclass
class VerificationReport:
    version: str
    added: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    hashed_files: int = 0  # how many files were actually re-hashed
    full: bool = True

    @property
    def ok(self) -> bool:
        return not (self.added or self.missing or self.changed)

    def lines(self) -> list[str]:
        return ([f"added:   {p}" for p in self.added] + [f"missing: {p}" for p in self.missing]
                + [f"changed: {p}" for p in self.changed])


class VerificationCache:
    """Per-file stat fingerprints of the last successful hash, kept outside the dataset."""

    def __init__(self, directory: Path, full_every_seconds: float = DEFAULT_FULL_EVERY_SECONDS):
        self.directory = Path(directory)
        self.full_every_seconds = full_every_seconds

    def _path(self, root: Path) -> Path:
        key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:32]
        return self.directory / f"{key}.json"

    def read(self, root: Path, version: str) -> dict:
        try:
            data = json.loads(self._path(root).read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        return data if data.get("version") == version else {}

    def write(self, root: Path, version: str, fingerprints: dict, full_at: float) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(root)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"version": version, "full_at": full_at,
                                         "files": fingerprints}))
        temporary.replace(path)


def _fingerprint(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def verify(source: Path, *, cache: VerificationCache | None = None,
           full: bool = False) -> VerificationReport:
    """Compare a dataset directory (or a released archive) with its manifest."""
    source = Path(source)
    if source.is_file() and source.name.endswith((".tar.gz", ".tgz", ".tar")):
        return verify_archive(source)
    dataset = load(source)
    expected = dataset.files()
    remembered = cache.read(source, dataset.version) if cache else {}
    stale = not remembered or time.time() - remembered.get("full_at", 0) > (
        cache.full_every_seconds if cache else 0)
    full = full or stale or cache is None
    report = VerificationReport(dataset.version, full=full)
    fingerprints: dict[str, list[int]] = {}
    on_disk: set[str] = set()
    for path in _walk_files(source):
        rel = path.relative_to(source).as_posix()
        on_disk.add(rel)
        if path.is_symlink() or not path.is_file():
            report.changed.append(rel) if rel in expected else report.added.append(rel)
            continue
        if rel not in expected:
            report.added.append(rel)
            continue
        st = path.stat()
        fingerprint = _fingerprint(st)
        if not full and remembered.get("files", {}).get(rel) == fingerprint:
            fingerprints[rel] = fingerprint
            continue
        report.hashed_files += 1
        entry = expected[rel]
        if st.st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            report.changed.append(rel)
        else:
            fingerprints[rel] = fingerprint
    report.missing = sorted(set(expected) - on_disk)
    if cache is not None and report.ok:
        full_at = time.time() if full else remembered.get("full_at", time.time())
        cache.write(source, dataset.version, fingerprints, full_at)
    return report


def _safe_member_name(name: str) -> str | None:
    parts = Path(name).parts
    if name.startswith("/") or ".." in parts or not parts:
        return None
    return "/".join(parts[1:])  # strip the archive's top-level directory


def verify_archive(archive: Path) -> VerificationReport:
    """Verify a released archive in one streaming pass, without unpacking it."""
    hashes: dict[str, tuple[int, str]] = {}
    manifest_bytes = None
    unsafe = []
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            rel = _safe_member_name(member.name)
            if rel is None or member.issym() or member.islnk() or member.isdev():
                unsafe.append(member.name)
                continue
            if not member.isfile():
                continue
            handle = tar.extractfile(member)
            if rel == MANIFEST:
                manifest_bytes = handle.read()
                continue
            digest = hashlib.sha256()
            while chunk := handle.read(HASH_CHUNK):
                digest.update(chunk)
            hashes[rel] = (member.size, digest.hexdigest())
    if manifest_bytes is None:
        raise DatasetError(f"{archive.name} holds no {MANIFEST}")
    manifest = json.loads(manifest_bytes)
    report = VerificationReport(hashlib.sha256(manifest_bytes).hexdigest())
    expected = {e["path"]: (e["size"], e["sha256"]) for e in manifest["files"]}
    release_only = {"DATA_CARD.md", "SHA256SUMS"}
    report.added = sorted(set(hashes) - set(expected) - release_only) + unsafe
    report.missing = sorted(set(expected) - set(hashes))
    report.changed = sorted(rel for rel in set(hashes) & set(expected)
                            if hashes[rel] != expected[rel])
    report.hashed_files = len(hashes)
    return report


def require_intact(root: Path, cache: VerificationCache | None = None) -> SealedDataset:
    """The dataset, or a DatasetError naming every file that no longer matches its seal."""
    report = verify(root, cache=cache)
    if not report.ok:
        raise DatasetError(f"dataset {root} no longer matches its seal "
                           f"({report.version[:12]}):\n  " + "\n  ".join(report.lines()))
    return load(root)


# -- staging -----------------------------------------------------------------------------


def stage(dataset: SealedDataset, case_ids: list[str], destination: Path) -> Path:
    """Build a container's /input: these cases' inputs and cases.json, never ground truth.

    Files are hard-linked (no bytes copied; sealed files are read-only) and copied only
    where the file system refuses a link (another device)."""
    if not case_ids:
        raise DatasetError("nothing to stage: no cases given")
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=False)
    listing = []
    for case_id in case_ids:
        case = dataset.case(case_id)
        files = stage_tree(dataset.root / "inputs" / case_id, destination / case_id)
        listing.append({"case_id": case_id, "files": files,
                        "images": [{k: image[k] for k in ("name", "format", "modality")}
                                   for image in case["inputs"]]})
    (destination / "cases.json").write_text(json.dumps({"cases": listing}, indent=1) + "\n")
    for directory in sorted((p for p in destination.rglob("*") if p.is_dir()), reverse=True):
        directory.chmod(0o555)
    destination.chmod(0o555)
    return destination


def stage_tree(source: Path, target: Path) -> list[str]:
    """Hard-link (or, across devices, copy) every regular file under `source` into `target`.

    Links and special files are skipped: only regular files are ever staged."""
    files = []
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in Path(source).rglob("*")
                       if p.is_file() and not p.is_symlink()):
        rel = path.relative_to(source)
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(path, target / rel)
        files.append(rel.as_posix())
    return files


def unstage(destination: Path) -> None:
    """Remove a staged /input (its directories were made read-only)."""
    destination = Path(destination)
    if not destination.exists():
        return
    for directory in [destination, *destination.rglob("*")]:
        if directory.is_dir() and not directory.is_symlink():
            directory.chmod(0o755)
    shutil.rmtree(destination)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


# -- release -----------------------------------------------------------------------------


def release(root: Path, archive: Path) -> Path:
    """Package a sealed, intact dataset as open data: a reproducible .tar.gz with a data card."""
    dataset = require_intact(root)
    top = f"{dataset.description.get('name', root.name)}-{dataset.version[:12]}"
    card = data_card(dataset).encode()
    sums = "".join(f"{e['sha256']}  {e['path']}\n" for e in dataset.manifest["files"]).encode()
    archive.parent.mkdir(parents=True, exist_ok=True)
    # No file name and no mtime in the gzip header: the same dataset gives the same bytes.
    with open(archive, "wb") as raw, \
            gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as zipped, \
            tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in [MANIFEST, *(e["path"] for e in dataset.manifest["files"])]:
            _add_file(tar, f"{top}/{rel}", (root / rel).read_bytes())
        _add_file(tar, f"{top}/DATA_CARD.md", card)
        _add_file(tar, f"{top}/SHA256SUMS", sums)
    return archive


def _add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # reproducible: no dates, no owners
    tar.addfile(info, io.BytesIO(data))


def data_card(dataset: SealedDataset) -> str:
    d = dataset.description
    cases = dataset.manifest["cases"]
    modalities = sorted({image["modality"] for case in cases for image in case["inputs"]})
    formats = sorted({image["format"] for case in cases for image in case["inputs"]})
    lines = [
        f"# {d.get('name', dataset.root.name)}", "",
        f"- Version (sha256 of manifest.json): `{dataset.version}`",
        f"- Task: {dataset.task}",
        f"- Cases: {len(cases)}",
        f"- Modalities: {', '.join(modalities)}; formats: {', '.join(formats)}",
        f"- License: {d.get('license', 'not stated: ask the organisers before reuse')}",
        f"- Citation: {d.get('citation', 'not stated')}",
        f"- Files: {len(dataset.manifest['files'])}, checksums in SHA256SUMS and manifest.json",
        "",
    ]
    if "labels" in d:
        lines += ["## Labels", "", "| value | meaning |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(d["labels"].items(), key=lambda i: int(i[0]))]
        lines.append("")
    if "classes" in d:
        lines += ["## Classes", "", "| label | meaning |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(d["classes"].items())]
        counts: dict[str, int] = {}
        for case in cases:
            counts[case["label"]] = counts.get(case["label"], 0) + 1
        lines += ["", "Cases per class: " + ", ".join(f"{k}: {v}" for k, v in
                                                       sorted(counts.items())), ""]
    lines += ["## Verify", "", "    epreuve dataset verify <this archive>", ""]
    return "\n".join(lines)
