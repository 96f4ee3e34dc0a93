"""Fair share on both backends: a team's backlog never holds up another team's first job
by more than the slots, round-robin across a team's submissions, smoke jobs first, the GPU
filter, and the position/ETA a participant sees match what leasing then does."""

from __future__ import annotations

import itertools
import threading
from datetime import timedelta

import pytest

from engine import queue
from engine.db import session_factory
from engine.db.models import ChallengeRow, ImageRow, PhaseRow, SubmissionRow, TeamRow, utcnow
from tests.conftest import postgres_sessions

SLOTS = 4
_images = itertools.count()


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request, tmp_path):
    if request.param == "sqlite":
        return session_factory(f"sqlite:///{tmp_path / 'fair.db'}")
    return postgres_sessions()


def phase_of(session) -> PhaseRow:
    phase = session.query(PhaseRow).first()
    if phase is None:
        challenge = ChallengeRow(id="c", title="c", task="segmentation", definition={},
                                 definition_sha256="0" * 64)
        phase = PhaseRow(challenge=challenge, slug="p", dataset_path="/d", dataset_version="v",
                         case_ids=["a"])
        session.add(phase)
    return phase


def team(session, name: str) -> TeamRow:
    found = session.query(TeamRow).filter_by(name=name).first()
    return found or TeamRow(name=name)


def submit(session, team_name: str, n_main: int, n_smoke: int = 0, *,
           gpus: int = 0) -> SubmissionRow:
    image = ImageRow(image_id=f"sha256:{next(_images)}", tar_sha256=None, layers=[],
                     reference="x", architecture="amd64", user="1000", size_bytes=1)
    submission = SubmissionRow(phase=phase_of(session), team=team(session, team_name),
                               image=image)
    session.add(submission)
    session.flush()
    queue.enqueue(session, submission, [[f"s{i}"] for i in range(n_smoke)], kind="smoke",
                  actor="test")
    queue.enqueue(session, submission, [[f"m{i}"] for i in range(n_main)], kind="main",
                  actor="test", gpus=gpus)
    return submission


def lease_all(session, owner: str = "w") -> list[int]:
    """Lease until the queue is empty; the submission id of each lease, in order."""
    order = []
    while (job := queue.lease(session, f"{owner}:{len(order)}")) is not None:
        order.append(job.submission_id)
    return order


def finish(session, job, seconds: float) -> None:
    now = utcnow()
    queue.transition(session, job, "succeeded", job.lease_owner,
                     started_at=now - timedelta(seconds=seconds), finished_at=now)


def test_a_backlog_never_delays_another_teams_first_job_past_the_slots(sessions):
    with sessions() as session:
        big = submit(session, "big", n_main=2000)
        session.commit()
        for slot in range(SLOTS):  # the big team fills every slot
            queue.lease(session, f"slot:{slot}")
        small = submit(session, "small", n_main=1)
        session.commit()
        ahead = queue.position(session, small)
        assert ahead is not None and ahead <= SLOTS  # FIFO would say 1996
        order = [queue.lease(session, f"next:{i}").submission_id for i in range(ahead + 1)]
        assert order[-1] == small.id and big.id not in order[ahead:]
        session.commit()


def test_a_small_team_submitting_with_the_backlog_waits_at_most_the_slots(sessions):
    with sessions() as session:
        submit(session, "big", n_main=2000)
        small = submit(session, "small", n_main=3)
        session.commit()
        ahead = queue.position(session, small)
        assert ahead <= SLOTS
        order = [queue.lease(session, f"w:{i}").submission_id for i in range(8)]
        assert order.index(small.id) == ahead
        assert order.count(small.id) == 3  # and then it takes its turns, not one job in 2000
        session.commit()


def test_round_robin_across_one_teams_submissions(sessions):
    with sessions() as session:
        first = submit(session, "t", n_main=3)
        second = submit(session, "t", n_main=3)
        session.commit()
        assert queue.position(session, second) == 1
        assert lease_all(session) == [first.id, second.id] * 3
        session.commit()


def test_the_team_with_less_recent_service_goes_first(sessions):
    with sessions() as session:
        submit(session, "busy", n_main=1)
        session.commit()
        finish(session, queue.lease(session, "w:0"), seconds=100)  # 100 s of service lately
        session.commit()
        busy_again = submit(session, "busy", n_main=3)
        quiet = submit(session, "quiet", n_main=3)
        session.commit()
        # a job is expected to take 100 s: the quiet team gets one turn to catch up, then
        # the turns alternate (a tie goes to the team leased longest ago)
        assert lease_all(session) == [quiet.id, busy_again.id, quiet.id, busy_again.id,
                                      quiet.id, busy_again.id]
        session.commit()


def test_smoke_jobs_go_first_whatever_the_team(sessions):
    with sessions() as session:
        early = submit(session, "early", n_main=3)
        late = submit(session, "late", n_main=1, n_smoke=1)
        session.commit()
        assert queue.position(session, late) == 0
        first = queue.lease(session, "w:0")
        assert (first.submission_id, first.kind) == (late.id, "smoke")
        assert queue.position(session, early) == 0
        session.commit()


def test_a_node_without_gpus_skips_gpu_jobs_and_takes_the_next_team(sessions):
    with sessions() as session:
        submit(session, "cpu", n_main=1)
        gpu = submit(session, "gpu", n_main=1, gpus=1)
        session.commit()
        finish(session, queue.lease(session, "w:0"), seconds=50)  # cpu's turn used up
        again = submit(session, "cpu", n_main=1)
        session.commit()
        job = queue.lease(session, "cpu-node", gpus_available=0)
        assert job.submission_id == again.id and job.gpus == 0
        assert queue.lease(session, "cpu-node-2", gpus_available=0) is None
        assert queue.lease(session, "gpu-node", gpus_available=1).submission_id == gpu.id
        session.commit()


def test_concurrent_leasers_across_teams_never_share_a_job(sessions):
    with sessions() as session:
        for name in ("a", "b", "c"):
            for _ in range(2):
                submit(session, name, n_main=10)
        session.commit()
    taken: list[int] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        with sessions() as session:
            while (job := queue.lease(session, name)) is not None:
                session.commit()
                with lock:
                    taken.append(job.id)
            session.commit()

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(taken) == list(range(1, 61))  # every job once, none twice


def test_position_and_wait_match_what_leasing_then_does(sessions):
    with sessions() as session:
        history = submit(session, "c", n_main=1)
        session.commit()
        finish(session, queue.lease(session, "h:0"), seconds=30)
        session.commit()
        submissions = [submit(session, "a", n_main=5), submit(session, "b", n_main=2),
                       submit(session, "a", n_main=3, n_smoke=1), submit(session, "c", n_main=4),
                       submit(session, "b", n_main=1, n_smoke=1), submit(session, "d", n_main=2)]
        session.commit()
        assert queue.position(session, history) is None  # nothing of it queued
        predicted = {s.id: queue.position(session, s) for s in submissions}
        waits = {s.id: queue.estimated_wait(session, s) for s in submissions}
        order = lease_all(session)
        actual = {s.id: order.index(s.id) for s in submissions}
        assert predicted == actual
        for s in submissions:  # nothing runs yet: 30 s for every job ahead, on one worker
            assert abs(waits[s.id] - timedelta(seconds=30 * actual[s.id])) < timedelta(seconds=1)
        assert sorted(set(predicted.values())) == sorted(predicted.values())  # all distinct
        session.commit()


def test_a_smoke_lease_counts_in_the_round_robin_of_main_jobs(sessions):
    with sessions() as session:
        checked = submit(session, "t", n_main=2, n_smoke=1)
        other = submit(session, "t", n_main=2)
        session.commit()
        assert queue.position(session, other) == 1  # after the smoke job, before checked's
        assert lease_all(session) == [checked.id, other.id, checked.id, other.id, checked.id]
        session.commit()
