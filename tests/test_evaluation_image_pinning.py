"""The organisers' evaluation image is pinned by id at `challenge create`: moving its tag
afterwards (a participant's tar could once do it) changes nothing, and an id missing on a
node is the platform's failure, not the team's."""

from __future__ import annotations

import subprocess
import uuid

import docker
import pytest

from engine.challenges import ChallengeError, challenge_definition
from engine.datasets import seal
from engine.db import session_factory
from engine.evaluation_image import run_evaluation_image
from engine.scoring.evaluation_image import EvaluationImageUnusable, pinned_evaluation_image
from engine.submissions import register_challenge
from engine.synthetic import synth_dataset
from runners.base import FailureReason
from tests.test_image_intake_attacks import docker_build, image_id

pytestmark = pytest.mark.docker

CHALLENGE = """
id: pinned-eval
title: Scored by a pinned image
task: segmentation
output: {{kind: segmentation, filename: mask.nii.gz, labels: [0, 1, 2, 3]}}
metrics:
  evaluation_image: {image}
  evaluator_metrics: [{{name: dice, larger_is_better: true, worst: 0.0}}]
ranking: {{metrics: [{{metric: dice}}]}}
phases:
  - id: test
    dataset: {{path: data}}
    limits: {{memory: 1g, time_per_case: 60s, image_size: 2g}}
"""


@pytest.fixture
def scene(tmp_path, docker_engine):
    synth_dataset(tmp_path / "data", cases=1, seed=3, size=16)
    dataset = seal(tmp_path / "data")
    sessions = session_factory(f"sqlite:///{tmp_path}/db.sqlite")
    token = uuid.uuid4().hex[:12]
    tags = [docker_build(f"organisers-test/{name}:{token}",
                         f"FROM epreuve/base:3.11\nLABEL which={name}-{token}\n{user}\n"
                         "CMD [\"true\"]\n")
            for name, user in (("evaluator", "USER 1000:1000"), ("other", "USER 1000:1000"),
                               ("root", "USER 0"))]
    yield tmp_path, sessions, dataset, tags
    for tag in tags:
        subprocess.run(["docker", "rmi", tag], capture_output=True)


def create(tmp_path, sessions, image: str):
    (tmp_path / "challenge.yaml").write_text(CHALLENGE.format(image=image))
    with sessions() as session:
        definition = challenge_definition(register_challenge(session,
                                                              tmp_path / "challenge.yaml"))
        session.commit()
        return definition


def test_the_evaluation_image_is_pinned_at_create_and_a_moved_tag_changes_nothing(scene):
    tmp_path, sessions, _, (evaluator, other, _) = scene
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    pinned_id = image_id(client, evaluator)
    challenge = create(tmp_path, sessions, evaluator)
    assert challenge.metrics.evaluation_image_id == pinned_id
    assert challenge.phases[0].limits.image_size == 2 << 30
    repository, _, tag = evaluator.rpartition(":")
    client.api.tag(other, repository, tag, force=True)  # the tag now names another image
    with sessions() as session:
        from engine.db.models import ChallengeRow

        stored = challenge_definition(session.get(ChallengeRow, "pinned-eval"))
    assert pinned_evaluation_image(stored.metrics.evaluation_image_id,
                                   stored.metrics.evaluation_image) == pinned_id
    subprocess.run(["docker", "rmi", pinned_id], capture_output=True)


def test_an_unusable_evaluation_image_is_refused_at_create(scene):
    tmp_path, sessions, _, (_, _, root) = scene
    with pytest.raises(ChallengeError, match=r"organisers-test/absent:x' is not on this node"):
        create(tmp_path, sessions, "organisers-test/absent:x")
    with pytest.raises(ChallengeError, match=r"runs as root \(USER '0' is uid 0\)"):
        create(tmp_path, sessions, root)


def test_an_unpinned_or_absent_evaluation_image_is_the_platforms_failure(scene, runner):
    tmp_path, _, dataset, _ = scene
    with pytest.raises(EvaluationImageUnusable, match="not pinned to an image id"):
        pinned_evaluation_image(None, "organisers/evaluator:2026")
    with pytest.raises(EvaluationImageUnusable, match="not pinned to an image id"):
        pinned_evaluation_image("organisers/evaluator:2026", "organisers/evaluator:2026")
    absent = "sha256:" + "0" * 64
    outcome = run_evaluation_image(runner, absent, tmp_path / "none", dataset,
                                   dataset.case_ids, timeout_seconds=30)
    assert outcome.reason is FailureReason.INFRASTRUCTURE
    assert outcome.message.startswith(f"the evaluation image {absent} cannot run on this node")
