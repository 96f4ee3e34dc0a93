"""Sealed datasets: a test set whose every byte is accounted for, staged inputs-only.

Layout of a dataset directory:

    dataset.json                 optional description: name, task, modality, labels,
                                 classes, license, citation
    inputs/<case_id>/...         what the participant's container may see
    ground_truth/<case_id>/...   what only the scorer reads (segmentation), or
    ground_truth/labels.csv      case_id,label (classification)
    manifest.json                written by `seal`: every file with size and sha256,
                                 and per-case metadata

A DICOM image is one series in a subfolder: inputs/<case_id>/<series>/*.dcm (classic
slices, or one multi-frame file); slices lying flat in the case folder are refused.

The dataset's version is the sha256 of manifest.json. Sealing decodes every image
whole (a truncated or undecodable file is refused, naming the case and the file),
refuses any symbolic link, hard link or special file in the tree, and makes every
file read-only through a descriptor opened without following links, so nothing
outside the dataset is ever changed. `verify` names each added, missing or changed
file; it checks content only, so the hard links that staging makes while a job runs
do not fail it.

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
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.uid import UID

from engine.errors import EpreuveError
from engine.medio import MedioError, geometry_differences, is_image, read_header, read_volume
from engine.medio.dicom import transfer_syntax_name

MANIFEST = "manifest.json"
DESCRIPTION = "dataset.json"
MANIFEST_FORMAT = "epreuve-dataset/1"
LABELS_TABLE = "labels.csv"
CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# a classification label is a class a challenge names (challenges.py, output.classes): the
# same characters, so no formula (=, +, @), control character or space reaches a table
CLASS_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
HASH_CHUNK = 1 << 20
RELEASE_EXTRAS = ("DATA_CARD.md", "SHA256SUMS")  # written by `release` beside the manifest
MAX_RELEASE_EXTRA_BYTES = 64 << 20  # one line per file: a larger one is not ours
MAX_IMAGE_BYTES = 8 << 30  # a header declaring more is refused before its data is read
MAX_DESCRIPTION_BYTES = 1 << 20
MAX_DESCRIPTION_ENTRIES = 1000
DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
DESCRIPTION_TEXT = {"name": 100, "task": 20, "modality": 64, "license": 200,
                    "citation": 2000, "input": 200, "ground_truth": 200}  # longest allowed
DESCRIPTION_TABLES = ("labels", "classes")  # value -> meaning
_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_MANIFEST_BYTES = 256 << 20  # about a million files
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
DICOM_LAYOUT = "a DICOM case is one series in a subfolder: inputs/<case>/<series>/*.dcm"
# open a dataset file without following a link, and without blocking on a FIFO swapped in
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
DEFAULT_FULL_EVERY_SECONDS = 24 * 3600


class DatasetError(EpreuveError, ValueError):
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


def case_input_digests(manifest: dict) -> dict[str, str]:
    """Per case, in case order, one sha256 over its input files' paths and hashes: equal
    digests in two versions mean a container was given the same bytes for that case."""
    by_case: dict[str, list[str]] = {case["case_id"]: [] for case in manifest["cases"]}
    for entry in manifest["files"]:
        parts = entry["path"].split("/")
        if len(parts) > 2 and parts[0] == "inputs" and parts[1] in by_case:
            by_case[parts[1]].append(f"{entry['path']}\0{entry['sha256']}\n")
    return {case_id: hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()
            for case_id, lines in by_case.items()}


def load(root: Path) -> SealedDataset:
    """A sealed dataset as its manifest describes it (not verified: see `verify`)."""
    root = Path(root)
    manifest_path = root / MANIFEST
    try:
        st = os.lstat(manifest_path)
    except (FileNotFoundError, NotADirectoryError):
        raise DatasetError(f"{root} is not sealed: no {MANIFEST} (run `epreuve dataset seal`)") \
            from None
    if not stat.S_ISREG(st.st_mode):
        raise DatasetError(f"{manifest_path} is {_kind(st.st_mode)}, not the manifest seal "
                           "writes: seal the dataset again")
    return _parse_manifest(root, manifest_path.read_bytes())


def _parse_manifest(root: Path, data: bytes) -> SealedDataset:
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DatasetError(f"{root / MANIFEST} is not an Épreuve manifest ({MANIFEST_FORMAT})")
    problem = _manifest_problem(manifest)
    if problem:
        raise DatasetError(f"{root / MANIFEST} was not written by seal ({problem}): seal the "
                           "dataset again")
    return SealedDataset(root, hashlib.sha256(data).hexdigest(), manifest)


def _manifest_problem(manifest: dict) -> str | None:
    """Every name a manifest gives is joined to the dataset's root (staging, scoring, release):
    each must stay below it, whoever edited the file."""
    cases, files = manifest.get("cases"), manifest.get("files")
    if not isinstance(cases, list) or not isinstance(files, list):
        return "no list of cases and files"
    for case in cases:
        if not isinstance(case, dict) or not isinstance(case.get("case_id"), str) \
                or not CASE_ID.match(case["case_id"]):
            return f"case {str(case)[:60]!r} has no valid case id"
        images = [*(case.get("inputs") or []), case.get("ground_truth") or {"name": "x"}]
        for image in images:
            if not isinstance(image, dict) or not _inside(str(image.get("name", "")), parts=1):
                return f"case {case['case_id']!r}: image {str(image)[:60]!r} is no plain name"
    for entry in files:
        if not isinstance(entry, dict) or not _inside(str(entry.get("path", "")), parts=64):
            return f"file {str(entry)[:80]!r} is no path inside the dataset"
        size, digest = entry.get("size"), entry.get("sha256")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 \
                or not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            return f"file {entry['path'][:80]!r} has no size and sha256"
    return None


def _inside(rel: str, *, parts: int) -> bool:
    """A relative POSIX path of at most `parts` plain names: no '..', no root, no NUL."""
    names = rel.split("/")
    return 0 < len(names) <= parts and all(
        name not in ("", ".", "..") and "\x00" not in name and "\\" not in name
        and len(name.encode("utf-8", "surrogateescape")) <= 255 for name in names)


# -- the tree, never following a link ----------------------------------------------------


@dataclass(frozen=True)
class TreeEntry:
    rel: str  # posix path relative to the dataset root
    name: str  # the name within its directory
    dir_fd: int  # the open directory holding it: valid only while the walk is on it
    st: os.stat_result  # lstat: the entry itself, never a link's target


def walk_tree(root: Path) -> Iterator[TreeEntry]:
    """Every entry under `root` that is not a directory, in a stable order (each directory's
    entries before its subdirectories'), without following any link: directories are
    opened relative to their parent with O_NOFOLLOW, so a link swapped in is never entered."""
    top = os.path.realpath(root)  # the organiser may name the root through a link
    for dirpath, dirnames, filenames, dir_fd in os.fwalk(top, follow_symlinks=False,
                                                         onerror=_unreadable):
        base = Path(os.path.relpath(dirpath, top))
        subdirectories = []
        for name in sorted(dirnames + filenames):
            try:
                st = os.lstat(name, dir_fd=dir_fd)
            except FileNotFoundError:
                continue  # removed since the listing: as if never there
            if stat.S_ISDIR(st.st_mode):
                subdirectories.append(name)
            else:
                yield TreeEntry((base / name).as_posix(), name, dir_fd, st)
        dirnames[:] = subdirectories


def _unreadable(error: OSError) -> None:
    """A directory that cannot be listed is never silently left out of a seal or a check."""
    raise DatasetError(f"{error.filename} cannot be read: {error.strerror}")


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


def _tree_problems(root: Path) -> tuple[dict[str, os.stat_result], list[str]]:
    """The regular files of the tree by relative path, and every entry seal refuses."""
    files, problems = {}, []
    for entry in walk_tree(root):
        if not stat.S_ISREG(entry.st.st_mode):
            problems.append(f"{entry.rel} is {_kind(entry.st.st_mode)}: a dataset holds "
                            "regular files only (copy the data in)")
        elif entry.st.st_nlink != 1:
            problems.append(f"{entry.rel} has {entry.st.st_nlink} hard links: a dataset holds "
                            "files with one name only (copy it in instead of linking it; if a "
                            "job is running on this dataset, seal again once it has ended)")
        else:
            files[entry.rel] = entry.st
    return files, problems


def _open_regular(entry: TreeEntry) -> int:
    """A descriptor on this very entry: a regular file, not a link, as the walk saw it."""
    try:
        fd = os.open(entry.name, _OPEN_FLAGS, dir_fd=entry.dir_fd)
    except OSError as exc:
        raise DatasetError(f"{entry.rel} cannot be opened: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (entry.st.st_dev,
                                                                    entry.st.st_ino):
        os.close(fd)
        raise DatasetError(f"{entry.rel} was replaced while it was being read")
    return fd


def _hash_fd(fd: int) -> str:
    digest = hashlib.sha256()
    while chunk := os.read(fd, HASH_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


# -- sealing -----------------------------------------------------------------------------


def seal(root: Path) -> SealedDataset:
    """Check the dataset, write its manifest, make its files read-only. Refusals name the case.

    Order matters: links and special files are refused before any image is opened (an
    image reached through a link would be read from outside the dataset), every image is
    decoded whole before anything is written, and the files are hashed and made read-only
    through the same descriptors, opened without following links."""
    root = Path(root)
    scanned, problems = _tree_problems(root)
    if problems:
        raise _refusal(root, problems)
    description = _read_description(root)
    task = description.get("task", "segmentation")
    case_ids = _input_case_ids(root)
    labels = _read_labels(root) if task == "classification" else {}
    problems = _case_problems(root, case_ids, task, labels)
    if problems:
        raise _refusal(root, problems)
    cases = [_case_entry(root, case_id, task, labels, description) for case_id in case_ids]
    manifest = {
        "format": MANIFEST_FORMAT,
        "task": task,
        "description": description,
        "cases": [case.__dict__ for case in cases],
        "files": _hash_and_freeze(root, scanned),
    }
    _write_manifest(root, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return load(root)


def _refusal(root: Path, problems: list[str], shown: int = 20) -> DatasetError:
    listed = problems[:shown] + ([f"... and {len(problems) - shown} more"]
                                 if len(problems) > shown else [])
    return DatasetError("cannot seal " + str(root) + ":\n  " + "\n  ".join(listed))


def _hash_and_freeze(root: Path, scanned: dict[str, os.stat_result]) -> list[dict]:
    """Hash every file and drop its write bits through one descriptor (fchmod): a file
    that is no longer the one the scan saw, or that gained a name, is refused."""
    files, seen = [], set()
    for entry in walk_tree(root):
        if entry.rel == MANIFEST:
            continue
        if entry.rel not in scanned:
            raise DatasetError(f"{entry.rel} appeared while {root} was being sealed")
        fd = _open_regular(entry)
        try:
            st = os.fstat(fd)
            if st.st_nlink != 1:
                raise DatasetError(f"{entry.rel} gained a hard link while it was being sealed")
            digest = _hash_fd(fd)
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~0o222 | 0o444)
        finally:
            os.close(fd)
        files.append({"path": entry.rel, "size": st.st_size, "sha256": digest})
        seen.add(entry.rel)
    vanished = sorted(set(scanned) - seen - {MANIFEST})
    if vanished:
        raise DatasetError(f"{', '.join(vanished)} vanished while {root} was being sealed")
    return files


def _write_manifest(root: Path, text: str) -> None:
    """A fresh read-only file renamed over the old manifest: a link there is never followed."""
    fd, temporary = tempfile.mkstemp(dir=root, prefix=".manifest-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fchmod(handle.fileno(), 0o444)
        os.replace(temporary, root / MANIFEST)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _read_description(root: Path) -> dict:
    """dataset.json, checked whole: it names the release archive's folder and is printed in
    the data card and the CLI, so each field has a type, a length and no control character."""
    path = root / DESCRIPTION
    if not path.exists():
        return {}
    if not path.is_file():
        raise DatasetError(f"{path} is not a file: dataset.json is a JSON object")
    if path.stat().st_size > MAX_DESCRIPTION_BYTES:
        raise DatasetError(f"{path} is larger than {MAX_DESCRIPTION_BYTES} bytes")
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise DatasetError(f"{path} is nested too deeply to be a dataset description") \
            from None
    if not isinstance(description, dict):
        raise DatasetError(f"{path} must hold a JSON object (name, task, modality, ...)")
    problems = [f"{path}: {problem}" for problem in _description_problems(description)]
    if problems:
        raise DatasetError("\n".join(problems))
    return description


def _description_problems(description: dict) -> list[str]:
    problems = []
    for key, value in description.items():
        if key in DESCRIPTION_TEXT:
            problem = _text_problem(value, DESCRIPTION_TEXT[key])
        elif key in DESCRIPTION_TABLES:
            problem = _table_problem(value, integer_keys=key == "labels")
        else:
            problem = (f"is not a dataset.json field (known: "
                       f"{', '.join(sorted([*DESCRIPTION_TEXT, *DESCRIPTION_TABLES]))})")
        if problem:
            problems.append(f"{key[:40]!r} {problem}")
    name = description.get("name")
    if isinstance(name, str) and not _text_problem(name, 100) and not DATASET_NAME.match(name):
        problems.append(f"'name' {name[:60]!r} must be letters, digits, '.', '_', '-' (it "
                        "names the release archive's folder)")
    task = description.get("task", "segmentation")
    if task not in ("segmentation", "classification"):
        problems.append(f"task must be segmentation or classification, not {str(task)[:40]!r}")
    return problems


def _text_problem(value: object, limit: int) -> str | None:
    if not isinstance(value, str):
        return f"must be text, not {type(value).__name__}"
    if len(value) > limit:
        return f"is longer than {limit} characters"
    if _CONTROL.search(value):
        return "holds a control character (terminal escapes, NUL, line breaks)"
    return None


def _table_problem(value: object, *, integer_keys: bool) -> str | None:
    if not isinstance(value, dict) or len(value) > MAX_DESCRIPTION_ENTRIES:
        return f"must be an object of at most {MAX_DESCRIPTION_ENTRIES} entries (value: meaning)"
    for key, meaning in value.items():
        if integer_keys and not re.fullmatch(r"[0-9]{1,5}", key):
            return f"key {key[:40]!r} must be a label value (a whole number)"
        problem = _text_problem(key, 100) or _text_problem(meaning, 1000)
        if problem:
            return f"entry {key[:40]!r} {problem}"
    return None


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
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, strict=True)
            if not reader.fieldnames or not {"case_id", "label"} <= set(reader.fieldnames):
                raise DatasetError(f"{path} needs the columns case_id,label")
            if len(set(reader.fieldnames)) != len(reader.fieldnames):
                raise DatasetError(f"{path}: a column appears twice in {reader.fieldnames[:10]}")
            for line, row in enumerate(reader, start=2):
                case_id = (row["case_id"] or "").strip()
                if case_id in labels:
                    raise DatasetError(f"{path} line {line}: duplicate case id {case_id!r}")
                label = (row["label"] or "").strip()
                if label and not CLASS_LABEL.match(label):
                    raise DatasetError(f"{path} line {line}: label {label[:40]!r} is not a class "
                                       "name a challenge can score (letters, digits, '.', '_', "
                                       "'-', starting with a letter or digit; at most 64)")
                labels[case_id] = label
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path} is not a UTF-8 CSV table: {exc}") from None
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
        if not (root / "inputs" / case_id).is_dir():
            problems.append(f"inputs/{case_id} is a file: each case is a folder, "
                            "inputs/<case>/...")
            continue
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
    return problems


def _looks_like_dicom(path: Path) -> bool:
    """A DICOM file, whatever its name: 'DICM' after the 128-byte preamble."""
    with open(path, "rb") as handle:
        return handle.read(132)[128:] == b"DICM"


def _image_entries(directory: Path, case_id: str) -> list[Path]:
    """The images of a case: image files, and directories (one DICOM series each).

    DICOM slices directly in the case folder are refused: the folder would be read as
    one image per slice."""
    entries = sorted(p for p in directory.iterdir() if not p.name.startswith("."))
    flat = [p.name for p in entries if p.is_file() and (
        p.name.lower().endswith(".dcm") or _looks_like_dicom(p))]
    if flat:
        where = directory.relative_to(directory.parent.parent).as_posix()
        raise DatasetError(f"case {case_id!r}: {len(flat)} DICOM file(s) lie directly in "
                           f"{where}/ ({', '.join(flat[:3])}{', ...' if len(flat) > 3 else ''})"
                           f"; {DICOM_LAYOUT}")
    return [p for p in entries if p.is_dir() or is_image(p)]


def _case_entry(root: Path, case_id: str, task: str, labels: dict, description: dict) -> CaseEntry:
    images = _image_entries(root / "inputs" / case_id, case_id)
    if not images:
        raise DatasetError(f"case {case_id!r}: no image in inputs/{case_id}/")
    described = [_read_image(root, path, case_id) for path in images]
    inputs = [_describe_image(path, header, volume, description)
              for path, (header, volume) in zip(images, described, strict=True)]
    truth = None
    if task == "segmentation":
        masks = _image_entries(root / "ground_truth" / case_id, case_id)
        if len(masks) != 1:
            raise DatasetError(f"case {case_id!r}: expected one ground-truth image in "
                               f"ground_truth/{case_id}/, found {len(masks)}")
        header, volume = _read_image(root, masks[0], case_id)
        _check_label_map(root, masks[0], case_id, volume)
        truth = _describe_image(masks[0], header, volume, {"modality": "SEG"})
        mismatch = geometry_differences(header.geometry, described[0][0].geometry)
        if mismatch:
            raise DatasetError(f"case {case_id!r}: ground truth does not lie on the input's "
                               f"voxel grid: {'; '.join(mismatch)}")
    return CaseEntry(case_id, inputs, truth, labels.get(case_id))


def _read_image(root: Path, path: Path, case_id: str):
    """Header and whole voxel data: a file that only decodes halfway is refused here, not
    in a worker. The error names the case and the file."""
    rel = path.relative_to(root).as_posix()
    try:
        _check_metaimage_data_file(path)
        _check_gzip_stream(path)
        header = read_header(path)
        if header.declared_bytes > MAX_IMAGE_BYTES:
            raise MedioError(f"its header declares {header.declared_bytes} bytes of voxels "
                             f"(at most {MAX_IMAGE_BYTES})")
        volume = read_volume(path)
    except MedioError as exc:
        raise DatasetError(f"case {case_id!r}: {rel} cannot be read: {exc}") from None
    except Exception as exc:  # the readers' libraries raise many types for damaged data
        raise DatasetError(f"case {case_id!r}: {rel} cannot be read: "
                           f"{type(exc).__name__}: {exc}") from None
    if tuple(volume.array.shape) != tuple(header.geometry.shape):
        raise DatasetError(f"case {case_id!r}: {rel} decodes to {list(volume.array.shape)} "
                           f"voxels, its header declares {list(header.geometry.shape)}")
    return header, volume


def _check_gzip_stream(path: Path) -> None:
    """Inflate a .gz image to its end: readers stop once they have the voxels they need, so
    a damaged checksum or trailing member would pass them and fail a stricter reader."""
    if not path.name.lower().endswith(".gz"):
        return
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(HASH_CHUNK):
                pass
    except (OSError, EOFError, zlib.error) as exc:
        raise MedioError(f"its gzip stream is damaged ({exc})") from None


def _check_metaimage_data_file(path: Path) -> None:
    """A MetaImage header names its data file: it must be LOCAL (.mha) or a plain file name
    beside the header (.mhd), never a path that reaches elsewhere."""
    if not path.name.lower().endswith((".mha", ".mhd")):
        return
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)
    match = re.search(rb"^\s*ElementDataFile\s*=\s*(.*?)\s*$", head, re.MULTILINE)
    if match is None:
        raise MedioError("its header has no ElementDataFile")
    data_file = match.group(1).decode("utf-8", "replace")
    if data_file == "LOCAL":
        return
    if "/" in data_file or "\\" in data_file or data_file in ("", ".", "..") or \
            path.name.lower().endswith(".mha"):
        raise MedioError(f"ElementDataFile {data_file!r} must be LOCAL or the name of a file "
                         "beside the header")
    if not (path.parent / data_file).is_file():
        raise MedioError(f"its data file {data_file} is not beside it")


def _check_label_map(root: Path, path: Path, case_id: str, volume) -> None:
    values = np.asarray(volume.array)
    if values.dtype.kind == "f" and not (np.all(np.isfinite(values))
                                         and np.all(values == np.round(values))):
        raise DatasetError(f"case {case_id!r}: {path.relative_to(root).as_posix()} is not a "
                           "label map: it holds non-integer values")


def _describe_image(path: Path, header, volume, description: dict) -> dict:
    modality = header.modality if header.modality != "unknown" else description.get(
        "modality", "unknown")
    entry = {"name": path.name, "format": header.format, "modality": modality,
             "dtype": str(header.dtype), **header.geometry.describe()}
    syntaxes = volume.metadata.get("transfer_syntaxes")
    if syntaxes:  # what participants will receive: they decode it themselves
        entry["transfer_syntaxes"] = [{"uid": uid, "name": transfer_syntax_name(UID(uid))}
                                      for uid in syntaxes]
    return entry


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
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) and data.get("version") == version else {}

    def write(self, root: Path, version: str, fingerprints: dict, full_at: float) -> None:
        """Atomically: each writer fills its own temporary file, then renames it over the
        cache file, so verifications of one dataset running at once never share a file."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(root)
        fd, temporary = tempfile.mkstemp(dir=self.directory, prefix=f".{path.stem}-",
                                         suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump({"version": version, "full_at": full_at, "files": fingerprints},
                          handle)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def _fingerprint(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def verify(source: Path, *, cache: VerificationCache | None = None,
           full: bool = False) -> VerificationReport:
    """Compare a dataset directory, a released archive, or an extracted release with its
    manifest. Content only: a file's link count is not checked, since staging hard-links
    inputs into a job's directory while the job runs."""
    return _verify(Path(source), cache, full)[0]


def _verify(source: Path, cache: VerificationCache | None,
            full: bool) -> tuple[VerificationReport, SealedDataset | None]:
    """The report, and the dataset whose manifest it was checked against (None for an
    archive): a caller that goes on to use the dataset does not parse the manifest again."""
    if source.is_file() and source.name.endswith((".tar.gz", ".tgz", ".tar")):
        return verify_archive(source), None
    dataset = load(source)
    expected = dataset.files()
    remembered = cache.read(source, dataset.version) if cache else {}
    stale = not remembered or time.time() - remembered.get("full_at", 0) > (
        cache.full_every_seconds if cache else 0)
    full = full or stale or cache is None
    report = VerificationReport(dataset.version, full=full)
    fingerprints: dict[str, list[int]] = {}
    on_disk: set[str] = set()
    extras: dict[str, bytes] = {}
    for entry in walk_tree(source):
        rel = entry.rel
        if rel == MANIFEST:
            continue
        on_disk.add(rel)
        if not stat.S_ISREG(entry.st.st_mode):
            (report.changed if rel in expected else report.added).append(rel)
        elif rel not in expected:
            if rel in RELEASE_EXTRAS and entry.st.st_size <= MAX_RELEASE_EXTRA_BYTES:
                extras[rel] = _read_entry(entry)
            elif rel in RELEASE_EXTRAS:
                report.changed.append(rel)
            else:
                report.added.append(rel)
        elif not full and remembered.get("files", {}).get(rel) == _fingerprint(entry.st):
            fingerprints[rel] = _fingerprint(entry.st)
        else:
            report.hashed_files += 1
            if _entry_matches(entry, expected[rel]):
                fingerprints[rel] = _fingerprint(entry.st)
            else:
                report.changed.append(rel)
    report.missing = sorted(set(expected) - on_disk)
    report.changed += _release_extras_changed(dataset, extras)
    if cache is not None and report.ok:
        full_at = time.time() if full else remembered.get("full_at", time.time())
        cache.write(source, dataset.version, fingerprints, full_at)
    return report, dataset


def _read_entry(entry: TreeEntry) -> bytes:
    fd = _open_regular(entry)
    try:
        with os.fdopen(os.dup(fd), "rb") as handle:
            return handle.read()
    finally:
        os.close(fd)


def _entry_matches(entry: TreeEntry, expected: dict) -> bool:
    if entry.st.st_size != expected["size"]:
        return False
    try:
        fd = _open_regular(entry)
    except DatasetError:
        return False  # replaced under us: not the sealed file
    try:
        return _hash_fd(fd) == expected["sha256"]
    finally:
        os.close(fd)


def _release_extras_changed(dataset: SealedDataset, extras: dict[str, bytes]) -> list[str]:
    """A release's DATA_CARD.md and SHA256SUMS, where present, must be exactly what `release`
    writes for this manifest (the card's title aside: it names the folder released)."""
    changed = []
    for name in RELEASE_EXTRAS:
        if name in extras and extras[name] != _expected_extra(dataset, name, extras[name]):
            changed.append(name)
    return changed


def _expected_extra(dataset: SealedDataset, name: str, found: bytes) -> bytes:
    if name == "SHA256SUMS":
        return checksums(dataset).encode()
    title = found.decode("utf-8", "replace").split("\n", 1)[0].removeprefix("# ")
    return data_card(dataset, title=title).encode()


def _safe_member_name(name: str) -> str | None:
    parts = Path(name).parts
    if name.startswith("/") or ".." in parts or not parts:
        return None
    return "/".join(parts[1:])  # strip the archive's top-level directory


def verify_archive(archive: Path) -> VerificationReport:
    """Verify a released archive in one streaming pass, without unpacking it."""
    hashes: dict[str, tuple[int, str]] = {}
    extras: dict[str, bytes] = {}
    manifest_bytes = None
    unsafe = []
    try:
        with tarfile.open(archive, "r:*") as tar:
            top = None
            for member in tar:
                rel = _safe_member_name(member.name)
                if rel is None or member.issym() or member.islnk() or member.isdev():
                    unsafe.append(member.name)
                    continue
                if not member.isfile():
                    continue
                top = top or Path(member.name).parts[0]
                if Path(member.name).parts[0] != top:  # two trees: which one is the dataset?
                    unsafe.append(f"{member.name} (outside the archive's one top folder)")
                    continue
                if rel in hashes or rel in extras or (rel == MANIFEST and manifest_bytes):
                    # extraction keeps the last copy, a reader may take the first: refused
                    unsafe.append(f"{member.name} (given twice)")
                    continue
                handle = tar.extractfile(member)
                if rel == MANIFEST:
                    if member.size > MAX_MANIFEST_BYTES:
                        raise DatasetError(f"{archive.name}: its {MANIFEST} is larger than "
                                           f"{MAX_MANIFEST_BYTES} bytes")
                    manifest_bytes = handle.read()
                elif rel in RELEASE_EXTRAS:
                    extras[rel] = handle.read(MAX_RELEASE_EXTRA_BYTES + 1)
                else:
                    digest = hashlib.sha256()
                    while chunk := handle.read(HASH_CHUNK):
                        digest.update(chunk)
                    hashes[rel] = (member.size, digest.hexdigest())
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DatasetError(f"{archive.name} is not a readable release archive: {exc}") from None
    if manifest_bytes is None:
        raise DatasetError(f"{archive.name} holds no {MANIFEST}")
    dataset = _parse_manifest(Path(archive.name), manifest_bytes)
    report = VerificationReport(dataset.version)
    expected = {e["path"]: (e["size"], e["sha256"]) for e in dataset.manifest["files"]}
    report.added = sorted(set(hashes) - set(expected)) + unsafe
    report.missing = sorted(set(expected) - set(hashes))
    report.changed = sorted(rel for rel in set(hashes) & set(expected)
                            if hashes[rel] != expected[rel])
    report.changed += _release_extras_changed(dataset, extras)
    report.hashed_files = len(hashes)
    return report


def require_intact(root: Path, cache: VerificationCache | None = None) -> SealedDataset:
    """The dataset, or a DatasetError naming every file that no longer matches its seal."""
    report, dataset = _verify(Path(root), cache, False)
    if not report.ok:
        raise DatasetError(f"dataset {root} no longer matches its seal "
                           f"({report.version[:12]}):\n  " + "\n  ".join(report.lines()))
    return dataset if dataset is not None else load(root)


# -- staging -----------------------------------------------------------------------------


def stage(dataset: SealedDataset, case_ids: list[str], destination: Path) -> Path:
    """Build a container's /input: these cases' inputs and cases.json, never ground truth.

    Files are hard-linked (no bytes copied; sealed files are read-only) and copied only
    where the file system refuses a link (another device). cases.json tells each image's
    format and modality, and for DICOM its transfer syntaxes: what the container decodes."""
    if not case_ids:
        raise DatasetError("nothing to stage: no cases given")
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=False)
    listing = []
    for case_id in case_ids:
        case = dataset.case(case_id)
        files = stage_tree(dataset.root / "inputs" / case_id, destination / case_id)
        listing.append({"case_id": case_id, "files": files,
                        "images": [_staged_image(image) for image in case["inputs"]]})
    (destination / "cases.json").write_text(json.dumps({"cases": listing}, indent=1) + "\n")
    for directory in sorted((p for p in destination.rglob("*") if p.is_dir()), reverse=True):
        directory.chmod(0o555)
    destination.chmod(0o555)
    return destination


def _staged_image(image: dict) -> dict:
    keys = ("name", "format", "modality", "transfer_syntaxes")
    return {key: image[key] for key in keys if key in image}


def stage_tree(source: Path, target: Path) -> list[str]:
    """Hard-link (or, across devices, copy) every regular file under `source` into `target`.

    Links and special files are skipped, and a file is linked by its directory descriptor
    and name, never through a link: only regular files are ever staged."""
    files = []
    target.mkdir(parents=True, exist_ok=True)
    for entry in walk_tree(source):
        if not stat.S_ISREG(entry.st.st_mode):
            continue
        (target / entry.rel).parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(entry, target / entry.rel)
        files.append(entry.rel)
    return sorted(files)


def unstage(destination: Path) -> None:
    """Remove a staged /input (its directories were made read-only)."""
    destination = Path(destination)
    if not destination.exists():
        return
    for directory in [destination, *destination.rglob("*")]:
        if directory.is_dir() and not directory.is_symlink():
            directory.chmod(0o755)
    shutil.rmtree(destination)


def _link_or_copy(entry: TreeEntry, target: Path) -> None:
    try:
        os.link(entry.name, target, src_dir_fd=entry.dir_fd, follow_symlinks=False)
        return
    except OSError:
        pass  # another device: copy the bytes
    fd = _open_regular(entry)
    try:
        with os.fdopen(os.dup(fd), "rb") as source, open(target, "xb") as copy:
            shutil.copyfileobj(source, copy)
        os.chmod(target, 0o444)
    finally:
        os.close(fd)


# -- release -----------------------------------------------------------------------------


def release(root: Path, archive: Path) -> Path:
    """Package a sealed, intact dataset as open data: a reproducible .tar.gz with a data card."""
    dataset = require_intact(root)
    top = f"{_release_name(dataset)}-{dataset.version[:12]}"
    card = data_card(dataset).encode()
    sums = checksums(dataset).encode()
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


def _release_name(dataset: SealedDataset) -> str:
    """The archive's top folder: a plain name even from a manifest sealed before names were
    checked, so no member can climb out of the folder it is extracted into."""
    for name in (dataset.description.get("name"), dataset.root.resolve().name):
        if isinstance(name, str) and DATASET_NAME.match(name):
            return name
    return "dataset"


def _add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # reproducible: no dates, no owners
    tar.addfile(info, io.BytesIO(data))


def checksums(dataset: SealedDataset) -> str:
    """SHA256SUMS as `sha256sum -c` reads it."""
    return "".join(f"{e['sha256']}  {e['path']}\n" for e in dataset.manifest["files"])


def _syntax_line(cases: list[dict]) -> list[str]:
    names = sorted({syntax["name"] for case in cases for image in case["inputs"]
                    for syntax in image.get("transfer_syntaxes", [])})
    return [f"- DICOM transfer syntaxes: {', '.join(names)}"] if names else []


def data_card(dataset: SealedDataset, title: str | None = None) -> str:
    d = dataset.description
    cases = dataset.manifest["cases"]
    modalities = sorted({image["modality"] for case in cases for image in case["inputs"]})
    formats = sorted({image["format"] for case in cases for image in case["inputs"]})
    lines = [
        f"# {title or d.get('name', dataset.root.name)}", "",
        f"- Version (sha256 of manifest.json): `{dataset.version}`",
        f"- Task: {dataset.task}",
        f"- Cases: {len(cases)}",
        f"- Modalities: {', '.join(modalities)}; formats: {', '.join(formats)}",
        *_syntax_line(cases),
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


class DatasetVersionChanged(DatasetError):
    """The dataset was re-sealed after work was queued for its earlier version."""


def require_version(dataset: SealedDataset, expected: str, what: str) -> None:
    """Refuse to give `what` (queued for version `expected`) inputs of another version."""
    if dataset.version != expected:
        raise DatasetVersionChanged(
            f"{what} was queued for dataset version {expected[:12]}, but the phase's dataset "
            f"was re-sealed since (now {dataset.version[:12]}): it is not run against "
            "different inputs. The submission ends as the platform's failure, never counted "
            "against the team's quota, and needs a re-run: the team submits again")
