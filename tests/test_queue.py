"""The job queue on both backends: SQLite (embedded) and a real PostgreSQL server.

scripts/test starts PostgreSQL (scripts/start-postgres) and exports
EPREUVE_TEST_POSTGRES_URL; without it the PostgreSQL cases are skipped locally
and fail in CI.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import select, text

from engine import queue
from engine.db import session_factory
from engine.db.models import (
    ChallengeRow,
    EventRow,
    ImageRow,
    JobRow,
    PhaseRow,
    SubmissionRow,
    TeamRow,
    utcnow,
)
from tests.conftest import postgres_sessions


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request, tmp_path):
    if request.param == "sqlite":
        return session_factory(f"sqlite:///{tmp_path / 'queue.db'}")
    return postgres_sessions()


@pytest.fixture
def pg_sessions():
    return postgres_sessions()


def make_submission(session) -> SubmissionRow:
    challenge = ChallengeRow(id="c", title="c", task="segmentation", definition={},
                             definition_sha256="0" * 64)
    phase = PhaseRow(challenge=challenge, slug="p", dataset_path="/d", dataset_version="v",
                     case_ids=["a"])
    image = ImageRow(image_id="sha256:x", tar_sha256=None, layers=[], reference="x",
                     architecture="amd64", user="1000", size_bytes=1)
    submission = SubmissionRow(phase=phase, team=TeamRow(name="t"), image=image)
    session.add(submission)
    session.flush()
    return submission


def fill(sessions, n_main: int, n_smoke: int = 0) -> None:
    with sessions() as session:
        submission = make_submission(session)
        queue.enqueue(session, submission, [[f"m{i}"] for i in range(n_main)], kind="main",
                      actor="test")
        queue.enqueue(session, submission, [[f"s{i}"] for i in range(n_smoke)], kind="smoke",
                      actor="test")
        session.commit()


def test_smoke_jobs_first_then_oldest(sessions):
    fill(sessions, n_main=2, n_smoke=1)
    with sessions() as session:
        order = [queue.lease(session, "w").case_ids for _ in range(3)]
        assert order == [["s0"], ["m0"], ["m1"]]
        assert queue.lease(session, "w") is None


def test_gpu_jobs_wait_for_a_node_with_gpus(sessions):
    with sessions() as session:
        submission = make_submission(session)
        queue.enqueue(session, submission, [["g"]], kind="main", actor="t", gpus=1)
        session.commit()
        assert queue.lease(session, "cpu-node", gpus_available=0) is None
        assert queue.lease(session, "gpu-node", gpus_available=1).case_ids == ["g"]


def test_concurrent_workers_never_share_a_job(sessions):
    fill(sessions, n_main=40)
    taken: list[int] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        with sessions() as session:
            while (job := queue.lease(session, name)) is not None:
                with lock:
                    taken.append(job.id)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(taken) == list(range(1, 41))  # every job once, none twice
    with sessions() as session:
        leased = session.scalar(select(EventRow.id).where(EventRow.to_state == "leased")
                                .order_by(EventRow.id.desc()).limit(1))
        assert leased is not None


def test_skip_locked_does_not_wait_for_a_locked_row(pg_sessions):
    """A row locked by another transaction is skipped, not waited for (SQLite has no row
    locks: its single writer is covered by the concurrency test above)."""
    fill(pg_sessions, n_main=2)
    with pg_sessions() as holder, pg_sessions() as other:
        holder.execute(select(JobRow).where(JobRow.id == 1).with_for_update())  # lock job 1
        other.execute(text("SET lock_timeout = '2s'"))
        job = queue.lease(other, "w")  # would time out if it waited on job 1
        assert job.id == 2
        holder.rollback()


def test_expired_leases_are_swept_and_attempts_are_capped(sessions):
    fill(sessions, n_main=1)
    with sessions() as session:
        job = queue.lease(session, "elsewhere:1:1", duration=timedelta(seconds=-1))
        job.max_attempts = 2
        session.commit()
        assert queue.sweep(session, "sweeper") == [job.id]
        session.refresh(job)
        assert job.status == "queued" and job.lease_owner is None
        job = queue.lease(session, "elsewhere:1:1", duration=timedelta(seconds=-1))
        assert job.attempts == 2
        queue.sweep(session, "sweeper")
        session.refresh(job)
        assert job.status == "failed" and job.reason == "INFRASTRUCTURE"


def test_a_dead_owner_on_this_host_is_swept_at_once(sessions):
    import socket

    fill(sessions, n_main=1)
    with sessions() as session:
        dead = f"{socket.gethostname()}:999999999:1"
        job = queue.lease(session, dead, duration=timedelta(hours=1))
        assert queue.sweep(session, "sweeper") == [job.id]


def test_a_swept_job_is_no_longer_ours(sessions):
    fill(sessions, n_main=1)
    with sessions() as session:
        job = queue.lease(session, "elsewhere:1:1", duration=timedelta(seconds=-1))
        queue.sweep(session, "sweeper")
        assert not queue.heartbeat(session, job.id, "elsewhere:1:1")
        session.refresh(job)
        with pytest.raises(queue.LeaseLost):
            queue.transition(session, job, "running", "elsewhere:1:1")


def test_heartbeats_renew_the_lease(sessions):
    fill(sessions, n_main=1)
    with sessions() as session:
        job = queue.lease(session, "elsewhere:1:1", duration=timedelta(seconds=1))
        before = job.lease_expires_at
        assert queue.heartbeat(session, job.id, "elsewhere:1:1", timedelta(minutes=5))
        session.refresh(job)
        assert job.lease_expires_at > before + timedelta(minutes=4)
        assert queue.sweep(session, "sweeper", now=utcnow()) == []


def test_queue_position_and_estimate(sessions):
    fill(sessions, n_main=3)
    with sessions() as session:
        submission = session.scalars(select(SubmissionRow)).first()
        assert queue.position(session, submission) == 0
        assert queue.estimated_wait(session, submission) is None  # no history yet
        job = queue.lease(session, "elsewhere:1:1")
        queue.transition(session, job, "succeeded", "elsewhere:1:1",
                         started_at=utcnow() - timedelta(seconds=30), finished_at=utcnow())
        session.commit()
        assert queue.estimated_wait(session, submission) < timedelta(seconds=1)  # none runs
        queue.lease(session, "elsewhere:2:2")  # one job running, one queued behind it
        assert queue.position(session, submission) == 0
        wait = queue.estimated_wait(session, submission)  # half a 30 s job still to run
        assert abs(wait - timedelta(seconds=15)) < timedelta(seconds=1)
