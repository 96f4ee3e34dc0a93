"""The whole engine through real containers: YAML -> submissions -> worker -> leaderboard."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from engine.datasets import load
from engine.db.models import CaseResultRow, EventRow, JobRow, SubmissionRow
from engine.leaderboard import leaderboard, stability
from engine.reports import submission_report
from engine.submissions import SubmissionRefused, register_challenge, submit
from engine.worker import Worker
from runners.docker import LABEL_OWNER, DockerRunner, owner_token
from tests.engine_fixtures import build_examples, make_scene, pin

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def images(docker_engine, module_tmp):
    return build_examples(module_tmp("example-images"))


@pytest.fixture(scope="module")
def tars(module_tmp):
    return module_tmp("tars")


def worker_for(scene, **kwargs) -> Worker:
    runner = DockerRunner(state_dir=scene.settings.state_dir / "runs")
    return Worker(scene.sessions, scene.settings, runner, scoring_workers=1, **kwargs)


def test_full_challenge_from_yaml_to_leaderboard(tmp_path, images, tars):
    scene = make_scene(tmp_path)
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        full = submit(session, "test-liver", "validation", "full", pin(images["threshold"], tars))
        ablated = submit(session, "test-liver", "validation", "ablated",
                         pin(images["no-smoothing"], tars))
        full_id, ablated_id = full.id, ablated.id
        session.commit()
    assert worker_for(scene).run(until_idle=True) == 6  # 2 smoke + 2x2 main jobs

    with scene.sessions() as session:
        for submission_id in (full_id, ablated_id):
            submission = session.get(SubmissionRow, submission_id)
            assert submission.status == "succeeded", submission.message
            results = session.scalars(select(CaseResultRow).where(
                CaseResultRow.submission_id == submission_id)).all()
            assert sorted(r.case_id for r in results) == ["case-001", "case-002", "case-003"]
            assert all(r.valid and r.runtime_exact and r.runtime_seconds > 0 for r in results)
            assert all(len(r.output_sha256["mask.nii.gz"]) == 64 for r in results)
        board = leaderboard(session, "test-liver", "validation")
        assert [(e.team, e.rank) for e in board] == [("full", 1), ("ablated", 2)]
        assert board[0].scores["dice[1]"] > 0.8
        assert board[1].scores["hd95[1]"] > board[0].scores["hd95[1]"]  # noise far away
        assert all(e.n_failed == 0 and e.runtime_per_case > 0 for e in board)
        report = submission_report(session, full_id)
        assert [j["kind"] for j in report["jobs"]] == ["smoke", "main", "main"]
        firmness = stability(session, "test-liver", "validation", resamples=50, seed=1)
        assert firmness == stability(session, "test-liver", "validation", resamples=50, seed=1)
        cases = {sid: {r.case_id: r.metrics for r in session.scalars(select(CaseResultRow).where(
            CaseResultRow.submission_id == sid))} for sid in (full_id, ablated_id)}
        for case_id, ours in cases[full_id].items():  # full wins every case on both metrics...
            theirs = cases[ablated_id][case_id]
            assert ours["dice[1]"] > theirs["dice[1]"] and ours["hd95[1]"] < theirs["hd95[1]"]
        # ... so every resample ranks it first, as the full data does: tau is 1 every time
        assert (firmness["kendall_tau_mean"], firmness["kendall_tau_median"]) == (1.0, 1.0)
        assert firmness["rank_frequencies"] == {"full": {1: 1.0}, "ablated": {2: 1.0}}
        assert any(e["change"] == "scoring -> succeeded" for e in report["events"])


def test_broken_image_is_stopped_after_the_smoke_job(tmp_path, images, tars):
    scene = make_scene(tmp_path)
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        broken = submit(session, "test-liver", "validation", "broken", pin(images["broken"], tars))
        session.commit()
    assert worker_for(scene).run(until_idle=True) == 1
    with scene.sessions() as session:
        submission = session.get(SubmissionRow, broken.id)
        assert submission.status == "failed" and submission.reason == "NONZERO_EXIT"
        assert "the rest were not run" in submission.message
        assert session.scalar(select(func.count()).select_from(JobRow).where(
            JobRow.submission_id == broken.id)) == 1
        participant = submission_report(session, broken.id, participant=True)
        assert "weights.pt" in participant["jobs"][0]["log_tail"]  # logs allowed in validation


def test_wrong_output_name_fails_at_the_smoke_job_with_a_typed_reason(tmp_path, images, tars):
    scene = make_scene(tmp_path)
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        sub = submit(session, "test-liver", "validation", "t", pin(images["wrong-name"], tars))
        session.commit()
    worker_for(scene).run(until_idle=True)
    with scene.sessions() as session:
        submission = session.get(SubmissionRow, sub.id)
        assert submission.reason == "OUTPUT_MISSING"
        assert "prediction.nii.gz" in submission.message  # says what it found instead


def test_sealed_final_phase_hides_logs_and_cases_from_participants(tmp_path, images, tars):
    scene = make_scene(tmp_path)
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        sub = submit(session, "test-liver", "final", "t", pin(images["broken"], tars))
        session.commit()
    worker_for(scene).run(until_idle=True)
    with scene.sessions() as session:
        view = submission_report(session, sub.id, participant=True)
        assert view["reason"] == "NONZERO_EXIT"  # the typed reason is always shown
        assert "log_tail" not in view["jobs"][0] and "cases" not in view
        organiser = submission_report(session, sub.id)
        assert "log_tail" in organiser["jobs"][0] and "cases" in organiser


def test_worker_killed_mid_run_loses_nothing(tmp_path, images, tars):
    scene = make_scene(tmp_path, cases_per_run=3)
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        sub = submit(session, "test-liver", "validation", "slow", pin(images["slow"], tars))
        session.commit()
    env = {**os.environ, "EPREUVE_DATA_DIR": str(scene.settings.data_dir),
           "EPREUVE_STATE_DIR": str(scene.settings.state_dir)}
    epreuve = [str(Path(sys.executable).parent / "epreuve"), "worker", "--until-idle",
               "--lease-seconds", "600", "--heartbeat-seconds", "1"]
    first = subprocess.Popen(epreuve, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    # the daemon is shared: only this worker's containers are ours to look at
    first_owner = {"label": [f"{LABEL_OWNER}={owner_token(first.pid)}"]}
    runner = DockerRunner(state_dir=scene.settings.state_dir / "probe", reap_orphans=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not runner.api.containers(filters=first_owner):
        time.sleep(0.2)
    assert runner.api.containers(filters=first_owner)
    os.kill(first.pid, signal.SIGKILL)  # mid-run: the container sleeps for 20 s
    first.wait()

    # A second worker: reaps the orphan container, re-queues the job (its owner is dead,
    # long before the 600 s lease would expire), runs it, and writes each case once.
    second = subprocess.Popen(epreuve, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    second_owner = {"label": [f"{LABEL_OWNER}={owner_token(second.pid)}"]}
    _, stderr = second.communicate(timeout=300)
    assert second.returncode == 0, stderr
    with scene.sessions() as session:
        submission = session.get(SubmissionRow, sub.id)
        assert submission.status == "succeeded", submission.message
        cases = session.scalars(select(CaseResultRow.case_id).where(
            CaseResultRow.submission_id == sub.id)).all()
        assert sorted(cases) == sorted(load(scene.root / "data/validation").case_ids)
        smoke = session.scalars(select(JobRow).where(JobRow.submission_id == sub.id)).first()
        assert smoke.attempts == 2
        assert session.scalar(select(func.count()).select_from(EventRow).where(
            EventRow.detail.like("%worker process died%"))) == 1
    for owner in (first_owner, second_owner):
        assert runner.api.containers(all=True, filters=owner) == []


def test_quota_refusal(tmp_path, images, tars):
    """The other half, that the platform's own failures do not count, is in
    test_platform_failures.py: the engine sets counts_against_quota there."""
    scene = make_scene(tmp_path, quota=1)
    pinned = pin(images["threshold"], tars)
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        first = submit(session, "test-liver", "validation", "t", pinned)
        assert first.counts_against_quota is True
        next_slot = first.created_at + timedelta(days=1)
        with pytest.raises(SubmissionRefused, match=re.escape(
                f"team t has used its quota of 1 submission(s) per 1 day in phase validation; "
                f"the next one is possible from {next_slot:%Y-%m-%d %H:%M} UTC (failures "
                "caused by the platform do not count)")):
            submit(session, "test-liver", "validation", "t", pinned)
        assert submit(session, "test-liver", "validation", "other-team", pinned).id == \
            first.id + 1
        session.commit()


def test_closed_phase_refuses_submissions(tmp_path, images, tars):
    scene = make_scene(tmp_path)
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        with pytest.raises(SubmissionRefused, match="is not open: it closed 2020-01-01"):
            submit(session, "test-liver", "closed", "t", pin(images["threshold"], tars))
        session.commit()


def test_prize_requires_source_and_license(tmp_path, images, tars):
    scene = make_scene(tmp_path)
    pinned = pin(images["threshold"], tars)
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        hidden = submit(session, "test-liver", "final", "a", pinned)
        assert not hidden.prize_eligible
        assert "public source URL" in hidden.prize_note and "SPDX" in hidden.prize_note
        odd = submit(session, "test-liver", "final", "b", pinned,
                     source_url="https://example.org/code", license_id="Proprietary-1.0")
        assert not odd.prize_eligible and "'Proprietary-1.0' is not one" in odd.prize_note
        open_code = submit(session, "test-liver", "final", "c", pinned,
                           source_url="https://example.org/code", license_id="Apache-2.0")
        assert open_code.prize_eligible and open_code.prize_note is None
        assert hidden.image_pk == odd.image_pk == open_code.image_pk  # one image, recognised
        session.commit()


def test_check_reports_what_the_platform_would(tmp_path, images):
    from engine.check import dry_run

    scene = make_scene(tmp_path)
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        good = dry_run(session, scene.settings, images["threshold"], "test-liver", "validation")
        bad = dry_run(session, scene.settings, images["broken"], "test-liver", "validation")
        named = dry_run(session, scene.settings, images["wrong-name"], "test-liver", None)
        session.commit()
    assert good["ok"] and good["cases"]["case-001"]["metrics"]["dice[1]"] > 0.8
    assert not bad["ok"] and bad["reason"] == "NONZERO_EXIT"
    assert not named["ok"] and named["reason"] == "OUTPUT_MISSING"
    with scene.sessions() as session:
        assert session.scalar(select(func.count()).select_from(SubmissionRow)) == 0


def test_cancel_stops_a_running_job_and_writes_nothing(tmp_path, images, tars):
    import threading

    from engine.lifecycle import cancel

    scene = make_scene(tmp_path, cases_per_run=3)
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        sub = submit(session, "test-liver", "validation", "slow", pin(images["slow"], tars))
        session.commit()
    worker = worker_for(scene, heartbeat_seconds=0.5)
    thread = threading.Thread(target=worker.run, kwargs={"until_idle": True})
    started = time.monotonic()
    thread.start()
    mine = {"label": [f"{LABEL_OWNER}={worker.runner.owner}"]}  # the daemon is shared
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not worker.runner.api.containers(filters=mine):
        time.sleep(0.2)
    with scene.sessions() as session:
        cancel(session, sub.id, "organiser", "wrong phase")
        session.commit()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert time.monotonic() - started < 20  # the container sleeps 20 s before any work
    with scene.sessions() as session:
        submission = session.get(SubmissionRow, sub.id)
        assert submission.status == "cancelled" and submission.reason == "CANCELLED"
        assert "wrong phase" in submission.message
        assert session.scalars(select(CaseResultRow).where(
            CaseResultRow.submission_id == sub.id)).all() == []
    assert worker.runner.api.containers(all=True, filters=mine) == []


def test_the_engine_on_postgresql(tmp_path, images, tars):
    """Migrations, JSON columns, time zones and leasing on a real PostgreSQL server."""
    from tests.conftest import postgres_sessions

    postgres_sessions()  # a clean schema (fails in CI, skips locally, without a server)
    scene = make_scene(tmp_path, scheme="aggregate-then-rank",
                       database_url=os.environ["EPREUVE_TEST_POSTGRES_URL"])
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        good = submit(session, "test-liver", "validation", "good", pin(images["threshold"], tars))
        broken = submit(session, "test-liver", "validation", "broken", pin(images["broken"], tars))
        session.commit()
    assert worker_for(scene).run(until_idle=True) == 4  # 1 + 2 for good, 1 for broken
    with scene.sessions() as session:
        assert session.get(SubmissionRow, good.id).status == "succeeded"
        assert session.get(SubmissionRow, broken.id).reason == "NONZERO_EXIT"
        (entry,) = leaderboard(session, "test-liver", "validation")
        assert entry.team == "good" and entry.scores["dice[1]"] > 0.8
        assert session.get(SubmissionRow, good.id).created_at.tzinfo is not None
