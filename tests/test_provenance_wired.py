"""Provenance and job metrics, wired: a real run through real containers records every
field docs/provenance.md lists, on every attempt that ends, and `status` shows it (a
team's view without host paths, the hidden set's seal or hidden case names)."""

from __future__ import annotations

import dataclasses
import re
import socket

import docker
import pytest
from sqlalchemy import select

from engine import metrics
from engine.challenges import challenge_definition
from engine.db.models import JobRow, SubmissionRow
from engine.reports import participant_provenance, submission_report
from engine.store import open_store
from engine.submissions import register_challenge, submit
from engine.worker import Worker
from runners.base import RunSpec
from runners.docker import DockerRunner
from tests.conftest import REPO
from tests.engine_fixtures import build_examples, make_scene, pin

pytestmark = pytest.mark.docker
DOCUMENTED = re.compile(r"`([a-z_]+(?:\.[a-z_*]+|\[\])*)`")


def documented_fields() -> list[str]:
    """Every field named in the first column of docs/provenance.md's table."""
    fields = []
    for line in (REPO / "docs/provenance.md").read_text().splitlines():
        cells = line.split("|")
        if len(cells) > 2 and "`" in cells[1]:
            fields += DOCUMENTED.findall(cells[1])
    return fields


def lookup(record: dict, dotted: str):
    value = record
    for part in dotted.removesuffix("[]").split("."):
        assert isinstance(value, dict) and part in value, f"{dotted}: no {part!r} in {value!r}"
        value = value[part]
    return value


def runtime_count(kind: str) -> float:
    for family in metrics.JOB_RUNTIME.collect():
        for sample in family.samples:
            if sample.name.endswith("_count") and sample.labels == {"kind": kind}:
                return sample.value
    return 0.0


@pytest.fixture(scope="module")
def images(docker_engine, module_tmp):
    return build_examples(module_tmp("example-images"))


@pytest.fixture(scope="module")
def ran(images, module_tmp):
    """One submission of the example image, run to the end by a real worker."""
    root = module_tmp("provenance")
    scene = make_scene(root)
    before = runtime_count("smoke"), runtime_count("main")
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        image = pin(images["threshold"], root, open_store(scene.settings.store_dir))
        submission_id = submit(session, "test-liver", "validation", "blue", image).id
        session.commit()
    runner = DockerRunner(state_dir=scene.settings.state_dir / "runs")
    assert Worker(scene.sessions, scene.settings, runner, scoring_workers=1).run(
        until_idle=True) == 3
    after = runtime_count("smoke"), runtime_count("main")
    return scene, submission_id, image, before, after


def test_every_documented_field_is_recorded_for_every_job(ran):
    scene, submission_id, image, _, _ = ran
    fields = documented_fields()
    assert {"image.image_id", "docker.kernel", "outputs.digest", "node_name"} <= set(fields)
    with scene.sessions() as session:
        jobs = session.scalars(select(JobRow).where(JobRow.submission_id == submission_id)
                               .order_by(JobRow.id)).all()
        assert [j.status for j in jobs] == ["succeeded"] * 3
        definition_sha256 = session.get(SubmissionRow, submission_id).phase.challenge \
            .definition_sha256
        for job in jobs:
            record = job.run_result["provenance"]
            for name in fields:
                lookup(record, name.removesuffix(".*"))
            assert record["image"] == {"image_id": image.image_id,
                                       "tar_sha256": image.tar_sha256,
                                       "layers": list(image.layers)}
            assert record["dataset"]["manifest_sha256"] == job.dataset_version
            assert record["dataset"]["case_ids"] == list(job.case_ids)
            assert record["challenge"]["definition_sha256"] == definition_sha256
            assert set(record["run_spec"]) == {f.name for f in dataclasses.fields(RunSpec)}
            assert record["run_spec"]["image"] == image.image_id
            assert record["ran"]["image_id"] == image.image_id
            assert record["node_name"] == socket.gethostname()
            assert record["docker"]["server_version"] == docker.from_env().version()["Version"]
            assert record["gpus"] == []  # a CPU job
            assert record["started_at"] < record["finished_at"]
            hashes = record["outputs"]["sha256"]
            assert sorted(hashes) == sorted(job.case_ids)
            assert all(len(h) == 64 for files in hashes.values() for h in files.values())


def test_job_runtimes_are_observed_when_jobs_end(ran):
    _, _, _, before, after = ran
    assert (after[0] - before[0], after[1] - before[1]) == (1, 2)


def test_status_shows_provenance_to_organisers_and_a_safe_part_to_the_team(ran):
    scene, submission_id, _, _, _ = ran
    with scene.sessions() as session:
        organiser = submission_report(session, submission_id)
        team = submission_report(session, submission_id, participant=True)
    full = organiser["jobs"][-1]["provenance"]
    assert full["run_spec"]["input_dir"] and full["dataset"]["version"]
    shown = team["jobs"][-1]["provenance"]
    assert shown["node_name"] == full["node_name"]
    assert shown["engine"] == full["engine"] and shown["gpus"] == full["gpus"]
    assert "input_dir" not in shown["run_spec"] and "output_dir" not in shown["run_spec"]
    assert shown["run_spec"]["memory_bytes"] == full["run_spec"]["memory_bytes"]
    assert shown["dataset"] == {"case_ids": full["dataset"]["case_ids"]}  # a public phase
    assert str(scene.root) not in repr(shown)
    assert all(not str(path).startswith("/") for path in shown["docker"]["runtimes"])


def test_a_phase_that_hides_cases_shows_no_case_names_in_provenance(ran):
    scene, submission_id, _, _, _ = ran
    with scene.sessions() as session:
        submission = session.get(SubmissionRow, submission_id)
        phase = challenge_definition(submission.phase.challenge).phase("validation")
        record = submission.jobs[-1].run_result["provenance"]
    hidden = participant_provenance(record, phase.model_copy(update={"final": True}))
    assert hidden["dataset"] == {"cases": len(record["dataset"]["case_ids"])}
    assert hidden["outputs"] == {"digest": record["outputs"]["digest"]}
    assert not any(case in repr(hidden) for case in record["dataset"]["case_ids"])


def test_an_infrastructure_retry_keeps_the_attempts_provenance(ran, tmp_path):
    """A node that fails before it reports still leaves what it was and what it ran on."""
    scene, _, image, _, _ = ran
    with scene.sessions() as session:
        submission_id = submit(session, "test-liver", "validation", "green", image).id
        session.commit()
    runner = DockerRunner(state_dir=scene.settings.state_dir / "runs")
    worker = Worker(scene.sessions, scene.settings, runner, scoring_workers=1)
    ticket = worker.coordinator.lease(0)
    assert ticket.submission_id == submission_id
    node = {"node_name": "node-7", "engine": {"version": "1"}, "docker": {}, "gpus": []}
    worker.coordinator.retry(ticket, "the node went away", "Traceback ...", node=node)
    with scene.sessions() as session:
        job = session.get(JobRow, ticket.job_id)
        assert job.status == "queued" and job.attempts == 1
        record = job.run_result["provenance"]
    assert record["node_name"] == "node-7" and record["image"]["image_id"] == image.image_id
    assert record["outputs"]["sha256"] == {} and record["run_spec"] == {}


def test_the_api_submission_detail_shows_it_under_the_same_rules(ran):
    """A real server on loopback over the run's database: the organiser reads the whole
    record, the team the same cut as `status --participant`."""
    import httpx

    from engine.tokens import create_token
    from tests.api_fixtures import World, start_server

    scene, submission_id, _, _, _ = ran
    with scene.sessions() as session:
        _, organiser = create_token(session, "organiser", challenges=["test-liver"])
        _, team = create_token(session, "participant", team="blue")
        expected = submission_report(session, submission_id, participant=True)
        session.commit()
    server = start_server(World(scene.root, scene.settings, scene.sessions))
    try:
        def jobs(secret: str) -> list[dict]:
            answer = httpx.get(f"{server.url}/api/v1/submissions/{submission_id}",
                               headers={"Authorization": f"Bearer {secret}"}, timeout=30)
            assert answer.status_code == 200, answer.text
            return answer.json()["jobs"]

        full = [job["provenance"] for job in jobs(organiser)]
        shown = [job["provenance"] for job in jobs(team)]
    finally:
        server.stop()
    assert all(record["run_spec"]["input_dir"] for record in full)
    assert all(record["dataset"]["manifest_sha256"] for record in full)
    assert shown == [job["provenance"] for job in expected["jobs"]]
    assert all("input_dir" not in record["run_spec"] and "version" not in record["dataset"]
               for record in shown)
    assert str(scene.root) not in repr(shown)
