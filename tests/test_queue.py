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
from engine.worker import dead_on_this_host
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
        session.commit()


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
                session.commit()  # each lease its own unit of work, as a coordinator's
                with lock:
                    taken.append(job.id)
            session.commit()

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
        assert queue.sweep(session, "sweeper") == []  # the queue alone sees no process
        assert queue.sweep(session, "sweeper", owner_dead=dead_on_this_host) == [job.id]
        session.commit()


def test_a_swept_job_is_no_longer_ours(sessions):
    fill(sessions, n_main=1)
    with sessions() as session:
        job = queue.lease(session, "elsewhere:1:1", duration=timedelta(seconds=-1))
        queue.sweep(session, "sweeper")
        assert not queue.heartbeat(session, job.id, "elsewhere:1:1")
        session.refresh(job)
        with pytest.raises(queue.LeaseLost):
            queue.transition(session, job, "running", "elsewhere:1:1")
        session.commit()


def test_heartbeats_renew_the_lease(sessions):
    fill(sessions, n_main=1)
    with sessions() as session:
        job = queue.lease(session, "elsewhere:1:1", duration=timedelta(seconds=1))
        before = job.lease_expires_at
        assert queue.heartbeat(session, job.id, "elsewhere:1:1", timedelta(minutes=5))
        session.refresh(job)
        assert job.lease_expires_at > before + timedelta(minutes=4)
        assert queue.sweep(session, "sweeper", now=utcnow()) == []
        session.commit()


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


def events_of(session, job_id: int) -> list[tuple[str | None, str, str | None]]:
    return [(e.from_state, e.to_state, e.detail) for e in session.scalars(
        select(EventRow).where(EventRow.entity == "job", EventRow.entity_id == job_id)
        .order_by(EventRow.id))]


def test_release_for_retry_queues_the_job_again_until_it_runs_out_of_attempts(sessions):
    fill(sessions, n_main=1)
    with sessions() as session:
        job = queue.lease(session, "w:1:1")
        job.max_attempts = 2
        session.commit()
        queue.release_for_retry(session, job, "w:1:1", "INFRASTRUCTURE", "disk full")
        session.commit()
        session.refresh(job)
        assert (job.status, job.attempts, job.lease_owner, job.lease_expires_at) == (
            "queued", 1, None, None)
        assert (job.reason, job.message, job.finished_at) == (None, None, None)

        again = queue.lease(session, "w:2:2")
        assert again.id == job.id and again.attempts == 2
        queue.release_for_retry(session, again, "w:2:2", "INFRASTRUCTURE", "disk full")
        session.commit()
        session.refresh(job)
        assert (job.status, job.attempts, job.reason, job.message, job.lease_owner) == (
            "failed", 2, "INFRASTRUCTURE", "disk full", None)
        assert job.finished_at is not None
        assert queue.lease(session, "w:3:3") is None  # a failed job is never leased again
        assert events_of(session, job.id) == [
            (None, "queued", "main job over 1 case(s)"),
            ("queued", "leased", None),
            ("leased", "queued", "retry: disk full"),
            ("queued", "leased", None),
            ("leased", "failed", "disk full"),
        ]


def test_only_the_lease_holder_may_release_a_job(sessions):
    fill(sessions, n_main=1)
    with sessions() as session:
        job = queue.lease(session, "w:1:1")
        with pytest.raises(queue.LeaseLost):
            queue.release_for_retry(session, job, "someone-else:2:2", "INFRASTRUCTURE", "x")
        session.refresh(job)
        assert (job.status, job.lease_owner, job.attempts) == ("leased", "w:1:1", 1)
        session.commit()


def test_a_job_out_of_attempts_fails_with_its_reason_and_message(sessions):
    fill(sessions, n_main=1)
    with sessions() as session:
        for attempt in range(1, 4):  # the default: three attempts
            job = queue.lease(session, f"w:{attempt}:1")
            assert (job.attempts, job.max_attempts) == (attempt, 3)
            queue.release_for_retry(session, job, f"w:{attempt}:1", "INFRASTRUCTURE",
                                    f"attempt {attempt}: the node lost its GPU")
            session.commit()
        session.refresh(job)
        assert (job.status, job.attempts, job.reason, job.message) == (
            "failed", 3, "INFRASTRUCTURE", "attempt 3: the node lost its GPU")
        assert [d for _, to, d in events_of(session, job.id) if to == "queued"][1:] == [
            "retry: attempt 1: the node lost its GPU", "retry: attempt 2: the node lost its GPU"]
