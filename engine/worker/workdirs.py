"""A node's own scratch: each worker's work directory, claimed before it is visible, and
the directories of dead workers removed by the next one to start. Liveness here is of
processes on this host: only a node can judge its own."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from engine.datasets import unstage
from runners.docker import owner_alive

OWNER_TAG = "owner"  # in each worker's work directory: whose it is, for the next one to judge


def dead_on_this_host(owner: str) -> bool:
    """A lease owner this node can see is gone (a process of this host that died)."""
    return not owner_alive(owner)


def claim_work_dir(root: Path, owner: str) -> Path:
    """This worker's own work directory, tagged with its owner before it is visible, so that
    a worker starting later can tell whether it is still in use."""
    root.mkdir(parents=True, exist_ok=True)
    pending = Path(tempfile.mkdtemp(prefix=".claim-", dir=root))
    (pending / OWNER_TAG).write_text(owner)
    mine = root / f"worker-{owner.replace(':', '-').replace('/', '-')}"
    remove_tree(mine)  # the same process token cannot be another live worker
    os.replace(pending, mine)
    return mine


def remove_dead_workers_dirs(root: Path) -> list[Path]:
    """Remove the work directories (staged inputs, scratch) of workers that died."""
    removed = []
    if not root.is_dir():
        return removed
    for entry in root.iterdir():
        if entry.is_symlink() or not entry.is_dir():
            continue
        owner = _owner_of(entry)
        if entry.name.startswith("worker-"):
            dead = owner is None or not owner_alive(owner)  # tagged before it was renamed
        elif entry.name.startswith(".claim-"):
            dead = owner is not None and not owner_alive(owner)  # untagged: being claimed
        else:
            continue
        if dead:
            remove_tree(entry)
            removed.append(entry)
    return removed


def _owner_of(directory: Path) -> str | None:
    try:
        return (directory / OWNER_TAG).read_text().strip() or None
    except OSError:
        return None


def remove_tree(path: Path) -> None:
    """Remove a work directory whatever it holds (staged inputs are read-only)."""
    with contextlib.suppress(OSError):
        unstage(path)
    shutil.rmtree(path, ignore_errors=True)
