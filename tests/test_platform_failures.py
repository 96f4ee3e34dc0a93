"""The platform's own failures, through the real engine: each ends as INFRASTRUCTURE (retried,
never counted against the team) or with the exact typed reason the documentation gives.

Real containers and a real sealed dataset throughout; the only fake is a GPU UUID handed
to an allocator of its own (no container ever receives it), where no GPU exists.
"""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import docker
import pytest
from sqlalchemy import select

from engine.db.models import CaseResultRow, EventRow, JobRow, SubmissionRow
from engine.leaderboard import leaderboard
from engine.reports import submission_report
from engine.submissions import register_challenge, submit
from engine.worker import Worker
from gpu.allocator import GPUAllocator
from gpu.inventory import list_gpus
from runners.docker import DockerRunner
from tests.conftest import REPO, build_image
from tests.engine_fixtures import build_examples, make_scene, pin

pytestmark = pytest.mark.docker

MAX_ATTEMPTS = 3  # engine.queue.enqueue's default: every job gets three tries

EVALUATOR_CHALLENGE = """
id: eval-liver
title: Scored by the organisers' own image
task: segmentation
output: {{kind: segmentation, filename: mask.nii.gz, labels: [0, 1, 2, 3]}}
metrics:
  evaluation_image: {evaluator}
  evaluator_metrics:
    - {{name: dice, larger_is_better: true, worst: 0.0}}
    - {{name: false_positive_ml, larger_is_better: false, worst: 1000.0}}
ranking: {{metrics: [{{metric: dice}}, {{metric: false_positive_ml}}]}}
phases:
  - id: test
    dataset: {{path: data/validation}}
    cases_per_run: 2
    limits: {{memory: 1g, time_per_case: 60s}}
"""

# Organisers' evaluators gone wrong, built on the example evaluator.
EVALUATOR_VARIANTS = {
    "evaluator-crashes": 'ENTRYPOINT ["sh", "-c", "echo evaluator: licence file missing >&2; '
                         'exit 1"]',
    # scores every case, then drops one metric of case-002 (a case of the main job)
    "evaluator-drops-a-metric": textwrap.dedent("""\
        ENTRYPOINT ["sh", "-c", "python3 /opt/evaluator/evaluate.py && python3 -c \\"import \\
        json; p = '/output/metrics.json'; m = json.load(open(p)); \\
        m['cases'].get('case-002', {}).pop('false_positive_ml', 0); \\
        json.dump(m, open(p, 'w'))\\""]"""),
}


def docker_build(directory: Path, tag: str, dockerfile: str) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "Dockerfile").write_text(dockerfile)
    subprocess.run(["docker", "build", "-q", "--network", "none", "-t", tag, str(directory)],
                   check=True, capture_output=True,
                   env={"DOCKER_BUILDKIT": "0", "PATH": "/usr/bin:/usr/local/bin:/bin"})
    return tag


@pytest.fixture(scope="module")
def images(docker_engine, module_tmp):
    return build_examples(module_tmp("example-images"))


@pytest.fixture(scope="module")
def evaluators(docker_engine, module_tmp):
    base = build_image(REPO / "images/examples/evaluator", "epreuve-test/evaluator:latest")
    root = module_tmp("evaluators")
    return {name: docker_build(root / name, f"epreuve-test/{name}:latest",
                               f"FROM {base}\n{entrypoint}\n")
            for name, entrypoint in EVALUATOR_VARIANTS.items()}


@pytest.fixture(scope="module")
def tars(module_tmp):
    return module_tmp("tars")


def worker_for(scene, runner: DockerRunner | None = None) -> Worker:
    runner = runner or DockerRunner(state_dir=scene.settings.state_dir / "runs")
    return Worker(scene.sessions, scene.settings, runner, scoring_workers=1)


def only_job(session, submission_id: int) -> JobRow:
    (job,) = session.scalars(select(JobRow).where(JobRow.submission_id == submission_id)).all()
    return job


def retry_details(session, job_id: int) -> list[str]:
    return list(session.scalars(select(EventRow.detail).where(
        EventRow.entity == "job", EventRow.entity_id == job_id,
        EventRow.to_state == "queued", EventRow.from_state.is_not(None)).order_by(EventRow.id)))


def assert_failed_by_the_platform(session, submission_id: int, job_message: str) -> None:
    """Out of attempts: the job and its submission failed INFRASTRUCTURE, free of quota."""
    job = only_job(session, submission_id)
    assert (job.status, job.reason, job.attempts) == ("failed", "INFRASTRUCTURE", MAX_ATTEMPTS)
    assert job.message == job_message
    assert retry_details(session, job.id) == [f"retry: {job_message}"] * (MAX_ATTEMPTS - 1)
    submission = session.get(SubmissionRow, submission_id)
    assert (submission.status, submission.reason) == ("failed", "INFRASTRUCTURE")
    assert submission.message == ("the smoke case failed, so the rest were not run: "
                                  + job_message)
    assert submission.counts_against_quota is False  # set by the engine, not by a test
    assert session.scalars(select(CaseResultRow).where(
        CaseResultRow.submission_id == submission_id)).all() == []
    # the team reads that it was not their fault, and nothing of the host (paths, files)
    view = submission_report(session, submission_id, participant=True)
    expected = ("The platform failed to run this submission (not your submission's fault): "
                "it is retried, and it never counts against your quota.")
    assert view["message"] == expected
    assert [job["message"] for job in view["jobs"]] == [expected]


def tamper(path: Path) -> None:
    """Flip one byte of a sealed (read-only) file, as a disk fault or an intruder would."""
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    path.chmod(0o444)


def test_a_test_set_failing_verification_is_the_platforms_failure(tmp_path, images, tars):
    scene = make_scene(tmp_path, quota=1)
    pinned = pin(images["threshold"], tars)
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        sub = submit(session, "test-liver", "validation", "t", pinned)
        session.commit()
    tamper(scene.root / "data/validation/ground_truth/case-002/label.nii.gz")

    assert worker_for(scene).run(until_idle=True) == MAX_ATTEMPTS  # no container ever ran
    dataset = scene.root / "data/validation"
    with scene.sessions() as session:
        version = session.get(SubmissionRow, sub.id).phase.dataset_version
        assert_failed_by_the_platform(session, sub.id, (
            f"the test set failed verification: dataset {dataset} no longer matches its seal "
            f"({version[:12]}):\n  changed: ground_truth/case-002/label.nii.gz"))
        # the quota of one is still free: the platform's failure cost the team nothing
        assert submit(session, "test-liver", "validation", "t", pinned).id == sub.id + 1
        session.commit()


def relabel_one_voxel(path):
    """A valid ground truth that differs from the sealed one (seal decodes every image)."""
    import nibabel as nib
    import numpy as np

    image = nib.load(path)
    labels = np.asanyarray(image.dataobj).copy()
    labels.flat[0] = 1 - labels.flat[0] if labels.flat[0] in (0, 1) else 0
    path.chmod(0o644)
    nib.save(nib.Nifti1Image(labels, image.affine, image.header), path)


def test_a_test_set_resealed_after_the_phase_was_created_is_refused_by_the_worker(
        tmp_path, images, tars):
    from engine.datasets import seal

    scene = make_scene(tmp_path)
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        sub = submit(session, "test-liver", "validation", "t", pin(images["threshold"], tars))
        created_with = session.get(SubmissionRow, sub.id).phase.dataset_version
        session.commit()
    dataset = scene.root / "data/validation"
    relabel_one_voxel(dataset / "ground_truth/case-002/label.nii.gz")
    resealed = seal(dataset).version  # intact again, but not the data the phase was made with

    worker_for(scene).run(until_idle=True)
    with scene.sessions() as session:
        job_id = only_job(session, sub.id).id
        assert_failed_by_the_platform(session, sub.id, (
            f"the test set failed verification: job {job_id} was queued for dataset version "
            f"{created_with[:12]}, but the phase's dataset was re-sealed since (now "
            f"{resealed[:12]}): it is not run against different inputs. The submission ends "
            "as the platform's failure, never counted against the team's quota, and needs a "
            "re-run: the team submits again"))


def unreachable_daemon(scene) -> DockerRunner:
    """A runner whose Docker Engine stopped answering after the worker started."""
    runner = DockerRunner(state_dir=scene.settings.state_dir / "runs")
    runner.api = docker.APIClient(base_url=f"unix://{scene.root / 'no-dockerd.sock'}",
                                  version=runner.api.api_version, timeout=5)
    runner.client.api = runner.api
    return runner


def test_infrastructure_failures_do_not_count_against_the_quota(tmp_path, images, tars):
    scene = make_scene(tmp_path, quota=1)
    pinned = pin(images["threshold"], tars)
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        sub = submit(session, "test-liver", "validation", "t", pinned)
        session.commit()
    assert worker_for(scene, unreachable_daemon(scene)).run(until_idle=True) == MAX_ATTEMPTS
    with scene.sessions() as session:
        job = only_job(session, sub.id)
        assert job.message.startswith("The platform failed to run the container (ConnectionError")
        assert job.message.endswith("This is not caused by your submission; the run is retried "
                                    "automatically.")
        assert_failed_by_the_platform(session, sub.id, job.message)
        view = submission_report(session, sub.id, participant=True)
        assert (view["status"], view["reason"]) == ("failed", "INFRASTRUCTURE")
        assert submit(session, "test-liver", "validation", "t", pinned).id == sub.id + 1
        session.commit()


def gpu_scene(tmp_path):
    scene = make_scene(tmp_path)
    text = scene.challenge_file.read_text().replace(
        "limits: {memory: 1g, cpus: 1, time_per_case: 60s, output_quota: 64m}\n    visibility",
        "limits: {memory: 1g, cpus: 1, time_per_case: 60s, output_quota: 64m, gpus: 1}\n"
        "    visibility", 1)
    assert "gpus: 1" in text
    scene.challenge_file.write_text(text)
    return scene


def test_a_gpu_job_waits_on_a_node_without_gpus(tmp_path, images, tars):
    if list_gpus():
        pytest.skip("this node has a GPU: the job would run here")
    scene = gpu_scene(tmp_path)
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        sub = submit(session, "test-liver", "validation", "t", pin(images["threshold"], tars))
        session.commit()
    assert worker_for(scene).run(until_idle=True) == 0  # never leased here, never failed
    with scene.sessions() as session:
        job = only_job(session, sub.id)
        assert (job.status, job.gpus, job.attempts, job.reason) == ("queued", 1, 0, None)
        report = submission_report(session, sub.id)
        assert (report["status"], report["queue"]) == (
            "queued", {"jobs_ahead": 0, "estimated_start_seconds": None})


def test_gpus_taken_between_lease_and_allocation_are_the_platforms_failure(
        tmp_path, images, tars):
    """Another worker on the node takes the last GPU after this one leased a GPU job."""
    scene = gpu_scene(tmp_path)
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        sub = submit(session, "test-liver", "validation", "t", pin(images["threshold"], tars))
        session.commit()
    worker = Worker(scene.sessions, scene.settings,
                    DockerRunner(state_dir=scene.settings.state_dir / "runs"), scoring_workers=1,
                    gpus=["GPU-00000000-fake-0000-0000-000000000000"])  # an injected inventory
    for _ in range(MAX_ATTEMPTS):
        ticket = worker.coordinator.lease(worker.gpus.free_count())
        assert ticket is not None and ticket.submission_id == sub.id and ticket.gpus == 1
        with GPUAllocator(worker.gpus.uuids, worker.gpus.lock_dir).allocate(1):  # another worker
            worker.process(ticket)
    assert worker.coordinator.lease(1) is None
    with scene.sessions() as session:
        assert_failed_by_the_platform(session, sub.id, "1 GPU(s) wanted, 0 free of 1")


def evaluator_scene(tmp_path, evaluator: str):
    scene = make_scene(tmp_path)
    challenge = tmp_path / "eval-liver.yaml"
    challenge.write_text(EVALUATOR_CHALLENGE.format(evaluator=evaluator))
    return scene, challenge


def test_an_evaluation_image_that_fails_is_the_platforms_failure(tmp_path, images, evaluators,
                                                                 tars):
    scene, challenge = evaluator_scene(tmp_path, evaluators["evaluator-crashes"])
    with scene.sessions() as session:
        register_challenge(session, challenge)
        sub = submit(session, "eval-liver", "test", "t", pin(images["threshold"], tars))
        session.commit()
    assert worker_for(scene).run(until_idle=True) == MAX_ATTEMPTS
    with scene.sessions() as session:
        assert_failed_by_the_platform(session, sub.id, (
            "the organisers' evaluation image failed: the evaluation image failed: The "
            "container exited with code 1. The end of its log usually says why."))


def test_an_evaluation_image_leaving_out_a_metric_fails_that_case(tmp_path, images, evaluators,
                                                                  tars):
    """What the documentation promises: a case the evaluator reports no value for gets the
    worst value (here: a valid prediction, one metric missing)."""
    scene, challenge = evaluator_scene(tmp_path, evaluators["evaluator-drops-a-metric"])
    with scene.sessions() as session:
        register_challenge(session, challenge)
        sub = submit(session, "eval-liver", "test", "t", pin(images["threshold"], tars))
        session.commit()
    assert worker_for(scene).run(until_idle=True) == 2  # smoke (case-001), main (002, 003)
    with scene.sessions() as session:
        assert session.get(SubmissionRow, sub.id).status == "succeeded"
        rows = {r.case_id: r for r in session.scalars(select(CaseResultRow).where(
            CaseResultRow.submission_id == sub.id))}
        assert sorted(rows) == ["case-001", "case-002", "case-003"]
        dropped = rows["case-002"]
        assert (dropped.valid, dropped.reason) == (False, "OUTPUT_INVALID")
        assert dropped.message == ("case case-002: the evaluation image reported no "
                                   "false_positive_ml")
        assert dropped.metrics == {"dice": 0.0, "false_positive_ml": 1000.0}  # the worst
        assert all(rows[c].valid and set(rows[c].metrics) == {"dice", "false_positive_ml"}
                   for c in ("case-001", "case-003"))
        (entry,) = leaderboard(session, "eval-liver", "test")
        assert entry.n_failed == 1


def test_a_main_job_the_platform_failed_fails_the_submission_free_of_quota(tmp_path, images,
                                                                           tars):
    """The smoke case passed; the daemon then stops answering for the rest: the team is not
    given the worst value for cases nobody ran, and may submit again."""
    scene = make_scene(tmp_path, quota=1, cases_per_run=2)
    pinned = pin(images["threshold"], tars)
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        sub = submit(session, "test-liver", "validation", "t", pinned)
        session.commit()
    assert worker_for(scene).run(max_jobs=1) == 1  # the smoke job, case-001
    assert worker_for(scene, unreachable_daemon(scene)).run(until_idle=True) == MAX_ATTEMPTS
    with scene.sessions() as session:
        smoke, main = session.scalars(select(JobRow).where(JobRow.submission_id == sub.id)
                                      .order_by(JobRow.id)).all()
        assert (smoke.status, main.status, main.reason, main.attempts) == (
            "succeeded", "failed", "INFRASTRUCTURE", MAX_ATTEMPTS)
        submission = session.get(SubmissionRow, sub.id)
        assert (submission.status, submission.reason) == ("failed", "INFRASTRUCTURE")
        assert submission.message == (f"the platform could not evaluate 2 of the 3 cases: "
                                      f"{main.message}")
        assert submission.counts_against_quota is False
        assert leaderboard(session, "test-liver", "validation") == []  # no worst values shown
        assert submit(session, "test-liver", "validation", "t", pinned).id == sub.id + 1
        session.commit()
