"""What travels between a remote node and the server, as plain data (no database here).

A `JobTicket` and a `RunResult` as JSON; an attempt's fence as two headers; a job's
outputs as one tar stream. The server reads the tar as the hostile bytes it may be: only
directories and regular files, relative names without `..`, bounded counts and sizes, a
total within the phase's output quota; anything else is refused (`OutputsRefused`, with
its FailureReason) before a byte is written, and nothing is ever extracted through a link.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from engine.errors import EpreuveError
from engine.evaluation import SandboxLimits
from engine.worker.protocol import JobTicket
from runners.base import FailureReason, RunResult, RunStatus

ATTEMPT_HEADER = "Epreuve-Attempt"
ATTEMPT_TOKEN_HEADER = "Epreuve-Attempt-Token"
# on a claim that found nothing: how many of the node's reported runs are being scored
AWAITING_SCORING_HEADER = "Epreuve-Awaiting-Scoring"
MAX_OUTPUT_FILES = 10_000  # regular files in one upload
MAX_OUTPUT_DEPTH = 32
MAX_NAME_BYTES = 1024
TAR_OVERHEAD = 1024  # header plus padding per member, at most (ustar, no pax extensions)
MAX_TEXT = 1 << 20  # a result's longest text field (log tail, detail)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class OutputsRefused(EpreuveError):
    """An outputs upload that is not a plain tree within its quota: nothing was kept."""

    def __init__(self, reason: FailureReason, message: str):
        super().__init__(message)
        self.reason = reason


# -- tickets and results -------------------------------------------------------------------


def ticket_to_json(ticket: JobTicket) -> dict[str, Any]:
    """The ticket a remote node gets: the server's dataset path stays on the server."""
    return {
        "job_id": ticket.job_id, "attempt": ticket.attempt, "kind": ticket.kind,
        "submission_id": ticket.submission_id, "case_ids": list(ticket.case_ids),
        "image_id": ticket.image_id, "image_user": ticket.image_user,
        "image_archive_sha256": ticket.image_archive_sha256,
        "limits": vars(ticket.limits), "gpus": ticket.gpus,
        "dataset_version": ticket.dataset_version, "labels": dict(ticket.labels),
    }


def ticket_from_json(data: Mapping[str, Any]) -> JobTicket:
    return JobTicket(
        job_id=int(data["job_id"]), attempt=int(data["attempt"]), kind=str(data["kind"]),
        submission_id=int(data["submission_id"]),
        case_ids=tuple(str(case) for case in data["case_ids"]),
        image_id=str(data["image_id"]), image_user=data.get("image_user"),
        image_archive_sha256=data.get("image_archive_sha256"),
        limits=SandboxLimits(**data["limits"]), gpus=int(data["gpus"]),
        dataset_path="", dataset_version=str(data["dataset_version"]),
        labels={str(k): str(v) for k, v in dict(data.get("labels") or {}).items()})


def result_from_json(data: Mapping[str, Any]) -> RunResult:
    """A node's RunResult, rebuilt field by field (unknown keys dropped, texts bounded)."""
    known = set(RunResult.__dataclass_fields__)
    values = {key: value for key, value in data.items() if key in known}
    values["status"] = RunStatus(values["status"])
    values["reason"] = None if values.get("reason") is None else FailureReason(values["reason"])
    for key in ("started_at", "finished_at"):
        if values.get(key):
            values[key] = datetime.fromisoformat(str(values[key]))
    for key in ("message", "log_tail", "detail"):
        if key in values:
            values[key] = str(values[key])[-MAX_TEXT:]
    values["skipped_outputs"] = [str(s)[:MAX_NAME_BYTES]
                                 for s in list(values.get("skipped_outputs") or [])[:1000]]
    return RunResult(**values)


# -- outputs ------------------------------------------------------------------------------


def pack_outputs(output_dir: Path, archive: Path) -> Path:
    """The node's collected outputs as one tar (regular files and directories only: the
    runner's collection never copies anything else)."""
    with tarfile.open(archive, "w", format=tarfile.USTAR_FORMAT) as tar:
        if output_dir.is_dir():
            for path in sorted(output_dir.rglob("*")):
                if path.is_symlink() or not (path.is_dir() or path.is_file()):
                    continue
                tar.add(path, arcname=path.relative_to(output_dir).as_posix(), recursive=False)
    return archive


def upload_cap(quota: int) -> int:
    """The most bytes an outputs upload within `quota` can take as a tar."""
    return quota + MAX_OUTPUT_FILES * TAR_OVERHEAD + (1 << 20)


def extract_outputs(source: BinaryIO, target: Path, quota: int) -> int:
    """Check every member of the tar in `source` (seekable), then write the tree under
    `target` (which must not exist). Returns the number of files written."""
    try:
        with tarfile.open(fileobj=source, mode="r:") as tar:
            members = tar.getmembers()
            files = _checked(members, quota)
            target.mkdir(parents=True)
            for member in members:
                _write_member(tar, member, target)
    except tarfile.TarError as exc:
        raise OutputsRefused(FailureReason.OUTPUT_INVALID,
                             f"the outputs upload is not a readable tar: {exc}") from None
    except OSError as exc:  # a name given twice, a file where a directory goes
        raise OutputsRefused(FailureReason.OUTPUT_INVALID,
                             f"the outputs upload names one path twice: {exc.strerror}") from None
    return files


def _checked(members: list[tarfile.TarInfo], quota: int) -> int:
    if len(members) > MAX_OUTPUT_FILES:
        raise OutputsRefused(FailureReason.OUTPUT_INVALID,
                             f"more than {MAX_OUTPUT_FILES} entries in the outputs")
    total, files = 0, 0
    for member in members:
        problem = _name_problem(member.name)
        if problem:
            raise OutputsRefused(FailureReason.OUTPUT_INVALID, problem)
        if not (member.isdir() or member.isreg()):
            raise OutputsRefused(FailureReason.OUTPUT_INVALID,
                                 f"{member.name[:200]!r} is a link or special file: only "
                                 "regular files and directories are accepted")
        if member.isreg():
            files += 1
            total += member.size
            if total > quota:
                raise OutputsRefused(FailureReason.OUTPUT_QUOTA,
                                     f"the outputs exceed the phase's quota of {quota} bytes")
    return files


def _name_problem(name: str) -> str | None:
    shown = repr(name[:200])
    parts = name.rstrip("/").split("/")
    if not name or name.startswith("/") or len(name.encode()) > MAX_NAME_BYTES:
        return f"{shown}: an absolute, empty or overlong name"
    if any(part in ("", ".", "..") for part in parts) or _CONTROL.search(name):
        return f"{shown}: a name with '..', '.', an empty part or a control character"
    if len(parts) > MAX_OUTPUT_DEPTH:
        return f"{shown}: deeper than {MAX_OUTPUT_DEPTH} levels"
    return None


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    """Directories we made ourselves, files created new (O_EXCL, O_NOFOLLOW): a name can
    never lead outside `target`, nor through a link (there are none in it)."""
    path = target.joinpath(*member.name.rstrip("/").split("/"))
    if member.isdir():
        path.mkdir(parents=True, exist_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    source = tar.extractfile(member)
    assert source is not None  # a regular member
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    with os.fdopen(fd, "wb") as out, source:
        remaining = member.size
        while remaining > 0:
            chunk = source.read(min(remaining, 1 << 20))
            if not chunk:
                break
            out.write(chunk)
            remaining -= len(chunk)
