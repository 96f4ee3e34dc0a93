"""Where a container writes /output, with a byte quota the host disk never pays for.

As root on Linux the area is a tmpfs mounted on the host with `size=` set just
above the quota: the kernel refuses the write that would go past it (ENOSPC),
so nothing reaches the host disk, and the runner stops the run as soon as the
area is over quota. Elsewhere it is a plain directory whose size the runner
polls, which bounds the damage by the polling interval rather than preventing it.

Usage is what the file system charges (whole pages on tmpfs), not the sum of
file sizes. Collection copies regular files only and never follows a link: a
symlink planted in /output is reported, never read.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MAX_OUTPUT_FILES = 100_000
COPY_CHUNK = 1 << 20


@dataclass
class CollectedOutputs:
    bytes: int = 0
    files: int = 0
    skipped: list[str] = field(default_factory=list)


class OutputArea:
    """A writable directory for /output with a quota; `path` is what gets bind-mounted."""

    kind = "directory"

    def __init__(self, path: Path, quota_bytes: int):
        self.path = path
        self.quota_bytes = quota_bytes

    @classmethod
    def create(cls, path: Path, quota_bytes: int) -> OutputArea:
        """The strongest area this process can make at `path`."""
        if os.geteuid() == 0 and shutil.which("mount"):
            try:
                return TmpfsOutputArea.create_mounted(path, quota_bytes)
            except OSError:
                pass  # no mount permission (a container, a restricted VM): fall back
        path.mkdir(parents=True, exist_ok=False)
        path.chmod(0o777)  # any container user may write; the parent stays private
        return cls(path, quota_bytes)

    def used_bytes(self) -> int:
        total = 0
        for _, entry in _walk(self.path):
            total += entry.stat(follow_symlinks=False).st_size
        return total

    def over_quota(self) -> bool:
        return self.used_bytes() > self.quota_bytes

    def collect(self, destination: Path | None) -> CollectedOutputs:
        """Copy regular files to `destination` (or only count them when it is None)."""
        if destination is not None:
            destination.mkdir(parents=True, exist_ok=True)
        collected = CollectedOutputs()
        for relative, entry in _walk(self.path):
            mode = entry.stat(follow_symlinks=False).st_mode
            if entry.is_dir(follow_symlinks=False):
                if destination is not None:
                    (destination / relative).mkdir(exist_ok=True)
            elif stat.S_ISREG(mode):
                if collected.files >= MAX_OUTPUT_FILES:
                    collected.skipped.append(f"{relative} (more than {MAX_OUTPUT_FILES} files)")
                    continue
                if destination is None:
                    collected.bytes += entry.stat(follow_symlinks=False).st_size
                else:
                    collected.bytes += _copy_regular_file(Path(entry.path), destination / relative)
                collected.files += 1
            else:
                collected.skipped.append(f"{relative} ({_describe(mode)}, not collected)")
        return collected

    def release(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class TmpfsOutputArea(OutputArea):
    kind = "tmpfs"

    @classmethod
    def create_mounted(cls, path: Path, quota_bytes: int) -> TmpfsOutputArea:
        path.mkdir(parents=True, exist_ok=False)
        # One spare page: usage above the quota then proves a write was cut short.
        size = _round_up(quota_bytes, PAGE) + PAGE
        inodes = MAX_OUTPUT_FILES + 1000
        options = f"size={size},nr_inodes={inodes},mode=0777,nosuid,nodev,noexec"
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "epreuve-output", str(path)],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            path.rmdir()
            raise OSError(errno.EPERM, f"cannot mount tmpfs at {path}: {proc.stderr.strip()}")
        return cls(path, quota_bytes)

    def used_bytes(self) -> int:
        fs = os.statvfs(self.path)
        return (fs.f_blocks - fs.f_bfree) * fs.f_frsize

    def release(self) -> None:
        unmount(self.path)
        shutil.rmtree(self.path, ignore_errors=True)


def unmount(path: Path) -> None:
    if os.path.ismount(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def _walk(root: Path, prefix: str = ""):
    """Yield (relative path, DirEntry) depth-first, never following links."""
    with os.scandir(root) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            relative = f"{prefix}{entry.name}"
            yield relative, entry
            if entry.is_dir(follow_symlinks=False):
                yield from _walk(Path(entry.path), prefix=f"{relative}/")


def _copy_regular_file(source: Path, target: Path) -> int:
    """Copy without following a link at the last component, even if one appears meanwhile."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(source, flags)
    copied = 0
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{source} is not a regular file")
        with open(fd, "rb", closefd=False) as src, open(target, "wb") as dst:
            while chunk := src.read(COPY_CHUNK):
                dst.write(chunk)
                copied += len(chunk)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return copied


def _describe(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "symbolic link"), (stat.S_ISFIFO, "named pipe"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit
