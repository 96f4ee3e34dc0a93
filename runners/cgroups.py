"""Exact accounting for one run from the kernel's control groups.

Docker deletes a container's cgroup the moment it exits, taking its memory
peak with it. So every run gets a parent cgroup of its own (`cgroup_parent`):
the kernel keeps hierarchical peaks and CPU time in the parent after the
container is gone, and we read them once the run is over, then remove it.

Supported: cgroup v1 and v2 with Docker's `cgroupfs` driver (the parent is
`/epreuve/<run>`), and v2 with the `systemd` driver (a slice). Anything else
(a remote daemon, an unreadable hierarchy) yields no cgroup, and the runner
falls back to sampling the Docker stats API.

Removal covers every mounted hierarchy, not only the controllers we read: runc
also makes the run's group under named hierarchies (v1 `name=systemd`), and
those were once left behind by the hundred.
"""

from __future__ import annotations

import errno
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
MOUNTINFO = Path("/proc/self/mountinfo")
RUN_NAME = re.compile(r"epreuve-[0-9a-f]{12}")
BUSY_RETRIES = 20  # a cgroup stays busy for a moment after its last task exits
BUSY_PAUSE_SECONDS = 0.05
V1_CONTROLLERS = ("memory", "cpuacct", "cpu,cpuacct", "pids", "cpu", "blkio", "cpuset",
                  "devices", "freezer", "net_cls", "perf_event", "hugetlb")


@dataclass
class CgroupUsage:
    peak_memory_bytes: int | None = None
    cpu_seconds: float | None = None
    oom_kills: int | None = None
    peak_pids: int | None = None


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _read_keyed(path: Path, key: str) -> int | None:
    """A value from a flat keyed file such as memory.events or cpu.stat."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        return None
    return None


class RunCgroup:
    """The per-run parent cgroup: what to pass as `cgroup_parent`, and how to read it."""

    def __init__(self, run_name: str, *, version: int, driver: str, root: Path = CGROUP_ROOT):
        self.version = version
        self.driver = driver
        self.root = root
        if driver == "systemd":
            # systemd nests "epreuve-<x>.slice" inside "epreuve.slice".
            prefixed = run_name if run_name.startswith("epreuve-") else f"epreuve-{run_name}"
            slice_name = f"{prefixed}.slice"
            self.parent = slice_name
            self._relative = Path("epreuve.slice") / slice_name
        else:
            self.parent = f"/epreuve/{run_name}"
            self._relative = Path("epreuve") / run_name

    @property
    def label(self) -> str:
        return f"cgroup-v{self.version}"

    def _dir(self, controller: str) -> Path:
        if self.version == 2:
            return self.root / self._relative
        return self.root / controller / self._relative

    def leaf(self, controller: str, container_id: str) -> Path:
        """The container's own cgroup, which exists only while it runs."""
        name = f"docker-{container_id}.scope" if self.driver == "systemd" else container_id
        return self._dir(controller) / name

    def read(self) -> CgroupUsage:
        if self.version == 2:
            base = self._dir("")
            usec = _read_keyed(base / "cpu.stat", "usage_usec")
            return CgroupUsage(
                peak_memory_bytes=_read_int(base / "memory.peak"),
                cpu_seconds=None if usec is None else usec / 1e6,
                oom_kills=_read_keyed(base / "memory.events", "oom_kill"),  # hierarchical
                peak_pids=_read_int(base / "pids.peak"),
            )
        nanos = _read_int(self._dir("cpuacct") / "cpuacct.usage")
        return CgroupUsage(
            peak_memory_bytes=_read_int(self._dir("memory") / "memory.max_usage_in_bytes"),
            cpu_seconds=None if nanos is None else nanos / 1e9,
            # v1 counts OOM kills only where they happen: the runner polls the leaf.
            oom_kills=None,
            peak_pids=_read_int(self._dir("pids") / "pids.peak"),
        )

    def read_leaf_oom_kills(self, container_id: str) -> int | None:
        if self.version == 2:
            return _read_keyed(self.leaf("", container_id) / "memory.events", "oom_kill")
        return _read_keyed(self.leaf("memory", container_id) / "memory.oom_control", "oom_kill")

    def exists(self) -> bool:
        return self._dir("memory").is_dir()

    def hierarchy_dirs(self) -> list[Path]:
        """This run's group in every mounted hierarchy (v1: each one, named ones included)."""
        return [mount / self._relative for mount in cgroup_hierarchies(self.root)]

    def remove(self) -> bool:
        """Remove the run's group everywhere; True when none is left."""
        return all(remove_cgroup_tree(path) for path in self.hierarchy_dirs())


def cgroup_hierarchies(root: Path = CGROUP_ROOT, mountinfo: Path = MOUNTINFO) -> list[Path]:
    """The mount point of every cgroup hierarchy under `root` mounted at its own root."""
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return []
    mounts = []
    for line in lines:
        before, _, after = line.partition(" - ")
        fields = before.split()
        if len(fields) < 5 or after.split()[:1] not in (["cgroup"], ["cgroup2"]):
            continue
        hierarchy_root, mount_point = fields[3], Path(fields[4])
        if hierarchy_root == "/" and mount_point.is_relative_to(root):
            mounts.append(mount_point)
    return mounts


def remove_cgroup_tree(path: Path) -> bool:
    """rmdir the group and any empty groups below it, deepest first; True when it is gone.

    Only an empty group (no task, no child) can be removed, so this never disturbs a
    group that is still in use: it stays, and False says so."""
    if not path.is_dir() or path.is_symlink():
        return True
    for child in _subdirectories(path):
        remove_cgroup_tree(child)
    for attempt in range(BUSY_RETRIES):
        try:
            path.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno != errno.EBUSY or attempt == BUSY_RETRIES - 1 or _has_tasks(path):
                return False  # in use: it stays, and waiting would not change that
            time.sleep(BUSY_PAUSE_SECONDS)
    return False


def _has_tasks(path: Path) -> bool:
    """Any process in the group or below it: then it is in use, and no wait will free it."""
    try:
        if (path / "cgroup.procs").read_text().strip():
            return True
    except OSError:
        return False
    return any(_has_tasks(child) for child in _subdirectories(path))


def _subdirectories(path: Path) -> Iterable[Path]:
    try:
        return [entry for entry in path.iterdir() if entry.is_dir() and not entry.is_symlink()]
    except OSError:
        return []


def leftover_run_cgroups(root: Path = CGROUP_ROOT) -> dict[str, list[Path]]:
    """Per-run groups found in any hierarchy (cgroupfs or systemd layout), by run name."""
    found: dict[str, list[Path]] = {}
    for mount in cgroup_hierarchies(root):
        for parent in ("epreuve", "epreuve.slice"):
            for entry in _subdirectories(mount / parent):
                name = entry.name.removesuffix(".slice")
                if RUN_NAME.fullmatch(name):
                    found.setdefault(name, []).append(entry)
    return found


def make_run_cgroup(run_name: str, *, version: int | None, driver: str | None) -> RunCgroup | None:
    """A RunCgroup when this process can read the daemon's cgroups, else None."""
    if version not in (1, 2) or driver not in ("cgroupfs", "systemd"):
        return None
    if driver == "systemd" and version == 1:
        return None
    probe = CGROUP_ROOT if version == 2 else CGROUP_ROOT / "memory"
    if not probe.is_dir() or not os.access(probe, os.R_OK):
        return None
    return RunCgroup(run_name, version=version, driver=driver)
