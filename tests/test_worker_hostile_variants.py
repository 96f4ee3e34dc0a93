"""Variants of "a worker survives anything one job does", with a real database, real images.

A participant's image is pinned by id at intake: a node that does not have that id when
its job runs (an operator pruned it, a node that never had it) is the platform's failure,
retried and never counted against the team, not IMAGE_INVALID.
"""

from __future__ import annotations

import subprocess

import pytest
from sqlalchemy import select

from engine.db.models import JobRow, SubmissionRow
from engine.submissions import register_challenge, submit
from engine.worker import Worker
from engine.worker.protocol import messages_platform
from runners.docker import DockerRunner
from tests.engine_fixtures import make_scene, pin
from tests.test_runner_hostile_variants import image_from

pytestmark = pytest.mark.docker


def test_a_pinned_image_gone_from_the_node_is_never_the_teams_failure(tmp_path, docker_engine):
    tag = image_from("epreuve-example/threshold:latest", "epreuve-test/attack1-vanishing:latest",
                     "LABEL org.example.vanishing=1")  # an id of its own, safe to remove
    scene = make_scene(tmp_path, validation_cases=1, quota=1)
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        pinned = pin(tag, tmp_path)
        sub = submit(session, "test-liver", "validation", "t", pinned).id
        session.commit()
    subprocess.run(["docker", "rmi", "-f", pinned.image_id], check=True, capture_output=True)

    worker = Worker(scene.sessions, scene.settings,
                    DockerRunner(state_dir=scene.settings.state_dir / "runs"), scoring_workers=1)
    assert worker.run(until_idle=True) == 3  # retried on the platform's account

    with scene.sessions() as session:
        submission = session.get(SubmissionRow, sub)
        assert (submission.status, submission.reason) == ("failed", "INFRASTRUCTURE")
        assert submission.counts_against_quota is False
        job = session.scalars(select(JobRow)).one()
        assert (job.reason, job.attempts) == ("INFRASTRUCTURE", 3)
        # neither on the node nor in this node's image store: the platform's, said generically
        # to the team, with the reason kept for organisers
        assert job.message == messages_platform("loading the image")
        assert "ImageUnavailable" in job.run_result["infrastructure_detail"]
