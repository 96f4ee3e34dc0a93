"""The seam between a node that runs containers and the side that owns the queue.

A node's agent (agent.py) sees only frozen `JobTicket`s and reports `JobOutcome`s through
a `Coordinator`: lease (with the GPUs it has free), heartbeat, started, complete, retry,
and maintenance (sweeping). `DbCoordinator` (coordinator.py) does it over the database,
in this process; an HTTP coordinator does the same over the network for remote nodes.
Nothing here imports the database: a node need not have one.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.errors import LeaseLost
from engine.evaluation import EvaluatorFailed, SandboxLimits
from runners.base import RunResult


@dataclass(frozen=True)
class JobTicket:
    """One attempt at one job: everything a node needs to run it, and nothing more
    (the dataset is named for its inputs only: ground truth is not the node's business)."""

    job_id: int
    attempt: int  # fences the reports: only the current attempt's are accepted
    kind: str
    submission_id: int
    case_ids: tuple[str, ...]
    image_id: str
    image_user: str | None  # the numeric uid:gid resolved at intake, or None
    image_archive_sha256: str | None  # the image's archive in the store (None: not stored)
    limits: SandboxLimits
    gpus: int
    dataset_path: str
    dataset_version: str  # the version the job was queued for: its inputs, never others
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class JobOutcome:
    """What a node reports of a run: the result as measured, GPU usage, where the outputs
    were collected, and for the provenance record (engine/provenance.py) the node's own
    facts (`node_facts`) and the exact RunSpec it ran (`run_spec_data`), both as data."""

    result: RunResult
    gpu_usage: Mapping[str, dict]
    output_dir: str
    node: Mapping[str, Any] = field(default_factory=dict)
    run_spec: Mapping[str, Any] | None = None


class Coordinator(Protocol):
    """Every call is one unit of work on the coordinator's side. A call about a job that
    is no longer this attempt's (swept, cancelled) raises `LeaseLost`."""

    def lease(self, capacity: int, *, min_gpus: int = 0) -> JobTicket | None:
        """The next job this node can run with `capacity` free GPUs, or None. `min_gpus`:
        only a job needing at least that many (1: a GPU slot is free, no CPU slot is)."""
        ...

    def heartbeat(self, ticket: JobTicket) -> bool:
        """Renew the lease; False when the job was taken back (stop the container)."""
        ...

    def started(self, ticket: JobTicket) -> None:
        ...

    def log(self, ticket: JobTicket, text: str) -> None:
        """A chunk of the container's log while it runs, kept where the pages read the
        live tail (engine/live_logs.py); bounded there too."""
        ...

    def complete(self, ticket: JobTicket, outcome: JobOutcome) -> None:
        """Report the run's end. The trusted side validates and scores the outputs and
        writes the results, the job's end and what follows, all or nothing: at once for a
        local coordinator, by a scorer after the answer for a server."""
        ...

    def retry(self, ticket: JobTicket, message: str, detail: str | None = None, *,
              node: Mapping[str, Any] | None = None) -> None:
        """The platform failed this job (INFRASTRUCTURE): queue it again, or fail it when out
        of attempts. `message` is for the team; `detail` (a traceback) for organisers only;
        `node` is the node's facts, for the attempt's provenance."""
        ...

    def maintenance(self) -> None:
        """Sweep: re-queue the jobs of vanished workers, end those out of attempts."""
        ...

    def awaiting_scoring(self) -> int:
        """How many of this node's reported runs the trusted side is still scoring, as the
        last lease that found nothing heard: their ends may queue this node's next jobs
        (a smoke job's, the main ones), so `--until-idle` is not idle before they end."""
        ...


class PlatformFailure(RuntimeError):
    """Something of ours failed while a job was handled: INFRASTRUCTURE for that job."""

    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"{stage}: {type(cause).__name__}")
        self.stage = stage
        self.detail = "".join(traceback.format_exception(cause))


@contextlib.contextmanager
def platform_step(name: str):
    """Label an unexpected failure with the step it happened in (the organisers' view)."""
    try:
        yield
    except (LeaseLost, PlatformFailure, EvaluatorFailed):
        raise
    except Exception as exc:
        raise PlatformFailure(name, exc) from exc


def messages_platform(stage: str) -> str:
    """What a team reads when the platform failed them: no traceback, no host detail."""
    return (f"The platform failed while {stage} (an internal error, not caused by your "
            "submission). The job is retried automatically and never counts against your "
            "quota.")
