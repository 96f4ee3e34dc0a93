"""The worker routes over a real server on loopback and real PostgreSQL, spoken by hand.

A test plays the node: it claims, starts, heartbeats, fetches its inputs, uploads a tar
of outputs and completes. What is checked is the fence (a stale attempt's every write is
409 and changes nothing), idempotent completion (one result per case), hostile output
uploads (links, `..`, over quota: refused with a typed reason, nothing kept), and that
the inputs routes never serve ground truth.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import time
from datetime import timedelta

import httpx
import numpy as np
import pytest
from sqlalchemy import func, select, update

from engine.api.app import ApiOptions
from engine.api.ratelimit import Rate
from engine.api.workers import Attempt
from engine.db.models import CaseResultRow, EventRow, JobRow, SubmissionRow, utcnow
from engine.medio import Volume, read_volume, write_nifti
from engine.tokens import create_token
from engine.worker.wire import ATTEMPT_HEADER, ATTEMPT_TOKEN_HEADER
from runners.base import FailureReason, RunResult, RunStatus, failed
from tests.api_fixtures import build_world, queued_submission, start_server

API = "/api/v1/worker"


@pytest.fixture
def live(tmp_path):
    world = build_world(tmp_path, "postgres")
    server = start_server(world, ApiOptions(rate=Rate(burst=10_000, per_second=1000.0),
                                            sweep_seconds=3600))
    yield server
    server.stop()


class Node:
    """A hand-driven remote node: one claimed attempt at a time."""

    def __init__(self, live):
        self.live = live
        self.http = live.client("worker")
        self.ticket: dict = {}
        self.token = ""

    def claim(self, gpus: int = 0, wait: float = 0, **extra) -> httpx.Response:
        response = self.http.post(f"{API}/jobs/claim",
                                  json={"gpus": gpus, "wait_seconds": wait, **extra})
        if response.status_code == 201:
            self.ticket, self.token = response.json()["ticket"], response.json()["attempt_token"]
        return response

    @property
    def fence(self) -> dict[str, str]:
        return {ATTEMPT_HEADER: str(self.ticket["attempt"]), ATTEMPT_TOKEN_HEADER: self.token}

    def post(self, what: str, **kwargs) -> httpx.Response:
        return self.http.post(f"{API}/jobs/{self.ticket['job_id']}/{what}", headers=self.fence,
                              **kwargs)

    def get(self, what: str) -> httpx.Response:
        return self.http.get(f"{API}/jobs/{self.ticket['job_id']}/{what}", headers=self.fence)

    def upload(self, archive: bytes) -> httpx.Response:
        return self.http.put(f"{API}/outputs/{self.ticket['job_id']}", content=archive,
                             headers={**self.fence, "Content-Type": "application/octet-stream"})

    def complete(self, result: RunResult) -> httpx.Response:
        return self.post("complete", json={"result": result.to_dict(), "gpu_usage": {}})


def succeeded(files: int) -> RunResult:
    return RunResult(status=RunStatus.SUCCEEDED, reason=None, message="succeeded", exit_code=0,
                     wall_seconds=1.0, output_files=files)


def mask_tar(live, case_ids: list[str]) -> bytes:
    """What a container would write: a threshold mask per case, as one tar."""
    buffer = io.BytesIO()
    scratch = live.world.root / "masks"
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for case_id in case_ids:
            source = next((live.world.root / "data" / "validation" / "inputs" / case_id).iterdir())
            image = read_volume(source)
            array = np.asarray(image.array, dtype=float)
            mask = scratch / case_id / "mask.nii.gz"
            write_nifti(Volume((array > np.percentile(array, 90)).astype(np.uint8), image.affine),
                        mask)
            tar.add(mask, arcname=f"{case_id}/mask.nii.gz")
    return buffer.getvalue()


def tar_of(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, data in members:
            tar.addfile(info, None if data is None else io.BytesIO(data))
    return buffer.getvalue()


def member(name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE,
           link: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


def results_of(live, submission_id: int) -> list[tuple[str, bool]]:
    with live.world.sessions() as session:
        rows = session.scalars(select(CaseResultRow).where(
            CaseResultRow.submission_id == submission_id)).all()
        return sorted((row.case_id, row.valid) for row in rows)


def ended(live, job_id: int, timeout: float = 60.0) -> str:
    """The job's end, once the server's scorer wrote it (a deadline against hanging, not a
    timed assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with live.world.sessions() as session:
            status = session.get(JobRow, job_id).status
        if status in ("succeeded", "failed", "cancelled"):
            return status
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} was not scored")


def expire_and_sweep(live, job_id: int) -> None:
    """The node vanished: its lease is past (the server's clock), and the sweeper runs."""
    with live.world.sessions() as session:
        session.execute(update(JobRow).where(JobRow.id == job_id).values(
            lease_expires_at=utcnow() - timedelta(seconds=1)))
        session.commit()
    service = live.server.config.app.state.worker_service
    service.coordinator("test sweeper").maintenance()


def test_a_claim_without_work_is_204_and_only_a_worker_token_may_claim(live):
    node = Node(live)
    assert node.claim(wait=0).status_code == 204
    with live.client("participant-a") as participant:
        refused = participant.post(f"{API}/jobs/claim", json={"gpus": 0, "wait_seconds": 0})
    assert refused.status_code == 403
    with live.client("worker") as worker:  # and a worker token may make no other call
        assert worker.get("/api/v1/challenges").status_code == 403


def test_a_first_claim_on_sqlite_is_not_locked_out_by_its_own_token_and_min_gpus_holds(
        tmp_path):
    """The token's last use is written by the request's authentication: left open for the
    whole request, on SQLite it locked out the claim's own lease (503 after the busy
    timeout). A node whose CPU slots are full asks min_gpus 1: a CPU job is not for it."""
    world = build_world(tmp_path, "sqlite")
    server = start_server(world, ApiOptions(rate=Rate(burst=10_000, per_second=1000.0),
                                            sweep_seconds=3600))
    try:
        queued_submission(world, "ch-a", "team-a")
        queued_submission(world, "ch-a", "team-b")
        node = Node(server)
        assert node.claim(gpus=4).status_code == 201  # the token's first use, and a lease
        assert node.claim(gpus=4, min_gpus=1).status_code == 204  # the other needs no GPU
        assert node.claim(gpus=4).status_code == 201
    finally:
        server.stop()


def test_an_attempt_runs_is_scored_on_the_server_and_completing_twice_changes_nothing(live):
    submission_id = queued_submission(live.world, "ch-a", "team-a")
    node = Node(live)
    assert node.claim().status_code == 201
    assert node.ticket["attempt"] == 1 and "dataset_path" not in node.ticket
    listing = node.get("inputs").json()
    assert {case["case_id"] for case in listing["cases"]} == set(node.ticket["case_ids"])
    assert all("ground_truth" not in case and "label" not in case for case in listing["cases"])
    assert listing["files"] and all(f["path"].startswith("inputs/") for f in listing["files"])
    for entry in listing["files"]:
        data = node.get(f"inputs/{entry['path']}").content
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    for secret in ("ground_truth/case-001/label.nii.gz", "manifest.json", "inputs/case-002",
                   "inputs/../ground_truth/case-001/label.nii.gz"):
        assert node.get(f"inputs/{secret}").status_code == 404, secret

    assert node.post("start").status_code == 200
    repeated = node.post("start")  # its answer was lost: confirmed again, applied once
    assert (repeated.status_code, repeated.json()["status"]) == (200, "running")
    assert node.post("heartbeat").status_code == 200
    assert node.post("logs", json={"text": "segmenting case-001\n"}).status_code == 200
    assert node.upload(mask_tar(live, node.ticket["case_ids"])).status_code == 200
    first = node.complete(succeeded(1))
    assert first.status_code == 202, first.text  # stored: a scorer scores it, not the request
    assert first.json() == {"status": "scoring", "repeated": False}
    assert ended(live, node.ticket["job_id"]) == "succeeded"

    again = node.complete(succeeded(1))
    assert (again.status_code, again.json()) == (200, {"status": "succeeded", "repeated": True})
    assert results_of(live, submission_id) == [("case-001", True)]
    assert node.post("heartbeat").status_code == 409  # the token died with the attempt
    assert node.upload(mask_tar(live, ["case-001"])).status_code == 409
    with live.world.sessions() as session:
        job = session.get(JobRow, node.ticket["job_id"])
        assert (job.status, job.lease_owner) == ("succeeded", None)
        assert session.get(SubmissionRow, submission_id).status != "queued"
        running = session.scalar(select(func.count()).select_from(EventRow).where(
            EventRow.entity == "job", EventRow.entity_id == job.id,
            EventRow.to_state == "running"))
        assert running == 1


def test_a_completion_retried_after_its_outputs_were_promoted_keeps_them(live):
    """The server died after promoting the attempt's upload and before storing the outcome:
    the node's retried completion is scored on those outputs, never as missing."""
    submission_id = queued_submission(live.world, "ch-a", "team-a")
    node = Node(live)
    node.claim()
    node.post("start")
    assert node.upload(mask_tar(live, node.ticket["case_ids"])).status_code == 200
    service = live.server.config.app.state.worker_service
    _, ticket = service.held(Attempt(node.ticket["job_id"], node.ticket["attempt"], node.token))
    service.promote_outputs(ticket)  # the first request got this far

    assert node.complete(succeeded(1)).status_code == 202  # the node's retry
    assert ended(live, node.ticket["job_id"]) == "succeeded"
    assert results_of(live, submission_id) == [("case-001", True)]


def test_a_stale_attempt_is_refused_everywhere_and_writes_nothing(live):
    submission_id = queued_submission(live.world, "ch-a", "team-a")
    old = Node(live)
    old.claim()
    assert old.post("start").status_code == 200
    expire_and_sweep(live, old.ticket["job_id"])
    new = Node(live)
    assert new.claim().status_code == 201
    assert (new.ticket["job_id"], new.ticket["attempt"]) == (old.ticket["job_id"], 2)
    with live.world.sessions() as session:
        events_before = session.scalar(select(func.count()).select_from(EventRow))

    late = failed(FailureReason.NONZERO_EXIT, "the late one", exit_code=1)
    for response in (old.post("heartbeat"), old.post("start"), old.get("inputs"),
                     old.upload(mask_tar(live, ["case-001"])), old.complete(late),
                     old.post("retry", json={"message": "late"})):
        assert response.status_code == 409, response.text
        assert response.json()["error"]["type"] == "StaleAttempt"
    forged = Node(live)  # the current attempt's number with another token: refused too
    forged.ticket, forged.token = new.ticket, old.token
    assert forged.post("heartbeat").status_code == 409
    with live.world.sessions() as session:
        assert session.scalar(select(func.count()).select_from(EventRow)) == events_before
    assert results_of(live, submission_id) == []

    assert new.post("start").status_code == 200
    assert new.upload(mask_tar(live, ["case-001"])).status_code == 200
    assert new.complete(succeeded(1)).json()["status"] == "scoring"
    assert ended(live, new.ticket["job_id"]) == "succeeded"
    assert old.complete(late).status_code == 409  # and after the end: still not its result
    assert results_of(live, submission_id) == [("case-001", True)]


@pytest.mark.parametrize(("archive", "reason"), [
    (lambda: tar_of(member("case-001", kind=tarfile.DIRTYPE),
                    member("case-001/mask.nii.gz", kind=tarfile.SYMTYPE,
                           link="/etc/passwd")), "OUTPUT_INVALID"),
    (lambda: tar_of(member("case-001/mask.nii.gz", kind=tarfile.LNKTYPE,
                           link="../../x")), "OUTPUT_INVALID"),
    (lambda: tar_of(member("../x")), "OUTPUT_INVALID"),
    (lambda: tar_of(member("case-001/../../x")), "OUTPUT_INVALID"),
    (lambda: tar_of(member("/tmp/x")), "OUTPUT_INVALID"),
    (lambda: tar_of(member("x"), member("x")), "OUTPUT_INVALID"),
    (lambda: tar_of(member("fifo", kind=tarfile.FIFOTYPE)), "OUTPUT_INVALID"),
    (lambda: b"not a tar at all" * 100, "OUTPUT_INVALID"),
    (lambda: tar_of(member("case-001/huge.bin", bytes(64 * (1 << 20) + 1))), "OUTPUT_QUOTA"),
    (lambda: bytes(200 * (1 << 20)), "OUTPUT_QUOTA"),  # past any tar of the quota: cut short
], ids=["symlink", "hardlink", "dotdot", "inner-dotdot", "absolute", "twice", "fifo",
        "garbage", "file-over-quota", "body-over-quota"])
def test_hostile_outputs_are_refused_with_a_reason_and_nothing_is_kept(live, archive, reason):
    queued_submission(live.world, "ch-a", "team-a")
    node = Node(live)
    node.claim()
    node.post("start")
    response = node.upload(archive())
    assert response.status_code == 422, response.text
    assert response.json()["error"]["reason"] == reason
    outputs = live.world.settings.outputs_dir
    kept = [p for p in outputs.rglob("*") if p.is_file()] if outputs.exists() else []
    assert kept == []
    assert node.post("heartbeat").status_code == 200  # a refused upload loses the job nothing


def test_an_image_archive_is_served_by_digest_only_for_pinned_images(live):
    from engine.db.models import ImageRow
    from engine.store import open_store

    blob = open_store(live.world.settings.store_dir).put(io.BytesIO(b"an image archive"))
    node = Node(live)
    assert node.http.get(f"{API}/images/{blob.sha256}").status_code == 404  # no image names it
    with live.world.sessions() as session:
        session.execute(update(ImageRow).values(archive_sha256=blob.sha256))
        session.commit()
    served = node.http.get(f"{API}/images/{blob.sha256}")
    assert (served.status_code, served.content) == (200, b"an image archive")
    assert node.http.get(f"{API}/images/..%2F..%2Fetc%2Fpasswd").status_code == 404


def test_a_node_caches_an_attempts_inputs_by_version_and_refetches_a_changed_file(live, tmp_path):
    from engine.datasets import stage
    from engine.worker.http import HttpCoordinator, RemoteAgent
    from tests.engine_fixtures import sqlite_settings

    queued_submission(live.world, "ch-a", "team-a")
    coordinator = HttpCoordinator(live.url, live.world.tokens["worker"], wait_seconds=0)
    ticket = coordinator.lease(0)
    agent = RemoteAgent(coordinator, None, sqlite_settings(tmp_path / "node"), gpus=[])
    dataset = agent._dataset(ticket)
    assert dataset.version == ticket.dataset_version
    cached = [p for p in dataset.root.rglob("*") if p.is_file()]
    assert cached and all(p.relative_to(dataset.root).parts[:2] == ("inputs", "case-001")
                          for p in cached)
    first = cached[0]
    expected = first.read_bytes()
    first.chmod(0o644)
    first.write_bytes(b"changed on the node")
    agent._dataset(ticket)  # verified file by file: the changed one is fetched again
    assert first.read_bytes() == expected
    staged = stage(dataset, list(ticket.case_ids), tmp_path / "input")
    assert (staged / "cases.json").exists() and (staged / "case-001").is_dir()
    coordinator.close()


def test_an_upload_of_an_attempt_that_was_swept_is_never_scored_for_the_next(live):
    """Each attempt uploads to its own place: the next attempt is scored on its own outputs
    (here none: the case is missing), never on what the swept one sent."""
    submission_id = queued_submission(live.world, "ch-a", "team-a")
    old = Node(live)
    old.claim()
    old.post("start")
    assert old.upload(mask_tar(live, ["case-001"])).status_code == 200
    expire_and_sweep(live, old.ticket["job_id"])
    new = Node(live)
    new.claim()
    new.post("start")
    assert new.complete(succeeded(0)).json()["status"] == "scoring"
    assert ended(live, new.ticket["job_id"]) in ("succeeded", "failed")
    assert results_of(live, submission_id) == [("case-001", False)]
    left = [p.name for p in live.world.settings.outputs_dir.rglob("*") if p.is_dir()]
    assert not [name for name in left if "attempt" in name]  # the swept upload is gone


def test_the_worker_command_needs_a_token_with_a_server_and_reads_gpus(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from engine.cli import _chosen_gpus, app

    monkeypatch.setenv("EPREUVE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("EPREUVE_TOKEN", raising=False)
    done = CliRunner().invoke(app, ["worker", "--server", "http://127.0.0.1:9"])
    assert done.exit_code == 2 and "needs a worker token" in done.output
    assert _chosen_gpus("all") is None
    assert _chosen_gpus("GPU-a, GPU-b") == ["GPU-a", "GPU-b"]
    refused = CliRunner().invoke(app, ["worker", "--server", "http://127.0.0.1:9", "--token",
                                       "epv_x", "--gpus", "../etc"])
    assert refused.exit_code == 2 and "--gpus takes" in refused.output


def test_the_node_image_cache_evicts_the_least_recently_used_past_its_budget(tmp_path):
    import os

    from engine.store import DirectoryStore
    from engine.worker.http import evict_least_recently_used

    store = DirectoryStore(tmp_path / "image-cache")
    old, used, new = (store.put(io.BytesIO(bytes([n]) * 1000)).sha256 for n in (1, 2, 3))
    for when, digest in enumerate((old, used, new)):
        os.utime(store.path(digest), (1_000_000 + when, 1_000_000 + when))
    os.utime(store.path(used))  # used just now
    assert evict_least_recently_used(store, 2500, keep=new) == [old]
    assert sorted(store.digests()) == sorted([used, new])
    assert evict_least_recently_used(store, 0, keep=new) == [used]  # never the one in use
    assert list(store.digests()) == [new]


def test_a_nodes_live_log_is_kept_rendered_where_the_pages_read_it(live):
    """POST .../logs while the attempt runs: kept in engine/live_logs.py's place for this
    attempt, control characters rendered; a stale attempt's chunk is refused; an oversize
    chunk is refused by the request's schema."""
    from engine import live_logs

    queued_submission(live.world, "ch-a", "team-a")
    node = Node(live)
    assert node.claim().status_code == 201
    assert node.post("start").status_code == 200
    job, attempt = node.ticket["job_id"], node.ticket["attempt"]
    state_dir = live.world.settings.state_dir
    assert node.post("logs", json={"text": "step 1\n\x1b[2J\u202eowned\n"}).json() == {
        "status": "kept"}
    assert node.post("logs", json={"text": "step 2\n"}).status_code == 200
    assert live_logs.tail(state_dir, job, attempt) == "step 1\n\\x1b[2J\\u202eowned\nstep 2\n"
    assert node.post("logs", json={"text": "x" * ((64 << 10) + 1)}).status_code == 422
    expire_and_sweep(live, job)
    assert node.post("logs", json={"text": "late\n"}).status_code == 409
    assert "late" not in live_logs.tail(state_dir, job, attempt)


def test_an_empty_claim_counts_the_nodes_runs_still_being_scored(live):
    """A node's `--until-idle` is not idle while its reported runs are being scored (their
    ends queue its next jobs): an empty claim says how many, for its own node only."""
    from engine.worker.wire import AWAITING_SCORING_HEADER
    from tests.test_nodes import GOOD

    node = Node(live)
    node_id = node.http.post(f"{API}/nodes/register", json=GOOD).json()["node_id"]
    assert node.claim(wait=0, node_id=node_id).headers[AWAITING_SCORING_HEADER] == "0"
    queued_submission(live.world, "ch-a", "team-a")
    assert node.claim(node_id=node_id).status_code == 201
    with live.world.sessions() as session:  # reported: parked for the server's scorer
        session.execute(update(JobRow).where(JobRow.id == node.ticket["job_id"]).values(
            status="scoring", lease_owner=None))
        session.commit()
    assert node.claim(wait=0, node_id=node_id).headers[AWAITING_SCORING_HEADER] == "1"
    with live.client("worker") as other_token:  # another node hears its own count only
        with live.world.sessions() as session:
            _, token = create_token(session, role="worker")
            session.commit()
        other_token.headers["Authorization"] = f"Bearer {token}"
        other_id = other_token.post(f"{API}/nodes/register",
                                    json={**GOOD, "name": "other"}).json()["node_id"]
        other = other_token.post(f"{API}/jobs/claim", json={
            "gpus": 0, "wait_seconds": 0, "node_id": other_id})
        assert other.headers[AWAITING_SCORING_HEADER] == "0"


def test_a_waiting_claim_is_told_when_this_process_queued_jobs(live):
    """The scorer in the server's process tells waiting claims when it scored a job (a
    smoke job's end queues the main ones): they look again at once, not at their next
    poll. Here the wait is far longer than the deadline, so only the signal ends it."""
    import threading

    service = live.server.config.app.state.worker_service
    woken = threading.Event()
    waiter = threading.Thread(target=lambda: (service.wait_for_jobs(3600), woken.set()),
                              daemon=True)
    waiter.start()
    deadline = time.monotonic() + 60
    while not woken.is_set():
        assert time.monotonic() < deadline, "the waiting claim was never told"
        service.queue_changed()  # again until heard: the waiter may not be waiting yet
        woken.wait(0.05)
    assert service.scorer is not None and service.scorer.on_scored == service.queue_changed
