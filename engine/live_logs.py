"""The live log of a running job: what its container wrote so far, kept on the server.

A node sends the container's log in chunks while it runs (runners/log_stream.py: bounded
in size and rate); a remote node through POST /api/v1/worker/jobs/{id}/logs, a local
worker through DbCoordinator.log. Both land here, one file per attempt:

    <state dir>/worker-logs/job-<job id>-<attempt>.log

The text is hostile participant output, and a remote node's request is not trusted to
have rendered it: every chunk is rendered again on the way in (runners/logs.shown: no
control character but newline and tab) and the file is capped per attempt (beyond, chunks
are dropped and the caller told). The pages read only its tail, rendered once more (a
cut may split a character), and escape it like any other text.

The pages read the live log of a job's current attempt only while the job is in hand;
once it moved on, the recorded tail (its run result) is what they show. So the sweep
(`DbCoordinator.maintenance`) removes the logs of other attempts once unwritten for an
hour: without it, every attempt ever run would keep up to MAX_LOG_BYTES on the server.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from engine.db.models import JobRow
from engine.statuses import ACTIVE_JOB_STATES
from runners.logs import shown

MAX_LOG_BYTES = 4 << 20  # kept per attempt; beyond, chunks are dropped
TAIL_BYTES = 16 << 10  # the most a page reads of it
IDLE_BEFORE_PRUNED = 3600.0  # seconds unwritten before the log of an attempt not in hand goes
log = logging.getLogger(__name__)
_LOG_NAME = re.compile(r"job-(\d+)-(\d+)\.log")


def log_path(state_dir: Path, job_id: int, attempt: int) -> Path:
    return Path(state_dir) / "worker-logs" / f"job-{int(job_id)}-{int(attempt)}.log"


def append(state_dir: Path, job_id: int, attempt: int, text: str, *,
           max_bytes: int = MAX_LOG_BYTES) -> bool:
    """Keep a chunk of the attempt's log; False when the attempt's log is full (dropped)."""
    path = log_path(state_dir, job_id, attempt)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = shown(text).encode("utf-8", errors="replace")
    kept = path.stat().st_size if path.exists() else 0
    if kept + len(data) > max_bytes:
        return False
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "ab") as out:
        out.write(data)
    return True


def tail(state_dir: Path, job_id: int, attempt: int, max_bytes: int = TAIL_BYTES) -> str:
    """The last `max_bytes` of the attempt's live log as text ("" when none came)."""
    path = log_path(state_dir, job_id, attempt)
    try:
        with open(path, "rb") as log:
            size = log.seek(0, os.SEEK_END)
            log.seek(max(0, size - max_bytes))
            data = log.read(max_bytes)
    except FileNotFoundError:
        return ""
    return shown(data.decode("utf-8", errors="replace")).lstrip("\ufffd")


def attempts_in_hand(session: Session) -> set[tuple[int, int]]:
    """(job id, attempt) of every job leased, running or being scored: the logs pages read."""
    rows = session.execute(select(JobRow.id, JobRow.attempts)
                           .where(JobRow.status.in_(ACTIVE_JOB_STATES)))
    return {(job_id, attempt) for job_id, attempt in rows}


def prune(state_dir: Path, in_hand: set[tuple[int, int]], *,
          idle_seconds: float = IDLE_BEFORE_PRUNED, now: float | None = None) -> int:
    """Remove the logs of attempts not in hand and unwritten for `idle_seconds` (the grace
    covers an attempt leased after `in_hand` was read); how many went."""
    directory = Path(state_dir) / "worker-logs"
    now = time.time() if now is None else now
    removed = 0
    for path in directory.glob("job-*.log") if directory.is_dir() else ():
        name = _LOG_NAME.fullmatch(path.name)
        if name is None or (int(name[1]), int(name[2])) in in_hand:
            continue
        try:
            if now - path.lstat().st_mtime < idle_seconds:
                continue
            path.unlink()
        except FileNotFoundError:  # another sweeper took it
            continue
        except OSError as exc:  # not ours to remove (a directory, another user's): left
            log.warning("live log %s not pruned: %s", path, exc)
            continue
        removed += 1
    return removed
