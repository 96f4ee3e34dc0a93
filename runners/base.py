"""What one container run is: a plain-data `RunSpec` in, a `RunResult` out.

Runners know nothing of challenges, datasets or the database: the engine turns
a job into a `RunSpec`, and a `Runner` turns that into a `RunResult`.
"""

from __future__ import annotations

import math
import numbers
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
MAX_TIMEOUT_SECONDS = 7 * 24 * 3600.0  # a week: anything longer is a typo, not a limit
MAX_STOP_GRACE_SECONDS = 3600.0
MIN_CPUS = 0.01  # Docker's least quota; below it NanoCpus rounds to 0, which means no limit
# Counts and sizes are whole numbers: a fraction would be rounded somewhere, 0 being "none"
WHOLE_NUMBERS = ("output_quota_bytes", "tmp_size_bytes", "memory_bytes", "pids_limit",
                 "shm_size_bytes", "nofile", "log_cap_bytes")


class RunnerError(Exception):
    """The runner's expected failures. `runners` knows nothing of the engine, so the engine's
    error family (engine/errors.py) reads the exit code and HTTP status from here."""

    exit_code = 1
    http_status = 422


class InvalidRunSpec(RunnerError, ValueError):
    """A RunSpec no runner may start: refused before anything is created."""

    exit_code = 2


class ImageRejected(RunnerError):
    """The image cannot be run as it is; the message tells the participant why."""


class ImageLoadFailed(RunnerError):
    """The daemon did not load an archive the platform handed it (refused it, or the
    connection broke mid-stream): the platform's failure, never a team's."""

    exit_code = 3
    http_status = 503


class ImageLoadTagged(ImageLoadFailed):
    """A load set tags on the node (put back); the archives the platform loads name none."""


class RunStatus(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class FailureReason(StrEnum):
    """Why a run failed. Typed, so that the engine and participants never parse free text."""

    TIMEOUT = "TIMEOUT"
    OOM_KILLED = "OOM_KILLED"
    NONZERO_EXIT = "NONZERO_EXIT"
    OUTPUT_MISSING = "OUTPUT_MISSING"
    OUTPUT_INVALID = "OUTPUT_INVALID"
    OUTPUT_QUOTA = "OUTPUT_QUOTA"
    IMAGE_INVALID = "IMAGE_INVALID"
    INFRASTRUCTURE = "INFRASTRUCTURE"
    CANCELLED = "CANCELLED"

    @property
    def retryable(self) -> bool:
        """Only the platform's own failures are retried; a participant's never are."""
        return self is FailureReason.INFRASTRUCTURE


@dataclass(frozen=True)
class RunSpec:
    """Everything a runner needs to run one container, and nothing it must not know."""

    image: str
    command: tuple[str, ...] | None = None  # None: the image's own ENTRYPOINT/CMD
    env: Mapping[str, str] = field(default_factory=dict)
    input_dir: Path | None = None  # mounted read-only at /input
    output_dir: Path | None = None  # regular files written to /output are collected here
    output_quota_bytes: int = 1 * GiB
    tmp_size_bytes: int = 256 * MiB  # tmpfs at /tmp, charged to the memory limit
    memory_bytes: int = 2 * GiB  # memory and memory+swap: no swap
    cpus: float = 1.0
    pids_limit: int = 256
    shm_size_bytes: int = 64 * MiB
    nofile: int = 4096
    timeout_seconds: float = 600.0
    stop_grace_seconds: float = 10.0  # SIGTERM, then SIGKILL after this long
    gpu_uuids: tuple[str, ...] = ()
    user: str | None = None  # None: the image's user, remapped when it is root
    log_cap_bytes: int = 1 * MiB
    labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        positive = {
            "output_quota_bytes": self.output_quota_bytes,
            "tmp_size_bytes": self.tmp_size_bytes,
            "memory_bytes": self.memory_bytes,
            "cpus": self.cpus,
            "pids_limit": self.pids_limit,
            "shm_size_bytes": self.shm_size_bytes,
            "nofile": self.nofile,
            "timeout_seconds": self.timeout_seconds,
            "log_cap_bytes": self.log_cap_bytes,
        }
        for name, value in positive.items():
            # `not value > 0` also refuses nan, which compares false with everything
            if not _finite_number(value) or not value > 0:
                raise InvalidRunSpec(f"RunSpec.{name} must be a positive finite number, "
                                     f"got {value!r}")
        for name in WHOLE_NUMBERS:
            if not isinstance(positive[name], numbers.Integral):
                raise InvalidRunSpec(f"RunSpec.{name} must be a whole number, got "
                                     f"{positive[name]!r}")
        if self.cpus < MIN_CPUS:
            raise InvalidRunSpec(f"RunSpec.cpus must be at least {MIN_CPUS} (Docker's least "
                                 f"quota; less would mean no limit at all), got {self.cpus!r}")
        if self.timeout_seconds > MAX_TIMEOUT_SECONDS:
            raise InvalidRunSpec(f"RunSpec.timeout_seconds must be at most "
                                 f"{MAX_TIMEOUT_SECONDS:g} s (7 days), got "
                                 f"{self.timeout_seconds!r}")
        grace = self.stop_grace_seconds
        if not _finite_number(grace) or not 0 <= grace <= MAX_STOP_GRACE_SECONDS:
            raise InvalidRunSpec(f"RunSpec.stop_grace_seconds must be between 0 and "
                                 f"{MAX_STOP_GRACE_SECONDS:g} s, got {grace!r}")
        # plain data: the paths are checked where the run happens (require_paths)


def require_paths(spec: RunSpec) -> None:
    """What a spec names on disk is there: every runner calls this before it creates
    anything (a spec is plain data, built anywhere, even where its paths are not)."""
    if spec.input_dir is not None and not Path(spec.input_dir).is_dir():
        raise InvalidRunSpec(f"input directory {spec.input_dir} does not exist")


def _finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return math.isfinite(value)


@dataclass
class RunResult:
    """What happened, measured by the platform rather than reported by the container."""

    status: RunStatus
    reason: FailureReason | None
    message: str  # for the participant: what happened and what to do about it
    exit_code: int | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    wall_seconds: float | None = None
    cpu_seconds: float | None = None
    peak_memory_bytes: int | None = None
    oom_kills: int | None = None
    peak_pids: int | None = None
    output_bytes: int = 0
    output_files: int = 0
    skipped_outputs: list[str] = field(default_factory=list)  # links, devices: never collected
    log_tail: str = ""
    log_bytes: int = 0
    log_truncated: bool = False
    image_id: str | None = None
    user: str | None = None  # the user the container actually ran as
    accounting: str = "none"  # where the numbers came from: cgroup-v1, cgroup-v2, sampled
    detail: str = ""  # for organisers only (a platform traceback): never shown to a team

    @property
    def succeeded(self) -> bool:
        return self.status is RunStatus.SUCCEEDED

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        data["reason"] = self.reason.value if self.reason else None
        for key in ("started_at", "finished_at"):
            value = data[key]
            data[key] = value.isoformat() if value else None
        return data


class Runner(Protocol):
    """Runs one container to completion: provision, execute, collect, deprovision."""

    def run(self, spec: RunSpec, cancel: threading.Event | None = None, *,
            on_log: Callable[[str], None] | None = None) -> RunResult:
        """Never raises for anything the container did; the result says what happened.
        `on_log`, where given, receives rendered chunks of the log while the container
        runs (bounded: runners/log_stream.py)."""
        ...

    def inspect_image(self, reference: str) -> dict:
        """The image as this node holds it (id, architecture, config), never pulled; a
        `RunnerError` when it cannot be run as it is."""
        ...

    def has_image(self, image_id: str) -> bool:
        """This node's daemon holds exactly that image id (`sha256:...`)."""
        ...

    def answers(self) -> bool:
        """The container runtime answers now: a node whose daemon is away claims no job."""
        ...

    def load_image(self, chunks: Iterable[bytes]) -> None:
        """Load a `docker save` archive, streamed chunk by chunk (never whole in memory);
        an `ImageLoadFailed` when the daemon does not take it. An exception raised by
        `chunks` itself propagates unchanged and the archive is not loaded."""
        ...


def failed(reason: FailureReason, message: str, **measured: Any) -> RunResult:
    return RunResult(status=RunStatus.FAILED, reason=reason, message=message, **measured)
