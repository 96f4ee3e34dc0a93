"""A submission's reproduction bundle: everything to re-run it on a machine with no server.

`epreuve export SUBMISSION --to bundle.tar` writes one plain tar of flat, fixed names:

    image.tar        the image as intake kept it (tag-free `docker save`, from the store)
    challenge.json   the challenge definition as registered
    manifest.json    the sealed dataset's manifest (its sha256 is the dataset version);
                     not the data: the reviewer brings the release (`dataset release`)
    submission.json  the submission: team, phase, image (id, tar and archive sha256,
                     layers, user), dataset version, cases
    runs.json        each container run: its cases, its RunSpec, its recorded run result
                     (with the provenance, where the job recorded it)
    results.json     per-case results (validity, metrics, output sha256) and aggregates
    SHA256SUMS       `sha256sum -c` of every other member

`open_bundle` reads one as hostile bytes: only these names, only regular files, each at
most its size limit, each once; every byte hashed while it is copied out and checked
against SHA256SUMS, which must list exactly the other members. Anything else is refused
before the image is loaded or anything is run.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from engine.challenges import Challenge
from engine.datasets import MANIFEST
from engine.errors import EpreuveError, NotFound
from engine.image_presence import ensure_image
from engine.reproduce import (
    REPLAYED,
    Comparison,
    RecordedRun,
    ReproductionRefused,
    Shard,
    compare,
    dataset_for,
    gpus_needed,
    local_gpus,
    recorded_run,
    rerun,
)
from engine.store import BlobStore, DirectoryStore
from runners.base import Runner

BUNDLE_FORMAT = 1
IMAGE, SUMS = "image.tar", "SHA256SUMS"
MAX_JSON_BYTES = 64 << 20
MAX_IMAGE_BYTES = 256 << 30
LIMITS = {IMAGE: MAX_IMAGE_BYTES, "challenge.json": MAX_JSON_BYTES, MANIFEST: MAX_JSON_BYTES,
          "submission.json": MAX_JSON_BYTES, "runs.json": MAX_JSON_BYTES,
          "results.json": MAX_JSON_BYTES, SUMS: 1 << 20}
MEMBERS = tuple(LIMITS)
SUM_LINE = re.compile(r"([0-9a-f]{64})  (\S+)")
CHUNK = 1 << 20


class BundleRefused(EpreuveError):
    """A bundle that is not what `export` wrote: changed, incomplete, or unsafe."""


# -- export --------------------------------------------------------------------------------

def export_bundle(session: Session, store: BlobStore, submission_id: int, target: Path) -> Path:
    """Write the bundle of a finished submission to `target` (replaced whole, or not at all)."""
    from engine.db.models import AggregateRow, JobRow, SubmissionRow

    run = recorded_run(session, submission_id)
    submission = session.get(SubmissionRow, submission_id)
    image = submission.image
    manifest = _manifest_of(Path(submission.phase.dataset_path), run)
    if not image.archive_sha256 or not store.has(image.archive_sha256):
        raise NotFound(f"the image of submission {submission_id} is not in the image store "
                       "(accepted before the store existed, or removed): it cannot be exported")
    aggregates = {a.metric: a.summary for a in session.scalars(
        select(AggregateRow).where(AggregateRow.submission_id == submission_id))}
    jobs = {job.id: job for job in session.scalars(
        select(JobRow).where(JobRow.submission_id == submission_id))}
    documents = {
        "challenge.json": submission.phase.challenge.definition,
        MANIFEST: None,
        "submission.json": {
            "format": BUNDLE_FORMAT, "submission_id": submission.id, "team": run.team,
            "challenge": submission.phase.challenge_id, "phase": run.phase,
            "definition_sha256": submission.phase.challenge.definition_sha256,
            "dataset_version": run.dataset_version, "case_ids": list(submission.case_ids),
            "image": {"image_id": image.image_id, "tar_sha256": image.tar_sha256,
                      "archive_sha256": image.archive_sha256, "layers": list(image.layers),
                      "user": image.user, "reference": image.reference},
            "finished_at": submission.finished_at.isoformat() if submission.finished_at
            else None},
        "runs.json": [{"job_id": s.job_id, "case_ids": s.case_ids, "gpus": s.gpus,
                       "run_spec": s.spec, "run_result": jobs[s.job_id].run_result}
                      for s in run.shards],
        "results.json": {"cases": run.results, "aggregates": aggregates},
    }
    data = {name: json.dumps(value, indent=1, sort_keys=True).encode() + b"\n"
            for name, value in documents.items() if value is not None}
    data[MANIFEST] = manifest
    sums = {name: hashlib.sha256(body).hexdigest() for name, body in data.items()}
    sums[IMAGE] = image.archive_sha256
    data[SUMS] = "".join(f"{sums[name]}  {name}\n" for name in MEMBERS if name != SUMS).encode()
    target = Path(target)
    partial = target.with_name(target.name + ".partial")
    with open(partial, "wb") as raw, tarfile.open(fileobj=raw, mode="w",
                                                  format=tarfile.PAX_FORMAT) as tar:
        with store.open(image.archive_sha256) as source:
            _add(tar, IMAGE, source, store.size(image.archive_sha256))
        for name in MEMBERS[1:]:
            _add(tar, name, io.BytesIO(data[name]), len(data[name]))
    partial.replace(target)
    return target


def _manifest_of(root: Path, run: RecordedRun) -> bytes:
    try:
        manifest = (root / MANIFEST).read_bytes()
    except OSError as exc:
        raise NotFound(f"the phase's dataset manifest cannot be read: {exc.strerror}") from None
    if hashlib.sha256(manifest).hexdigest() != run.dataset_version:
        raise ReproductionRefused(
            f"the phase's dataset was re-sealed since submission {run.submission_id} ran "
            f"(on version {run.dataset_version[:12]}): its manifest is no longer here to "
            "export. Export the submissions of the current version, or restore that version")
    return manifest


def _add(tar: tarfile.TarFile, name: str, source, size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o444, 0  # no dates, no owners
    tar.addfile(info, source)


# -- reading a bundle (hostile bytes) ------------------------------------------------------

@dataclass
class Bundle:
    directory: Path  # the members, copied out and verified
    run: RecordedRun
    submission: dict[str, Any]
    store: BlobStore  # holds the image's archive, under its sha256

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST


def open_bundle(path: Path, into: Path) -> Bundle:
    """Copy the members of a bundle into `into` (an empty directory), verified; refused
    (BundleRefused) if it is not exactly what `export` writes."""
    into.mkdir(parents=True, exist_ok=True)
    hashes = _extract(Path(path), into)
    _check_sums(hashes, (into / SUMS).read_text(encoding="ascii", errors="replace"))
    documents = {name: _json(into / name) for name in MEMBERS if name.endswith(".json")}
    submission = documents["submission.json"]
    run = _recorded(documents, hashes)
    store = DirectoryStore(into / "store")
    store.adopt(into / IMAGE, hashes[IMAGE])
    return Bundle(into, run, submission, store)


def _extract(path: Path, into: Path) -> dict[str, str]:
    hashes: dict[str, str] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                _check_member(member, hashes)
                hashes[member.name] = _copy_out(tar, member, into / member.name)
    except (tarfile.TarError, EOFError) as exc:
        raise BundleRefused(f"{path.name} is not a readable bundle (a tar): {exc}") from None
    except OSError as exc:
        raise BundleRefused(f"{path.name} cannot be read: {exc.strerror or exc}") from None
    missing = [name for name in MEMBERS if name not in hashes]
    if missing:
        raise BundleRefused(f"{path.name} lacks {', '.join(missing)}: not a whole bundle")
    return hashes


def _check_member(member: tarfile.TarInfo, seen: Mapping[str, str]) -> None:
    name = member.name
    if name not in LIMITS:
        raise BundleRefused(f"the bundle holds {name!r}, which a bundle never holds "
                            f"(only {', '.join(MEMBERS)}): refused")
    if not member.isreg():
        raise BundleRefused(f"the bundle's {name} is not a regular file (a link or a "
                            "device): refused")
    if name in seen:
        raise BundleRefused(f"the bundle holds {name} twice: refused")
    if member.size > LIMITS[name]:
        raise BundleRefused(f"the bundle's {name} is larger than {LIMITS[name]} bytes")


def _copy_out(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> str:
    digest, left = hashlib.sha256(), member.size
    source = tar.extractfile(member)
    with open(target, "xb") as out:
        while left > 0 and (chunk := source.read(min(CHUNK, left))):
            digest.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    if left:
        raise BundleRefused(f"the bundle's {member.name} is cut short")
    return digest.hexdigest()


def _check_sums(hashes: Mapping[str, str], text: str) -> None:
    listed = {}
    for line in text.splitlines():
        match = SUM_LINE.fullmatch(line)
        if match is None or match.group(2) not in LIMITS or match.group(2) == SUMS:
            raise BundleRefused(f"SHA256SUMS has a line that is not `<sha256>  <member>`: "
                                f"{line[:100]!r}")
        listed[match.group(2)] = match.group(1)
    unlisted = [name for name in MEMBERS if name != SUMS and name not in listed]
    if unlisted:
        raise BundleRefused(f"SHA256SUMS does not list {', '.join(unlisted)}")
    changed = [name for name, sha in listed.items() if hashes[name] != sha]
    if changed:
        raise BundleRefused(f"the bundle's {', '.join(changed)} changed since it was "
                            "exported (SHA256SUMS does not match): refused, nothing was run")


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleRefused(f"the bundle's {path.name} is not JSON: {exc}") from None


def _recorded(documents: Mapping[str, Any], hashes: Mapping[str, str]) -> RecordedRun:
    """The bundle's record as a RecordedRun, every field checked for its type."""
    try:
        submission, results = documents["submission.json"], documents["results.json"]
        challenge = Challenge.model_validate(documents["challenge.json"],
                                             context={"stored": True})
        image = submission["image"]
        if image["archive_sha256"] != hashes[IMAGE]:
            raise BundleRefused("the bundle's image.tar is not the image the submission "
                                "names (its sha256 differs): refused")
        if submission["dataset_version"] != hashes[MANIFEST]:
            raise BundleRefused("the bundle's manifest.json is not the dataset version the "
                                "submission ran on: refused")
        shards = [Shard([_text(c) for c in run["case_ids"]], _spec(run["run_spec"]),
                        int(run["gpus"])) for run in documents["runs.json"]]
        cases = {_text(case_id): {"valid": bool(c["valid"]), "reason": c["reason"],
                                  "metrics": dict(c["metrics"]),
                                  "output_sha256": dict(c["output_sha256"])}
                 for case_id, c in results["cases"].items()}
        return RecordedRun(
            submission_id=int(submission["submission_id"]), team=_text(submission["team"]),
            challenge=challenge, phase=_text(submission["phase"]),
            image_id=_text(image["image_id"]), archive_sha256=hashes[IMAGE],
            dataset_version=hashes[MANIFEST], shards=shards, results=cases)
    except BundleRefused:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BundleRefused(f"the bundle's record is not what export writes: {exc}") from None


def _text(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 300:
        raise BundleRefused(f"the bundle holds {str(value)[:60]!r} where a name belongs")
    return value


def _spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Only the sandbox's fields (REPLAYED), of the types a RunSpec takes."""
    fields = {}
    for name in REPLAYED:
        if name not in spec:
            continue
        value = spec[name]
        if name == "user":
            if value is not None and not re.fullmatch(r"\d{1,10}:\d{1,10}", str(value)):
                raise BundleRefused(f"the bundle's run spec names the user {value!r}: only "
                                    "a numeric uid:gid is replayed")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise BundleRefused(f"the bundle's run spec has {name} = {value!r}: not a number")
        fields[name] = value
    return fields


# -- reproducing from a bundle (no server, no database) ------------------------------------

def released_dataset_root(data: Path) -> Path:
    """The dataset in `data`: the release's folder itself, or the one folder a release
    archive was extracted into."""
    data = Path(data)
    if (data / MANIFEST).is_file():
        return data
    folders = [p for p in data.iterdir() if p.is_dir() and (p / MANIFEST).is_file()] \
        if data.is_dir() else []
    if len(folders) != 1:
        raise NotFound(f"{data} holds no released dataset: extract the release of the "
                       "challenge's dataset (`tar xzf RELEASE.tar.gz -C DIR`) and pass DIR")
    return folders[0]


def reproduce_bundle(path: Path, data: Path, runner: Runner, work_dir: Path, *,
                     built_image: str | None = None) -> tuple[Comparison, Bundle]:
    """Re-run a bundle's image (or `built_image`) on the released dataset in `data`:
    the same per-case comparison as on the platform, with no database. (comparison, bundle)"""
    work_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="bundle-", dir=work_dir))
    try:
        bundle = open_bundle(path, scratch / "bundle")
        run = bundle.run
        dataset = dataset_for(released_dataset_root(data), run)
        if built_image is None:
            ensure_image(runner, bundle.store, run.image_id, run.archive_sha256)
        reproduced, _ = rerun(run, dataset, runner, built_image or run.image_id,
                              scratch / "runs", gpu_uuids=local_gpus(gpus_needed(run)))
        return compare(run.challenge, run.results, reproduced), bundle
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
