"""Whole-GPU allocation by UUID, safe across every worker process on the node.

Each GPU has a lock file; holding an exclusive `flock` on it is holding the GPU.
The kernel releases the lock when the holder dies, so a crashed worker never
keeps a GPU, and two workers on one node never land on the same GPU.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path


class NotEnoughGPUs(RuntimeError):
    """Fewer free GPUs than a run wants: the platform's state, not the user's mistake."""

    exit_code = 3  # read by the engine's error family, as the runner's errors are
    http_status = 503


@dataclass
class Allocation:
    uuids: tuple[str, ...]
    _handles: list[int] = field(default_factory=list, repr=False)

    def release(self) -> None:
        while self._handles:
            handle = self._handles.pop()
            fcntl.flock(handle, fcntl.LOCK_UN)
            os.close(handle)

    def __enter__(self) -> Allocation:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class GPUAllocator:
    def __init__(self, uuids: list[str], lock_dir: Path):
        self.uuids = list(uuids)
        self.lock_dir = Path(lock_dir)
        self.lock_dir.mkdir(parents=True, exist_ok=True)

    def allocate(self, count: int) -> Allocation:
        """`count` free GPUs, held until released; raises NotEnoughGPUs (holding none)."""
        allocation = Allocation(())
        if count == 0:
            return allocation
        taken = []
        for uuid in self.uuids:
            handle = os.open(self.lock_dir / f"gpu-{uuid}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(handle)
                continue
            allocation._handles.append(handle)
            taken.append(uuid)
            if len(taken) == count:
                allocation.uuids = tuple(taken)
                return allocation
        allocation.release()
        raise NotEnoughGPUs(f"{count} GPU(s) wanted, {len(taken)} free of {len(self.uuids)}")

    def free_count(self) -> int:
        free = 0
        for uuid in self.uuids:
            try:
                with self.allocate_one(uuid):
                    free += 1
            except NotEnoughGPUs:
                continue
        return free

    def allocate_one(self, uuid: str) -> Allocation:
        return GPUAllocator([uuid], self.lock_dir).allocate(1)
