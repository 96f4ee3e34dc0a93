"""Where a container writes /output, with a byte quota the host disk never pays for.

As root on Linux the area is a tmpfs mounted on the host with `size=` set just
above the quota: the kernel refuses the write that would go past it (ENOSPC),
so nothing reaches the host disk, and the runner stops the run as soon as the
area is over quota. Elsewhere it is a plain directory whose size the runner
polls, which bounds the damage by the polling interval rather than preventing it.

Usage is what the file system charges (whole pages on tmpfs), not the sum of
file sizes. Collection copies regular files only and never follows a link: a
symlink planted in /output is reported, never read. It measures before it copies,
as the copy would occupy the host's disk: a sparse file at its apparent size, each
hard link as a copy; over the quota nothing is copied. The walk goes by directory
descriptors and is bounded (depth, path length, entries), so no tree, name or
path the container makes can crash it or be charged to the platform.
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

from runners.base import FailureReason
from runners.messages import human_bytes

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
BLOCK = 4096  # what one file or directory costs at least on the host's disk
MAX_OUTPUT_ENTRIES = 100_000  # files and directories
MAX_DEPTH = 32  # directory levels below /output
MAX_PATH_BYTES = 1024  # of a path below /output: far below PATH_MAX wherever it is copied
COPY_CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


@dataclass
class CollectedOutputs:
    bytes: int = 0
    files: int = 0
    skipped: list[str] = field(default_factory=list)
    # A participant's fault found while collecting: OUTPUT_QUOTA or OUTPUT_INVALID.
    reason: FailureReason | None = None
    message: str = ""


@dataclass
class _Scan:
    """What a copy of /output would be, found before anything is copied."""

    directories: list[tuple[str, ...]] = field(default_factory=list)
    files: list[tuple[tuple[str, ...], int]] = field(default_factory=list)  # parts, size
    skipped: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # each makes the run OUTPUT_INVALID
    occupied: int = 0  # bytes the copy would occupy on the host below its root
    file_bytes: int = 0
    inflated: list[str] = field(default_factory=list)  # sparse files, hard links
    entries: int = 0


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
        """Apparent bytes of the regular files (a hard link counts again): only the part
        within the walk's bounds; what lies beyond them is refused when collecting."""
        return scan(self.path).file_bytes

    def over_quota(self) -> bool:
        return self.used_bytes() > self.quota_bytes

    def collect(self, destination: Path | None) -> CollectedOutputs:
        """Copy regular files to `destination` (or only count them when it is None).

        Everything is measured before a byte is copied, as a copy would occupy the
        host's disk: sparse files at their apparent size, each hard link as its own
        copy, every directory a block, every file whole blocks. Over the quota, nothing is
        copied (OUTPUT_QUOTA). A tree too deep, a path too long, a name that is not
        UTF-8 text: OUTPUT_INVALID, and that entry is not collected. Nothing the
        container wrote raises here; only the host's own failures (its disk) do.
        """
        found = scan(self.path)
        collected = CollectedOutputs(skipped=list(found.skipped))
        if found.occupied > self.quota_bytes:
            collected.reason = FailureReason.OUTPUT_QUOTA
            collected.message = _quota_message(found, self.quota_bytes)
            return collected
        if found.problems:
            collected.reason = FailureReason.OUTPUT_INVALID
            collected.message = _invalid_message(found.problems)
        if destination is None:
            collected.bytes, collected.files = found.file_bytes, len(found.files)
            return collected
        destination.mkdir(parents=True, exist_ok=True)
        for parts in found.directories:
            destination.joinpath(*parts).mkdir(exist_ok=True)
        for parts, size in found.files:
            copied = _copy_planned_file(self.path, parts, size, destination.joinpath(*parts))
            if copied is None:
                collected.skipped.append(f"{_shown(parts)} (changed while collected, "
                                         "not collected)")
                continue
            collected.bytes += copied
            collected.files += 1
        return collected

    def release(self) -> None:
        remove_tree(self.path)


class TmpfsOutputArea(OutputArea):
    kind = "tmpfs"

    @classmethod
    def create_mounted(cls, path: Path, quota_bytes: int) -> TmpfsOutputArea:
        path.mkdir(parents=True, exist_ok=False)
        # One spare page: usage above the quota then proves a write was cut short.
        size = _round_up(quota_bytes, PAGE) + PAGE
        inodes = MAX_OUTPUT_ENTRIES + 1000
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
        remove_tree(self.path)


def unmount(path: Path) -> None:
    if os.path.ismount(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def remove_tree(path: Path) -> None:
    """rmtree, even of a tree deeper than Python's recursion limit."""
    try:
        shutil.rmtree(path, ignore_errors=True)
    except RecursionError:
        subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)],
                       capture_output=True, check=False)


# -- the walk: by descriptors, never following a link, bounded in depth, length, count --


def scan(root: Path) -> _Scan:
    found = _Scan()
    try:
        root_fd = os.open(root, _DIR_FLAGS)
    except OSError as exc:
        found.problems.append(f"/output cannot be read ({exc.strerror})")
        return found
    try:
        _scan_directory(root_fd, (), found)
    finally:
        os.close(root_fd)
    return found


def _scan_directory(fd: int, parts: tuple[str, ...], found: _Scan) -> None:
    try:
        with os.scandir(fd) as iterator:
            entries = []
            for entry in iterator:
                found.entries += 1
                if found.entries > MAX_OUTPUT_ENTRIES:
                    found.problems.append(f"/output holds more than {MAX_OUTPUT_ENTRIES} files "
                                          "and directories; the rest was not looked at")
                    break
                entries.append(entry)
    except OSError as exc:
        found.problems.append(f"{_shown(parts) or '/output'} cannot be listed ({exc.strerror})")
        return
    for entry in sorted(entries, key=lambda e: e.name):
        _scan_entry(fd, parts, entry, found)


def _scan_entry(fd: int, parts: tuple[str, ...], entry: os.DirEntry, found: _Scan) -> None:
    child = (*parts, entry.name)
    problem = _name_problem(child)
    if problem:
        found.problems.append(problem)
        return
    try:
        info = entry.stat(follow_symlinks=False)
    except OSError as exc:
        found.problems.append(f"{_shown(child)} cannot be read ({exc.strerror})")
        return
    if stat.S_ISDIR(info.st_mode):
        if len(child) > MAX_DEPTH:
            found.problems.append(f"{_shown(child)} lies more than {MAX_DEPTH} directories "
                                  "deep; it was not collected")
            return
        found.directories.append(child)
        found.occupied += BLOCK
        try:
            child_fd = os.open(entry.name, _DIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            found.problems.append(f"{_shown(child)} cannot be opened ({exc.strerror})")
            return
        try:
            _scan_directory(child_fd, child, found)
        finally:
            os.close(child_fd)
    elif stat.S_ISREG(info.st_mode):
        found.files.append((child, info.st_size))
        found.file_bytes += info.st_size
        found.occupied += _round_up(info.st_size, BLOCK)
        if info.st_nlink > 1 or info.st_blocks * 512 < info.st_size:
            found.inflated.append(_inflation(child, info))
    else:
        found.skipped.append(f"{_shown(child)} ({_describe(info.st_mode)}, not collected)")


def _name_problem(parts: tuple[str, ...]) -> str | None:
    name = parts[-1]
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return (f"{_shown(parts)}: the name is not UTF-8 text; it was not collected. "
                "Name output files in UTF-8")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return f"{_shown(parts)}: the name holds control characters; it was not collected"
    if len(os.fsencode("/".join(parts))) > MAX_PATH_BYTES:
        return (f"{_shown(parts)[:200]}...: the path is longer than {MAX_PATH_BYTES} bytes; "
                "it was not collected")
    return None


def _inflation(parts: tuple[str, ...], info: os.stat_result) -> str:
    written = info.st_blocks * 512
    if info.st_nlink > 1:
        return (f"{_shown(parts)} ({human_bytes(info.st_size)}, one of {info.st_nlink} hard "
                "links to the same data: each counts as a copy)")
    return (f"{_shown(parts)} ({human_bytes(info.st_size)} sparse, "
            f"{human_bytes(written)} written: a copy holds every byte)")


def _shown(parts: tuple[str, ...]) -> str:
    """A path as printable text, whatever bytes its names hold (safe in JSON and logs)."""
    text = os.fsencode("/".join(parts)).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _quota_message(found: _Scan, quota: int) -> str:
    why = f" Among them: {'; '.join(found.inflated[:3])}." if found.inflated else ""
    return (f"What the container left in /output would occupy {human_bytes(found.occupied)} "
            f"once copied, more than its output quota of {human_bytes(quota)}; nothing was "
            f"collected.{why} Sparse files count at their full size and every hard link as "
            "a copy. Write only the expected files, compressed (e.g. .nii.gz).")


def _invalid_message(problems: list[str]) -> str:
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return (f"/output breaks the output rules: {'; '.join(problems[:3])}{more}. Write plain "
            f"files with UTF-8 names, at most {MAX_DEPTH} directories deep and "
            f"{MAX_PATH_BYTES} bytes of path below /output.")


# -- the copy ---------------------------------------------------------------------------------


def _copy_planned_file(root: Path, parts: tuple[str, ...], size: int, target: Path) -> int | None:
    """Copy at most `size` bytes, opening every component without following a link; None
    when the file is no longer the regular file of that size that was measured. Errors
    on the host's side (its disk) raise: they are the platform's fault."""
    fds = []
    try:
        try:
            fds.append(os.open(root, _DIR_FLAGS))
            for name in parts[:-1]:
                fds.append(os.open(name, _DIR_FLAGS, dir_fd=fds[-1]))
            fds.append(os.open(parts[-1], _FILE_FLAGS, dir_fd=fds[-1]))
            info = os.fstat(fds[-1])
            os.set_blocking(fds[-1], True)
        except OSError:
            return None
        if not stat.S_ISREG(info.st_mode) or info.st_size != size:
            return None
        return _copy_bounded(fds[-1], target, size)
    finally:
        for fd in reversed(fds):
            with contextlib.suppress(OSError):
                os.close(fd)


def _copy_bounded(source_fd: int, target: Path, size: int) -> int:
    copied = 0
    with open(target, "wb") as dst:
        while copied < size:
            try:
                chunk = os.read(source_fd, min(COPY_CHUNK, size - copied))
            except OSError:
                chunk = b""
            if not chunk:
                break
            dst.write(chunk)
            copied += len(chunk)
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
