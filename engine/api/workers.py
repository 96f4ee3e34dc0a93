"""The worker routes: remote nodes claim jobs and report them over HTTP (worker tokens only).

    POST /api/v1/worker/jobs/claim              {"gpus": N, "min_gpus": M, "wait_seconds": S}
                                                -> 201 | 204
    POST /api/v1/worker/jobs/{id}/start         the node confirms it started the attempt
    POST /api/v1/worker/jobs/{id}/heartbeat     renews the lease
    POST /api/v1/worker/jobs/{id}/logs          a chunk of the container's log (bounded)
    GET  /api/v1/worker/jobs/{id}/inputs        the attempt's input files: manifest
    GET  /api/v1/worker/jobs/{id}/inputs/{path} one input file (never ground truth)
    PUT  /api/v1/worker/outputs/{id}            the outputs as one tar (within the quota)
    POST /api/v1/worker/jobs/{id}/complete      {"result": RunResult, "gpu_usage": {...}}
    POST /api/v1/worker/jobs/{id}/retry         the platform failed the job on the node
    GET  /api/v1/worker/images/{archive_sha256} a pinned image's archive, by digest

A claim makes one attempt with its own random token (GitLab Runner's job token): only its
sha256 is kept, as the job's lease owner, so it dies with the attempt (a sweep, an end, a
cancel clears the owner). Every call about a job carries the attempt and its token
(headers `Epreuve-Attempt`, `Epreuve-Attempt-Token`); one that is not the current
attempt's, in a state that allows it, is 409 and changes nothing. A completion is scored
here, on the trusted side (DbCoordinator.complete, in the request): ground truth never
leaves the server. A repeated completion of the same attempt is answered 200 with the
state it already reached, never applied twice. Deadlines are the server's: a sweeper
thread re-queues expired leases (started with the first worker call, or the app).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from engine.api.auth import Principal, authenticated
from engine.api.errors import AUTH_RESPONSES, ErrorBody
from engine.datasets import DatasetError, VerificationCache
from engine.db.models import ImageRow, JobRow
from engine.errors import Conflict, LeaseLost, NotFound
from engine.evaluation import verified_dataset
from engine.statuses import JobStatus
from engine.store import CHUNK, BlobMissing, checked_digest, open_store
from engine.tokens import new_secret
from engine.worker.coordinator import DbCoordinator
from engine.worker.protocol import JobOutcome, JobTicket, PlatformFailure, messages_platform
from engine.worker.wire import (
    OutputsRefused,
    extract_outputs,
    result_from_json,
    ticket_to_json,
    upload_cap,
)
from runners.base import FailureReason

log = logging.getLogger("epreuve.api")
PREFIX = "/api/v1/worker"
OWNER_PREFIX = "http-attempt:"  # never a host name: a local worker never judges it dead
MAX_WAIT_SECONDS = 30.0
POLL_SECONDS = 0.5
MAX_LOG_CHUNK = 64 << 10
MAX_LOG_BYTES = 4 << 20  # kept per attempt; beyond, chunks are counted and dropped
CONFLICT = {409: {"model": ErrorBody, "description": "Not this job's current attempt (stop "
                  "its container), or not in a state that allows the call"}}

Worker = Annotated[Principal, Depends(authenticated(worker=True))]


class StaleAttempt(LeaseLost):
    """A call about an attempt that is no longer the job's current one."""


class ClaimRequest(BaseModel):
    gpus: int = Field(0, ge=0, le=1024, description="GPUs free on the node")
    min_gpus: int = Field(0, ge=0, le=1024, description="Only a job needing at least this "
                          "many GPUs (a GPU slot is free, no CPU slot is)")
    wait_seconds: float = Field(20.0, ge=0, le=MAX_WAIT_SECONDS,
                                description="How long to wait for a job (long poll)")


class Claimed(BaseModel):
    ticket: dict[str, Any]
    attempt_token: str
    lease_seconds: float


class Renewed(BaseModel):
    status: str


class LogChunk(BaseModel):
    text: str = Field(max_length=MAX_LOG_CHUNK)


class Completion(BaseModel):
    result: dict[str, Any]
    gpu_usage: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # for the provenance record: the node's facts and the RunSpec it ran, as data (bounded
    # by the 1 MiB body cap of these routes)
    node: dict[str, Any] = Field(default_factory=dict)
    run_spec: dict[str, Any] | None = None


class RetryRequest(BaseModel):
    message: str = Field(max_length=4000)
    detail: str | None = Field(None, max_length=100_000)
    node: dict[str, Any] = Field(default_factory=dict)


class Ended(BaseModel):
    status: str
    repeated: bool = False


class Attempt:
    """One call's fence: the job, the attempt, and the owner its token hashes to."""

    def __init__(self, job_id: int, attempt: int, token: str):
        self.job_id = job_id
        self.attempt = attempt
        self.owner = attempt_owner(token)


def attempt_owner(token: str) -> str:
    return OWNER_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def _attempt(job_id: int,
             attempt: Annotated[int, Header(alias="Epreuve-Attempt", ge=1, le=1_000_000)],
             token: Annotated[str, Header(alias="Epreuve-Attempt-Token", min_length=20,
                                          max_length=200)]) -> Attempt:
    return Attempt(job_id, attempt, token)


Fence = Annotated[Attempt, Depends(_attempt)]


class WorkerService:
    """The server's side of the remote protocol: one DbCoordinator per attempt's owner."""

    def __init__(self, app_state, lease: timedelta, sweep_seconds: float):
        self.state = app_state
        self.settings = app_state.settings
        self.sessions = app_state.sessions
        self.lease = lease
        self.sweep_seconds = sweep_seconds
        self.verify_cache = VerificationCache(self.settings.state_dir / "verify")
        self._sweeper: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def coordinator(self, owner: str) -> DbCoordinator:
        return DbCoordinator(self.sessions, self.settings, owner, lease_duration=self.lease,
                             work_dir=self.settings.work_dir / "scoring")

    def held(self, fence: Attempt) -> tuple[DbCoordinator, JobTicket]:
        coordinator = self.coordinator(fence.owner)
        try:
            return coordinator, coordinator.held_ticket(fence.job_id, fence.attempt)
        except LeaseLost:
            raise StaleAttempt(f"job {fence.job_id} attempt {fence.attempt} is not the job's "
                               "current attempt (or its token is wrong): stop it") from None

    def output_dir(self, ticket: JobTicket) -> Path:
        """Where the job's outputs are scored from and kept (engine/rescore.py reads them)."""
        return (self.settings.outputs_dir / f"submission-{ticket.submission_id}"
                / f"job-{ticket.job_id}")

    def uploaded_dir(self, ticket: JobTicket) -> Path:
        """An attempt's own upload: a stale attempt can never write where another's is."""
        return self.output_dir(ticket).with_name(f".job-{ticket.job_id}-attempt-"
                                                 f"{ticket.attempt}")

    def promote_outputs(self, ticket: JobTicket) -> Path:
        """The completing attempt's upload becomes the job's outputs (none: an empty tree,
        every case missing); other attempts' uploads are dropped."""
        final = self.output_dir(ticket)
        uploaded = self.uploaded_dir(ticket)
        shutil.rmtree(final, ignore_errors=True)
        if uploaded.is_dir():
            os.replace(uploaded, final)
        else:
            final.mkdir(parents=True)
        for stale in final.parent.glob(f".job-{ticket.job_id}-attempt-*"):
            shutil.rmtree(stale, ignore_errors=True)
        return final

    # -- the server's clock ------------------------------------------------------------

    def start_sweeper(self) -> None:
        with self._lock:
            if self._sweeper is not None and self._sweeper.is_alive():
                return
            self._stop.clear()
            self._sweeper = threading.Thread(target=self._sweep_forever, daemon=True,
                                             name="epreuve-lease-sweeper")
            self._sweeper.start()

    def stop_sweeper(self) -> None:
        self._stop.set()

    def _sweep_forever(self) -> None:
        sweeper = self.coordinator("server lease sweeper")
        while not self._stop.wait(self.sweep_seconds):
            try:
                sweeper.maintenance()
            except Exception:  # the database restarts: the next sweep tries again
                log.exception("the lease sweep failed")


def _service(request: Request) -> WorkerService:
    service: WorkerService = request.app.state.worker_service
    service.start_sweeper()
    return service


Service = Annotated[WorkerService, Depends(_service)]
router = APIRouter(prefix=PREFIX, tags=["workers"], responses={**AUTH_RESPONSES, **CONFLICT})


# -- claim and the attempt's life ----------------------------------------------------------


@router.post("/jobs/claim", status_code=201, response_model=Claimed,
             responses={204: {"description": "No job within the wait"}})
def claim(body: ClaimRequest, service: Service, worker: Worker) -> Any:
    deadline = time.monotonic() + body.wait_seconds
    while True:
        token = new_secret()
        ticket = service.coordinator(attempt_owner(token)).lease(body.gpus,
                                                                 min_gpus=body.min_gpus)
        if ticket is not None:
            log.info("job %s attempt %s claimed by worker token %s", ticket.job_id,
                     ticket.attempt, worker.token_id)
            return Claimed(ticket=ticket_to_json(ticket), attempt_token=token,
                           lease_seconds=service.lease.total_seconds())
        if time.monotonic() >= deadline:
            return Response(status_code=204)
        time.sleep(POLL_SECONDS)


@router.post("/jobs/{job_id}/start", response_model=Renewed)
def start(fence: Fence, service: Service, worker: Worker) -> Renewed:
    """Confirms the node has the job (GitLab's lost-assignment lesson): a claimed attempt
    never confirmed is swept when its lease ends. A repeated confirmation (its answer was
    lost) is answered, not applied again."""
    coordinator, ticket = service.held(fence)
    with service.sessions() as session:
        status = session.scalar(select(JobRow.status).where(JobRow.id == ticket.job_id))
    if status != JobStatus.LEASED:
        return Renewed(status=str(status))
    try:
        coordinator.started(ticket)
    except LeaseLost:
        raise StaleAttempt(f"job {fence.job_id} was taken back: stop it") from None
    return Renewed(status=JobStatus.RUNNING)


@router.post("/jobs/{job_id}/heartbeat", response_model=Renewed)
def heartbeat(fence: Fence, service: Service, worker: Worker) -> Renewed:
    coordinator, ticket = service.held(fence)
    if not coordinator.heartbeat(ticket):
        raise StaleAttempt(f"job {fence.job_id} was taken back: stop it")
    return Renewed(status="renewed")


@router.post("/jobs/{job_id}/logs", response_model=Renewed)
def logs(body: LogChunk, fence: Fence, service: Service, worker: Worker) -> Renewed:
    _, ticket = service.held(fence)
    path = service.settings.state_dir / "worker-logs" / f"job-{ticket.job_id}-{ticket.attempt}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = body.text.encode()
    kept = path.stat().st_size if path.exists() else 0
    if kept + len(data) > MAX_LOG_BYTES:
        return Renewed(status="dropped: the attempt's log is full")
    with open(path, "ab") as out:
        out.write(data)
    return Renewed(status="kept")


@router.post("/jobs/{job_id}/retry", response_model=Ended)
def retry(body: RetryRequest, fence: Fence, service: Service, worker: Worker) -> Ended:
    coordinator = service.coordinator(fence.owner)
    already = coordinator.ended_by_us(fence.job_id, fence.attempt)
    if already is not None:
        return Ended(status=already, repeated=True)
    coordinator, ticket = service.held(fence)
    coordinator.retry(ticket, body.message, body.detail, node=body.node)
    return Ended(status=coordinator.ended_by_us(fence.job_id, fence.attempt) or "queued")


# -- inputs (never ground truth) and images ------------------------------------------------


def _inputs_of(service: WorkerService, ticket: JobTicket) -> tuple[Path, dict]:
    """The attempt's cases' inputs: their manifest entries without ground truth or label,
    and the input files under inputs/<case>/ with their sha256."""
    try:
        dataset = verified_dataset(ticket.dataset_path, ticket.dataset_version,
                                   service.verify_cache, what=f"job {ticket.job_id}")
    except DatasetError as exc:
        raise Conflict(f"the test set failed verification: {exc}") from None
    wanted = set(ticket.case_ids)
    cases = [{key: value for key, value in case.items() if key not in ("ground_truth", "label")}
             for case in dataset.manifest["cases"] if case["case_id"] in wanted]
    files = [{"path": entry["path"], "sha256": entry["sha256"], "size": entry["size"]}
             for entry in dataset.manifest["files"]
             if entry["path"].split("/")[:1] == ["inputs"]
             and entry["path"].split("/")[1] in wanted]
    return dataset.root, {"version": dataset.version, "task": dataset.task,
                          "format": dataset.manifest.get("format"), "cases": cases,
                          "files": files}


@router.get("/jobs/{job_id}/inputs")
def inputs(fence: Fence, service: Service, worker: Worker) -> dict:
    _, ticket = service.held(fence)
    return _inputs_of(service, ticket)[1]


@router.get("/jobs/{job_id}/inputs/{path:path}", response_class=StreamingResponse,
            responses={404: {"model": ErrorBody, "description": "Not an input of this job"}})
def input_file(path: str, fence: Fence, service: Service, worker: Worker) -> StreamingResponse:
    _, ticket = service.held(fence)
    root, listing = _inputs_of(service, ticket)
    if path not in {entry["path"] for entry in listing["files"]}:
        raise NotFound(f"{path[:200]!r} is not an input file of job {ticket.job_id}")
    fd = os.open(root / path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    return StreamingResponse(_chunks(os.fdopen(fd, "rb")),
                             media_type="application/octet-stream")


@router.get("/images/{archive_sha256}", response_class=StreamingResponse,
            responses={404: {"model": ErrorBody, "description": "No pinned image's archive"}})
def image_archive(archive_sha256: str, service: Service, worker: Worker) -> StreamingResponse:
    digest = checked_digest(archive_sha256)
    with service.sessions() as session:
        known = session.scalar(select(ImageRow.id).where(ImageRow.archive_sha256 == digest)
                               .limit(1))
    if known is None:
        raise NotFound(f"no pinned image has the archive sha256:{digest}")
    try:
        source = open_store(service.settings.store_dir).open(digest)
    except BlobMissing:
        raise NotFound(f"the archive sha256:{digest} is not in the server's store") from None
    return StreamingResponse(_chunks(source), media_type="application/x-tar")


def _chunks(source):
    with source:
        while chunk := source.read(CHUNK):
            yield chunk


# -- outputs and completion -----------------------------------------------------------------


@router.put("/outputs/{job_id}", response_model=Renewed,
            responses={422: {"model": ErrorBody, "description": "Not a plain tree within the "
                             "quota (reason OUTPUT_INVALID or OUTPUT_QUOTA): nothing kept"}},
            openapi_extra={"requestBody": {"required": True, "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                                        "description": "a tar"}}}}})
async def outputs(request: Request, fence: Fence, service: Service, worker: Worker) -> Renewed:
    _, ticket = await run_in_threadpool(service.held, fence)
    quota = ticket.limits.output_quota
    target = service.uploaded_dir(ticket)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=target.parent) as spool:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > upload_cap(quota):
                raise OutputsRefused(FailureReason.OUTPUT_QUOTA, "the outputs upload is larger "
                                     f"than the phase's quota of {quota} bytes allows")
            spool.write(chunk)
        spool.seek(0)
        files = await run_in_threadpool(_replace_outputs, spool, target, quota)
    await run_in_threadpool(service.held, fence)  # still ours after the transfer
    return Renewed(status=f"{files} file(s) kept")


def _replace_outputs(spool, target: Path, quota: int) -> int:
    incoming = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    incoming.rmdir()
    try:
        files = extract_outputs(spool, incoming, quota)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(incoming, target)
        return files
    finally:
        shutil.rmtree(incoming, ignore_errors=True)


@router.post("/jobs/{job_id}/complete", response_model=Ended)
def complete(body: Completion, fence: Fence, service: Service, worker: Worker) -> Ended:
    coordinator = service.coordinator(fence.owner)
    already = coordinator.ended_by_us(fence.job_id, fence.attempt)
    if already is not None:
        return Ended(status=already, repeated=True)
    if coordinator.scoring_now(fence.job_id, fence.attempt):
        return Ended(status=JobStatus.SCORING, repeated=True)
    coordinator, ticket = service.held(fence)
    try:
        result = result_from_json(body.result)
    except (KeyError, TypeError, ValueError) as exc:
        raise OutputsRefused(FailureReason.INFRASTRUCTURE,
                             f"the run result is malformed: {type(exc).__name__}") from None
    output_dir = service.promote_outputs(ticket)
    coordinator.heartbeat(ticket)  # scoring starts with a whole lease ahead
    try:
        coordinator.complete(ticket, JobOutcome(result, body.gpu_usage, str(output_dir),
                                                node=body.node, run_spec=body.run_spec))
    except LeaseLost:
        raise StaleAttempt(f"job {fence.job_id} was taken back while it was scored") from None
    except PlatformFailure as exc:  # ours, while scoring: the job is retried, never the team's
        log.error("scoring job %s failed while %s:\n%s", fence.job_id, exc.stage, exc.detail)
        coordinator.retry(ticket, messages_platform(exc.stage), exc.detail)
    ended = coordinator.ended_by_us(fence.job_id, fence.attempt)
    return Ended(status=ended or JobStatus.SCORING)
