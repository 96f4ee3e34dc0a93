"""A worker survives anything one job does: real database, real containers, real files.

Faults of the platform (a runner, staging or scorer that raises) end THAT job as
INFRASTRUCTURE, with the traceback for organisers only, and the worker goes on; a
job swept out of attempts finishes its submission; a killed worker's directories
are removed by the next; a crashed multi-case run keeps the cases it wrote whole.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
from sqlalchemy import select

from engine import evaluation, queue
from engine import worker as worker_module
from engine.db.models import CaseResultRow, JobRow, SubmissionRow
from engine.reports import submission_report
from engine.submissions import register_challenge, submit
from engine.worker import Worker, claim_work_dir, dead_on_this_host
from engine.worker import agent as agent_module
from runners.base import RunResult, RunSpec
from runners.docker import DockerRunner, owner_alive, owner_token
from tests.conftest import REPO, build_image
from tests.engine_fixtures import make_scene, pin

pytestmark = pytest.mark.docker

DEAD_OWNER = f"{socket.gethostname()}:4194305:1"  # above any pid_max: a process that is gone


@pytest.fixture(scope="module")
def threshold(docker_engine):
    return build_image(REPO / "images/examples/threshold", "epreuve-example/threshold:latest")


@pytest.fixture(scope="module")
def tars(module_tmp):
    return module_tmp("tars")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request):
    if request.param == "sqlite":
        return None
    url = os.environ.get("EPREUVE_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("no PostgreSQL: set EPREUVE_TEST_POSTGRES_URL")
    from tests.conftest import postgres_sessions

    postgres_sessions()  # a clean schema
    return url


class RaisingForOneSubmission:
    """A Runner that raises for one submission's runs (a bug of ours), real for the others."""

    def __init__(self, real: DockerRunner, submission_id: int):
        self.real, self.submission_id = real, str(submission_id)

    def run(self, spec: RunSpec, cancel=None, *, on_log=None) -> RunResult:
        if spec.labels.get("org.epreuve.submission") == self.submission_id:
            raise RuntimeError("runner bug at /var/lib/secret/host/path")
        return self.real.run(spec, cancel)

    def has_image(self, image_id: str) -> bool:
        return self.real.has_image(image_id)

    def load_image(self, chunks) -> None:
        self.real.load_image(chunks)

    def answers(self) -> bool:
        return self.real.answers()


def two_submissions(scene, threshold, tars) -> tuple[int, int]:
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        pinned = pin(threshold, tars)
        victim = submit(session, "test-liver", "validation", "victim", pinned)
        other = submit(session, "test-liver", "validation", "other", pinned)
        session.commit()
        return victim.id, other.id


def fault_in(where: str, victim: int, monkeypatch, runner: DockerRunner):
    """Make `where` raise for the victim's jobs only; returns the worker's runner."""
    marker = f"submission-{victim}"
    if where == "runner":
        return RaisingForOneSubmission(runner, victim)
    if where == "staging":
        real_stage = agent_module.stage

        def stage(dataset, case_ids, destination):
            job = int(destination.parent.name.split("-")[1])  # .../job-<id>-<attempt>/input
            if job in victim_jobs:
                raise OSError(28, "No space left on device", str(destination))
            return real_stage(dataset, case_ids, destination)

        monkeypatch.setattr(agent_module, "stage", stage)
    if where == "scoring":
        real_score = evaluation.score_cases

        def score_cases(pairs, *args, **kwargs):
            if any(marker in str(pair.prediction) for pair in pairs):
                raise ZeroDivisionError("scorer bug")
            return real_score(pairs, *args, **kwargs)

        monkeypatch.setattr(evaluation, "score_cases", score_cases)
    return runner


victim_jobs: set[int] = set()


@pytest.mark.parametrize("where", ["runner", "staging", "scoring"])
def test_a_fault_ends_only_its_job_and_the_worker_goes_on(tmp_path, threshold, tars,
                                                          monkeypatch, where):
    scene = make_scene(tmp_path, validation_cases=1)
    victim, other = two_submissions(scene, threshold, tars)
    with scene.sessions() as session:
        victim_jobs.clear()
        victim_jobs.update(j.id for j in session.scalars(
            select(JobRow).where(JobRow.submission_id == victim)))
    real = DockerRunner(state_dir=scene.settings.state_dir / "runs")
    runner = fault_in(where, victim, monkeypatch, real)
    worker = Worker(scene.sessions, scene.settings, runner, scoring_workers=1)

    assert worker.run(until_idle=True) == 4  # the victim's job 3 times (retried), the other's

    with scene.sessions() as session:
        failed = session.get(SubmissionRow, victim)
        assert (failed.status, failed.reason) == ("failed", "INFRASTRUCTURE")
        assert failed.counts_against_quota is False
        job = session.scalars(select(JobRow).where(JobRow.submission_id == victim)).one()
        assert (job.status, job.reason, job.attempts) == ("failed", "INFRASTRUCTURE", 3)
        assert "not caused by your submission" in job.message
        detail = job.run_result["infrastructure_detail"]
        assert "Traceback" in detail
        assert {"runner": "runner bug", "staging": "No space left",
                "scoring": "scorer bug"}[where] in detail
        participant = json.dumps(submission_report(session, victim, participant=True),
                                 default=str)
        assert "Traceback" not in participant and "infrastructure_detail" not in participant
        assert "secret" not in participant and "scorer bug" not in participant
        assert session.get(SubmissionRow, other).status == "succeeded"
        results = session.scalars(select(CaseResultRow).where(
            CaseResultRow.submission_id == other)).all()
        assert [(r.case_id, r.valid) for r in results] == [("case-001", True)]


def test_a_validator_crashing_on_hostile_output_is_the_outputs_fault(tmp_path, threshold, tars,
                                                                      monkeypatch):
    scene = make_scene(tmp_path, validation_cases=1)
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        sub = submit(session, "test-liver", "validation", "t", pin(threshold, tars)).id
        session.commit()

    def crashing_validator(*args, **kwargs):
        raise MemoryError("a header claiming 2**60 voxels")

    monkeypatch.setattr(evaluation, "validate_segmentation", crashing_validator)
    worker = Worker(scene.sessions, scene.settings,
                    DockerRunner(state_dir=scene.settings.state_dir / "runs"), scoring_workers=1)
    assert worker.run(until_idle=True) == 1
    with scene.sessions() as session:
        submission = session.get(SubmissionRow, sub)
        assert (submission.status, submission.reason) == ("failed", "OUTPUT_INVALID")
        case = session.scalars(select(CaseResultRow)).one()
        assert (case.valid, case.reason) == (False, "OUTPUT_INVALID")
        assert "could not be read (MemoryError)" in case.message


def test_a_job_swept_out_of_attempts_finishes_its_submission(tmp_path, threshold, tars,
                                                             database_url):
    scene = make_scene(tmp_path, validation_cases=1, quota=1, database_url=database_url)
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        pinned = pin(threshold, tars)
        sub = submit(session, "test-liver", "validation", "t", pinned).id
        session.commit()
    worker = Worker(scene.sessions, scene.settings,
                    DockerRunner(state_dir=scene.settings.state_dir / "runs"))
    with scene.sessions() as session:
        for _ in range(2):  # two workers die holding it: re-queued each time
            assert queue.lease(session, DEAD_OWNER) is not None
            assert len(queue.sweep(session, "test", owner_dead=dead_on_this_host)) == 1
        assert queue.lease(session, DEAD_OWNER).attempts == 3  # and a third dies too
        session.commit()

    assert worker.run_once() is False  # swept out of attempts: nothing left to run

    with scene.sessions() as session:
        submission = session.get(SubmissionRow, sub)
        assert (submission.status, submission.reason) == ("failed", "INFRASTRUCTURE")
        assert submission.counts_against_quota is False
        assert submission.finished_at is not None
        job = session.scalars(select(JobRow)).one()
        assert (job.status, job.reason) == ("failed", "INFRASTRUCTURE")
        # the platform's failure did not use the team's only submission of the day
        assert submit(session, "test-liver", "validation", "t", pinned).id > sub
        session.commit()


KILLED_WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from engine.worker import claim_work_dir
    from runners.docker import owner_token
    mine = claim_work_dir(Path(sys.argv[1]), owner_token())
    staged = mine / "job-7-1" / "input" / "case-001"
    staged.mkdir(parents=True)
    (staged / "ct.nii.gz").write_bytes(b"x")
    for directory in (staged, staged.parent):
        directory.chmod(0o555)  # as staging leaves them: read-only
    print(mine, flush=True)
    time.sleep(600)
""")


def test_a_killed_workers_directories_are_removed_by_the_next(tmp_path):
    work = tmp_path / "work"
    child = subprocess.Popen([sys.executable, "-c", KILLED_WORKER, str(work)],
                             stdout=subprocess.PIPE, text=True, env={**os.environ,
                                                                     "PYTHONPATH": str(REPO)})
    left = work / os.path.basename(child.stdout.readline().strip())
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    alive = claim_work_dir(work, owner_token(os.getppid()))  # a live worker's: kept
    assert left.is_dir() and owner_alive(owner_token(os.getppid()))

    removed = worker_module.remove_dead_workers_dirs(work)

    assert removed == [left] and not left.exists()
    assert alive.is_dir()


def test_a_worker_starting_removes_dead_workers_dirs(tmp_path):
    scene = make_scene(tmp_path, validation_cases=1)
    dead = claim_work_dir(scene.settings.work_dir, DEAD_OWNER)
    (dead / "job-1-1").mkdir()
    worker = Worker(scene.sessions, scene.settings,
                    DockerRunner(state_dir=scene.settings.state_dir / "runs"))
    assert not dead.exists()
    assert worker.work_dir.is_dir() and worker.work_dir.parent == scene.settings.work_dir


PARTIAL = textwrap.dedent("""\
    FROM epreuve-example/threshold:latest
    # writes every case, then "crashes" on the second case of a shard: only the first is kept
    ENTRYPOINT ["sh", "-c", "python3 /opt/algorithm/segment.py; [ -d /input/case-001 ] && exit 0; \\
        rm -rf /output/case-003 /output/case-004; echo crashed on case-003 >&2; exit 1"]
""")


def test_a_crash_in_a_shard_keeps_the_cases_written_whole(tmp_path, threshold, tars):
    build = tmp_path / "partial"
    build.mkdir()
    (build / "Dockerfile").write_text(PARTIAL)
    subprocess.run(["docker", "build", "-q", "--network", "none", "-t",
                    "epreuve-test/partial:latest", str(build)], check=True, capture_output=True,
                   env={"DOCKER_BUILDKIT": "0", "PATH": os.environ["PATH"]})
    scene = make_scene(tmp_path, validation_cases=4, cases_per_run=3)
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        sub = submit(session, "test-liver", "validation", "t",
                     pin("epreuve-test/partial:latest", tars)).id
        session.commit()
    worker = Worker(scene.sessions, scene.settings,
                    DockerRunner(state_dir=scene.settings.state_dir / "runs"), scoring_workers=1)
    assert worker.run(until_idle=True) == 2  # the smoke job, then one shard of three

    with scene.sessions() as session:
        main = session.scalars(select(JobRow).where(JobRow.kind == "main")).one()
        assert (main.status, main.reason) == ("failed", "NONZERO_EXIT")
        cases = {r.case_id: r for r in session.scalars(select(CaseResultRow).where(
            CaseResultRow.submission_id == sub))}
        assert sorted(cases) == ["case-001", "case-002", "case-003", "case-004"]
        assert cases["case-002"].valid and cases["case-002"].metrics["dice[1]"] > 0.8
        assert len(cases["case-002"].output_sha256["mask.nii.gz"]) == 64
        for lost in ("case-003", "case-004"):
            assert (cases[lost].valid, cases[lost].reason) == (False, "NONZERO_EXIT")
            assert cases[lost].message == main.message
            assert "exited with code 1" in cases[lost].message

