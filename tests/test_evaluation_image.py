"""An organiser's evaluation image in the sandbox: real containers, schema-checked output."""

from __future__ import annotations

import pytest

from engine.datasets import seal
from engine.evaluation_image import run_evaluation_image
from engine.medio import Volume, read_volume, write_nifti
from engine.synthetic import synth_dataset
from runners.base import FailureReason
from tests.conftest import REPO, build_image

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def evaluator(docker_engine):
    return build_image(REPO / "images" / "examples" / "evaluator", "epreuve-test/evaluator:latest")


@pytest.fixture
def scene(tmp_path):
    root = tmp_path / "ds"
    synth_dataset(root, cases=3, seed=9, size=24)
    dataset = seal(root)
    predictions = tmp_path / "predictions"
    truth = read_volume(dataset.ground_truth_path("case-001"))
    write_nifti(truth, predictions / "case-001" / "mask.nii.gz")  # perfect
    empty = Volume(truth.array * 0, truth.affine)
    write_nifti(empty, predictions / "case-002" / "mask.nii.gz")  # nothing found
    return dataset, predictions  # case-003: no output at all


def test_evaluator_scores_the_cases_it_can(runner, evaluator, scene):
    dataset, predictions = scene
    outcome = run_evaluation_image(runner, evaluator, predictions, dataset, dataset.case_ids)
    assert outcome.succeeded, outcome.message
    cases = outcome.metrics.cases
    assert cases["case-001"]["dice"] == 1.0
    assert cases["case-002"]["dice"] == 0.0
    assert "case-003" not in cases  # the engine will give it the worst value
    assert outcome.run.user == "10002:10002"  # resolved through its /etc/passwd


def test_evaluator_output_is_schema_checked(runner, adversarial, scene):
    dataset, predictions = scene
    bad = "echo '{\"cases\": {\"case-001\": {\"dice\": \"NaN\"}}}' > /output/metrics.json"
    outcome = run_evaluation_image(runner, adversarial["probe"], predictions, dataset,
                                   dataset.case_ids, command=("sh", "-c", bad))
    assert outcome.reason is FailureReason.OUTPUT_INVALID
    assert "case-001: dice is nan" in outcome.message


def test_evaluator_without_metrics_file(runner, adversarial, scene):
    dataset, predictions = scene
    outcome = run_evaluation_image(runner, adversarial["probe"], predictions, dataset,
                                   dataset.case_ids, command=("true",))
    assert outcome.reason is FailureReason.OUTPUT_MISSING


def test_evaluator_sees_ground_truth_but_cannot_change_it(runner, adversarial, scene):
    dataset, predictions = scene
    attempt = "touch /input/ground_truth/case-001/label.nii.gz 2>/dev/null; echo $? >&2; exit 0"
    outcome = run_evaluation_image(runner, adversarial["probe"], predictions, dataset,
                                   dataset.case_ids, command=("sh", "-c", attempt))
    assert outcome.run.log_tail.strip() == "1"  # read-only mount: touch failed
    assert outcome.reason is FailureReason.OUTPUT_MISSING
