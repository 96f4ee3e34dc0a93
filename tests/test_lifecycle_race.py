"""Two jobs of one submission ending at the same moment (PostgreSQL, two transactions): the
later one must see the other's end and end the submission. Without the submission's row
lock in `after_job`, each saw the other still pending and the submission stayed running."""

from __future__ import annotations

import os
import threading
import time

import pytest
from sqlalchemy import text

from engine import queue
from engine.db.models import JobRow, SubmissionRow
from engine.lifecycle import after_job
from engine.statuses import JobKind, JobStatus, SubmissionStatus
from engine.submissions import register_challenge, submit
from tests.conftest import postgres_sessions
from tests.engine_fixtures import make_scene
from tests.test_metrics import pinned, step


def _end(session, job_id: int, owner: str) -> None:
    job = session.get(JobRow, job_id)
    queue.transition(session, job, JobStatus.SUCCEEDED, owner)
    after_job(session, job, "test")


def _someone_waits_on_a_lock(sessions) -> bool:
    # a new transaction each time: pg_stat_activity is one snapshot per transaction
    with sessions() as session:
        return bool(session.scalar(text(
            "select count(*) from pg_stat_activity where wait_event_type = 'Lock' "
            "and datname = current_database()")))


def test_two_jobs_ending_at_once_end_their_submission(tmp_path):
    if not os.environ.get("EPREUVE_TEST_POSTGRES_URL"):
        pytest.skip("no PostgreSQL: run scripts/start-postgres, set EPREUVE_TEST_POSTGRES_URL")
    postgres_sessions()  # a clean schema
    scene = make_scene(tmp_path, database_url=os.environ["EPREUVE_TEST_POSTGRES_URL"])
    sessions = scene.sessions
    with sessions() as session:
        register_challenge(session, scene.challenge_file)
        submission_id = submit(session, "test-liver", "validation", "alpha", pinned(1)).id
        session.commit()
    with sessions() as session:
        smoke = queue.lease(session, "w-smoke")
        step(session, smoke, "w-smoke", JobStatus.RUNNING, JobStatus.SCORING,
             JobStatus.SUCCEEDED)
        after_job(session, smoke, "test")
        session.commit()
        mains = []
        for owner in ("w-a", "w-b"):
            job = queue.lease(session, owner)
            assert job is not None and job.kind == JobKind.MAIN
            step(session, job, owner, JobStatus.RUNNING, JobStatus.SCORING)
            mains.append((job.id, owner))
        assert session.scalar(text("select count(*) from jobs where submission_id = :s and "
                                   "status = 'queued'"), {"s": submission_id}) == 0
    first, second = sessions(), sessions()
    _end(first, *mains[0])  # its transaction stays open
    done = threading.Event()

    def end_second() -> None:
        try:
            _end(second, *mains[1])
            second.commit()
        finally:
            done.set()

    thread = threading.Thread(target=end_second, daemon=True)
    thread.start()
    try:  # the second waits on the submission's lock, or is done
        deadline = time.monotonic() + 30
        while not done.is_set() and not _someone_waits_on_a_lock(sessions):
            assert time.monotonic() < deadline, "the second job's end neither waited nor ended"
            time.sleep(0.05)
        first.commit()
    finally:
        first.close()  # a failure above must not leave the second waiting for ever
    thread.join(timeout=60)
    second.close()
    with sessions() as session:
        assert session.get(SubmissionRow, submission_id).status == SubmissionStatus.SUCCEEDED
