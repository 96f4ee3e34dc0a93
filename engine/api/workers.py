"""The worker routes: remote nodes claim jobs and report them over HTTP (worker tokens only).

    POST /api/v1/worker/nodes/register          the node's description -> {"node_id": N}
    POST /api/v1/worker/jobs/claim              {"gpus": N, "min_gpus": M, "wait_seconds": S,
                                                 "node_id": N}
                                                -> 201 | 204
    POST /api/v1/worker/jobs/{id}/start         the node confirms it started the attempt
    POST /api/v1/worker/jobs/{id}/heartbeat     renews the lease ({"node_id", "gpus"}: the
                                                node's GPUs' latest readings)
    POST /api/v1/worker/jobs/{id}/logs          a chunk of the container's log (bounded)
    GET  /api/v1/worker/jobs/{id}/inputs        the attempt's input files: manifest
    GET  /api/v1/worker/jobs/{id}/inputs/{path} one input file (never ground truth)
    PUT  /api/v1/worker/outputs/{id}            the outputs as one tar (within the quota)
    POST /api/v1/worker/jobs/{id}/complete      {"result": RunResult, ...} -> 202 scoring
    POST /api/v1/worker/jobs/{id}/retry         the platform failed the job on the node
    GET  /api/v1/worker/images/{archive_sha256} a pinned image's archive, by digest

A claim makes one attempt with its own random token (GitLab Runner's job token): only its
sha256 is kept, as the job's lease owner, so it dies with the attempt (a sweep, an end, a
cancel clears the owner). Every call about a job carries the attempt and its token
(headers `Epreuve-Attempt`, `Epreuve-Attempt-Token`); one that is not the current
attempt's, in a state that allows it, is 409 and changes nothing. A completion is
stored on the job (SCORING) and answered 202 at once: the node takes its next job while a
scorer (engine/worker/scorer.py: a thread here unless `serve --no-scorer`, or `epreuve
scorer` apart) scores it on the trusted side; ground truth never leaves the server. A
repeated completion of the same attempt is answered 200 with the state it reached
(scoring, or its end), never applied twice. Deadlines are the server's: a sweeper thread
re-queues expired leases and the jobs of lost nodes
(engine/nodes.py: no claim nor heartbeat for `lost_after`), started with the first worker
call, or the app.
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
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from engine import live_logs, node_description, nodes
from engine.api.auth import Principal, authenticated
from engine.api.database import DbSession
from engine.api.errors import AUTH_RESPONSES, ErrorBody
from engine.datasets import DatasetError, VerificationCache
from engine.db.models import ImageRow, JobRow
from engine.errors import Conflict, LeaseLost, NotFound
from engine.evaluation import verified_dataset
from engine.gpu_metrics import record_gpu_sample
from engine.statuses import JobStatus
from engine.store import CHUNK, BlobMissing, checked_digest, open_store
from engine.tokens import new_secret
from engine.worker.coordinator import DbCoordinator
from engine.worker.protocol import JobOutcome, JobTicket
from engine.worker.scorer import Scorer
from engine.worker.wire import (
    AWAITING_SCORING_HEADER,
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
    node_id: int | None = Field(None, ge=1, description="The node's id from registering")


class GpuModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    uuid: str = Field(min_length=1, max_length=node_description.MAX_TEXT)
    model: str = Field(min_length=1, max_length=node_description.MAX_TEXT)
    driver: str = Field(min_length=1, max_length=node_description.MAX_TEXT)
    memory_bytes: int = Field(ge=0, lt=1 << 50)


class NodeRegistration(BaseModel):
    """A node's description (engine/nodes.py validates it again, to the byte)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(pattern=node_description.NAME.pattern, max_length=63)
    gpu_slots: int = Field(0, ge=0, le=node_description.MAX_SLOTS)
    cpu_slots: int = Field(1, ge=0, le=node_description.MAX_SLOTS)
    gpus: list[GpuModel] = Field(default_factory=list, max_length=node_description.MAX_GPUS)
    facts: dict[str, Any] = Field(default_factory=dict)


class Registered(BaseModel):
    node_id: int
    state: str


class NodeBeat(BaseModel):
    node_id: int | None = Field(None, ge=1)
    gpus: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                            max_length=node_description.MAX_GPUS)


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

    def __init__(self, app_state, lease: timedelta, sweep_seconds: float,
                 lost_after: timedelta | None = None, *, scorer: bool = True):
        self.state = app_state
        self.settings = app_state.settings
        self.sessions = app_state.sessions
        self.lease = lease
        self.sweep_seconds = sweep_seconds
        self.lost_after = lost_after or nodes.DEFAULT_LOST_LEASES * lease
        self.verify_cache = VerificationCache(self.settings.state_dir / "verify")
        self._sweeper: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        # a claim's long poll waits on it: told when this process may have queued jobs
        self._queue_changed = threading.Condition()
        # scores stored outcomes in this process (None: `serve --no-scorer`, a scorer apart)
        self.scorer = (Scorer(self.sessions, self.settings, sweep_seconds=None,  # ours sweeps
                              on_scored=self.queue_changed)
                       if scorer else None)

    def queue_changed(self) -> None:
        """Jobs may have been queued here: waiting claims look again at once."""
        with self._queue_changed:
            self._queue_changed.notify_all()

    def wait_for_jobs(self, seconds: float) -> None:
        """Until this process may have queued jobs, or `seconds` (another process may have:
        a scorer apart, a submission through another server)."""
        with self._queue_changed:
            self._queue_changed.wait(seconds)

    def coordinator(self, owner: str, node_id: int | None = None) -> DbCoordinator:
        return DbCoordinator(self.sessions, self.settings, owner, lease_duration=self.lease,
                             work_dir=self.settings.work_dir / "scoring", node_id=node_id,
                             lost_after=self.lost_after)

    # -- the node registry --------------------------------------------------------------

    @staticmethod
    def register(session: Session, description: node_description.NodeDescription,
                 worker: Principal) -> Registered:
        node = nodes.register(session, description, worker.token_id,
                              f"worker token {worker.token_id}")
        registered = Registered(node_id=node.id, state=node.state)
        session.commit()
        log.info("node %s (%s) registered by worker token %s", registered.node_id,
                 description.name, worker.token_id)
        return registered

    @staticmethod
    def heard_from(session: Session, node_id: int, worker: Principal,
                   samples: dict[str, Any] | None = None) -> None:
        """A claim or heartbeat of this token's node (404 for any other), its GPUs' latest
        readings kept and exported under the DCGM names, like a local worker's. Committed
        here, in the request's session: the claim's long poll and the lease's own sessions
        must not wait on it (nor on the token's last use)."""
        node = nodes.node_of(session, node_id, worker.token_id)
        nodes.heard_from(session, node, f"worker token {worker.token_id}", samples)
        name = node.name
        kept = {uuid: node.gpu_samples[uuid] for uuid in samples or {}}
        session.commit()
        for uuid, sample in kept.items():
            record_gpu_sample(name, sample["index"], uuid, sample["utilisation_percent"],
                              sample["memory_used_mib"], sample["power_watts"],
                              sample["energy_millijoules"])

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
        every case missing); other attempts' uploads are dropped. Repeatable: a completion
        retried after the server died between this and storing the outcome finds the
        attempt's outputs already promoted (the marker names the attempt) and keeps them."""
        final = self.output_dir(ticket)
        uploaded = self.uploaded_dir(ticket)
        marker = final.with_name(f".job-{ticket.job_id}-promoted")
        if uploaded.is_dir():
            marker.write_text(str(ticket.attempt))  # before the move: a retry redoes it
            shutil.rmtree(final, ignore_errors=True)
            os.replace(uploaded, final)
        elif not (final.is_dir() and _read(marker) == str(ticket.attempt)):
            shutil.rmtree(final, ignore_errors=True)
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
            if self.scorer is not None:
                self.scorer.start()

    def stop_sweeper(self) -> None:
        self._stop.set()
        if self.scorer is not None:
            self.scorer.stop()

    def _sweep_forever(self) -> None:
        sweeper = self.coordinator("server lease sweeper")
        while not self._stop.wait(self.sweep_seconds):
            try:
                sweeper.maintenance()
                self.queue_changed()  # a swept job is queued again
            except Exception:  # the database restarts: the next sweep tries again
                log.exception("the lease sweep failed")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _service(request: Request) -> WorkerService:
    service: WorkerService = request.app.state.worker_service
    service.start_sweeper()
    return service


Service = Annotated[WorkerService, Depends(_service)]
router = APIRouter(prefix=PREFIX, tags=["workers"], responses={**AUTH_RESPONSES, **CONFLICT})


# -- claim and the attempt's life ----------------------------------------------------------


@router.post("/nodes/register", response_model=Registered,
             responses={422: {"model": ErrorBody, "description": "Not a valid description"}})
def register(body: NodeRegistration, session: DbSession, service: Service,
             worker: Worker) -> Registered:
    """A node describes itself once (name, slots, GPUs, facts); the same token and name
    again is the same node (restarted), active again."""
    return service.register(session, node_description.validated(body.model_dump()), worker)


@router.post("/jobs/claim", status_code=201, response_model=Claimed,
             responses={204: {"description": "No job within the wait; the "
                                       f"{AWAITING_SCORING_HEADER} header counts the "
                                       "node's runs still being scored"},
                        404: {"model": ErrorBody, "description": "Not this token's node"}})
def claim(body: ClaimRequest, session: DbSession, service: Service, worker: Worker) -> Any:
    deadline = time.monotonic() + body.wait_seconds
    if body.node_id is not None:
        service.heard_from(session, body.node_id, worker)
    while True:
        token = new_secret()
        ticket = service.coordinator(attempt_owner(token), body.node_id).lease(
            body.gpus, min_gpus=body.min_gpus)
        if ticket is not None:
            log.info("job %s attempt %s claimed by worker token %s", ticket.job_id,
                     ticket.attempt, worker.token_id)
            return Claimed(ticket=ticket_to_json(ticket), attempt_token=token,
                           lease_seconds=service.lease.total_seconds())
        if time.monotonic() >= deadline:
            return Response(status_code=204, headers={
                AWAITING_SCORING_HEADER: str(_being_scored(session, body.node_id))})
        service.wait_for_jobs(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))


def _being_scored(session: Session, node_id: int | None) -> int:
    """The node's reported runs not scored yet: their ends may queue its next jobs."""
    if node_id is None:
        return 0
    return session.scalar(select(func.count()).select_from(JobRow).where(
        JobRow.node_id == node_id, JobRow.status == JobStatus.SCORING)) or 0


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
def heartbeat(fence: Fence, session: DbSession, service: Service, worker: Worker,
              body: NodeBeat | None = None) -> Renewed:
    if body is not None and body.node_id is not None:  # alive, even when the attempt is not
        _heard_from(session, service, body.node_id, worker, body.gpus)
    coordinator, ticket = service.held(fence)
    if not coordinator.heartbeat(ticket):
        raise StaleAttempt(f"job {fence.job_id} was taken back: stop it")
    return Renewed(status="renewed")


def _heard_from(session: Session, service: WorkerService, node_id: int, worker: Principal,
                samples: dict[str, Any] | None) -> None:
    """The node's part of a heartbeat never costs the job its lease: readings that do not
    validate are dropped (the node is still heard from), an unknown node is left to its
    next claim (which registers it again)."""
    try:
        service.heard_from(session, node_id, worker, samples)
    except node_description.InvalidNode as exc:
        session.rollback()
        log.warning("GPU readings of node %s dropped: %s", node_id, exc)
        service.heard_from(session, node_id, worker)
    except NotFound:
        session.rollback()
        log.warning("a heartbeat names node %s, not this worker token's", node_id)


@router.post("/jobs/{job_id}/logs", response_model=Renewed)
def logs(body: LogChunk, fence: Fence, service: Service, worker: Worker) -> Renewed:
    """Kept where the pages read the live log (engine/live_logs.py), rendered and capped."""
    _, ticket = service.held(fence)
    if not live_logs.append(service.settings.state_dir, ticket.job_id, ticket.attempt,
                            body.text):
        return Renewed(status="dropped: the attempt's log is full")
    return Renewed(status="kept")


@router.post("/jobs/{job_id}/retry", response_model=Ended)
def retry(body: RetryRequest, fence: Fence, service: Service, worker: Worker) -> Ended:
    coordinator = service.coordinator(fence.owner)
    already = coordinator.answered(fence.job_id, fence.attempt)
    if already is not None:
        return Ended(status=already, repeated=True)
    coordinator, ticket = service.held(fence)
    coordinator.retry(ticket, body.message, body.detail, node=body.node)
    return Ended(status=coordinator.answered(fence.job_id, fence.attempt) or "queued")


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
    store = open_store(service.settings.store_dir)
    try:
        source = store.open(digest)
        size = store.size(digest)
    except BlobMissing:
        raise NotFound(f"the archive sha256:{digest} is not in the server's store") from None
    # its size first: the node makes room in its cache before the first byte
    return StreamingResponse(_chunks(source), media_type="application/x-tar",
                             headers={"Content-Length": str(size)})


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


@router.post("/jobs/{job_id}/complete", response_model=Ended, status_code=202,
             responses={200: {"model": Ended, "description": "A repeated completion (or a run "
                              "that failed on the platform's side): the state it reached"}})
def complete(body: Completion, fence: Fence, service: Service, worker: Worker,
             response: Response) -> Ended:
    """Stored, not scored here: 202 with status "scoring" once the outcome waits on the job
    for a scorer. Only a run that failed on the node's platform is settled at once (200)."""
    coordinator = service.coordinator(fence.owner)
    already = coordinator.answered(fence.job_id, fence.attempt)
    if already is not None:
        response.status_code = 200
        return Ended(status=already, repeated=True)
    coordinator, ticket = service.held(fence)
    try:
        result = result_from_json(body.result)
    except (KeyError, TypeError, ValueError) as exc:
        raise OutputsRefused(FailureReason.INFRASTRUCTURE,
                             f"the run result is malformed: {type(exc).__name__}") from None
    output_dir = service.promote_outputs(ticket)
    try:
        coordinator.accept(ticket, JobOutcome(result, body.gpu_usage, str(output_dir),
                                              node=body.node, run_spec=body.run_spec))
    except LeaseLost:
        raise StaleAttempt(f"job {fence.job_id} was taken back meanwhile: stop it") from None
    if result.reason is FailureReason.INFRASTRUCTURE:
        response.status_code = 200
        return Ended(status=coordinator.answered(fence.job_id, fence.attempt) or "queued")
    if service.scorer is not None:
        service.scorer.wake.set()
    return Ended(status=JobStatus.SCORING)
