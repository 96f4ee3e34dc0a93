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
"""

from __future__ import annotations

import os
from pathlib import Path

from runners.logs import shown

MAX_LOG_BYTES = 4 << 20  # kept per attempt; beyond, chunks are dropped
TAIL_BYTES = 16 << 10  # the most a page reads of it


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
