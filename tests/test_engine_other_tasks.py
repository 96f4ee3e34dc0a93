"""The engine beyond built-in segmentation metrics: an organiser's evaluation image, and a
classification challenge, both through real containers."""

from __future__ import annotations

import textwrap

import pytest
from sqlalchemy import select

from engine.config import Settings
from engine.datasets import seal
from engine.db import session_factory
from engine.db.models import CaseResultRow, SubmissionRow
from engine.leaderboard import leaderboard
from engine.submissions import register_challenge, submit
from engine.synthetic import synth_dataset
from engine.worker import Worker
from runners.docker import DockerRunner
from tests.conftest import REPO, build_image
from tests.engine_fixtures import pin, script_image

pytestmark = pytest.mark.docker

EVALUATOR_CHALLENGE = """
id: eval-liver
title: Scored by the organisers' own image
task: segmentation
output: {kind: segmentation, filename: mask.nii.gz, labels: [0, 1, 2, 3]}
metrics:
  evaluation_image: epreuve-test/evaluator:latest
  evaluator_metrics:
    - {name: dice, larger_is_better: true, worst: 0.0}
    - {name: false_positive_ml, larger_is_better: false, worst: 1000.0}
ranking: {metrics: [{metric: dice}, {metric: false_positive_ml}]}
phases:
  - id: test
    dataset: {path: data}
    limits: {memory: 1g, time_per_case: 60s}
"""

CLASSIFICATION_CHALLENGE = """
id: tumour-presence
title: Is there a tumour?
task: classification
output: {kind: probabilities, filename: predictions.csv, classes: [probability]}
ranking: {metrics: [{metric: roc_auc}]}
phases:
  - id: test
    dataset: {path: data}
    cases_per_run: 3
    limits: {memory: 512m, time_per_case: 30s}
"""

CLASSIFIER = '''
import csv, hashlib, json, sys
cases = json.load(open("/input/cases.json"))["cases"]
with open("/output/predictions.csv", "w", newline="") as handle:
    writer = csv.writer(handle)
    writer.writerow(["case_id", "probability"])
    for case in cases:
        if "--skip-last" in sys.argv and case["case_id"] == "case-007":
            continue  # a later case: the smoke job (case-001) must pass
        size = sum(1 for _ in open(f"/input/{case['case_id']}/ct.nii.gz", "rb"))
        digest = hashlib.sha256(case["case_id"].encode()).digest()
        writer.writerow([case["case_id"], round(digest[0] / 255, 3)])
'''


def scene(tmp_path, text: str, **synth):
    synth_dataset(tmp_path / "data", seed=31, size=24, **synth)
    seal(tmp_path / "data")
    (tmp_path / "challenge.yaml").write_text(text)
    state = tmp_path / "state"
    settings = Settings(data_dir=state, database_url=f"sqlite:///{state}/db.sqlite",
                        state_dir=state / "runner")
    sessions = session_factory(settings.database_url)
    runner = DockerRunner(state_dir=settings.state_dir / "runs")
    return sessions, Worker(sessions, settings, runner, scoring_workers=1)


def test_an_evaluation_image_replaces_the_built_in_metrics(tmp_path, docker_engine):
    build_image(REPO / "images/examples/evaluator", "epreuve-test/evaluator:latest")
    threshold = build_image(REPO / "images/examples/threshold", "epreuve-example/threshold:latest")
    sessions, worker = scene(tmp_path, EVALUATOR_CHALLENGE, cases=3)
    with sessions() as session:
        register_challenge(session, tmp_path / "challenge.yaml")
        sub = submit(session, "eval-liver", "test", "t", pin(threshold, tmp_path))
        session.commit()
    worker.run(until_idle=True)
    with sessions() as session:
        assert session.get(SubmissionRow, sub.id).status == "succeeded"
        rows = session.scalars(select(CaseResultRow).where(
            CaseResultRow.submission_id == sub.id)).all()
        assert len(rows) == 3
        assert all(set(r.metrics) == {"dice", "false_positive_ml"} for r in rows)
        outputs = tmp_path / "state/outputs" / f"submission-{sub.id}"
        for row in rows:  # the evaluator's own formula, on the stored output
            (prediction,) = outputs.glob(f"job-*/{row.case_id}/mask.nii.gz")
            truth = tmp_path / "data/ground_truth" / row.case_id / "label.nii.gz"
            assert row.metrics["dice"] == pytest.approx(label_dice(prediction, truth), rel=1e-12)
        (entry,) = leaderboard(session, "eval-liver", "test")
        assert entry.n_failed == 0
        assert entry.scores["dice"] == pytest.approx(
            sum(r.metrics["dice"] for r in rows) / 3, rel=1e-12)


def label_dice(prediction, truth, label: int = 1) -> float:
    import numpy as np

    from engine.medio import read_volume

    p = np.asarray(read_volume(prediction).array) == label
    t = np.asarray(read_volume(truth).array) == label
    return 2.0 * np.logical_and(p, t).sum() / (p.sum() + t.sum())


def test_a_classification_challenge_end_to_end(tmp_path, adversarial):
    for tag, args in (("full", ()), ("partial", ("--skip-last",))):
        script_image(adversarial["probe"], textwrap.dedent(CLASSIFIER),
                     f"epreuve-test/classifier-{tag}:latest", tmp_path / f"classifier-{tag}",
                     *args)
    sessions, worker = scene(tmp_path, CLASSIFICATION_CHALLENGE, cases=7,
                             task="classification")
    with sessions() as session:
        register_challenge(session, tmp_path / "challenge.yaml")
        full = submit(session, "tumour-presence", "test", "full",
                      pin("epreuve-test/classifier-full:latest", tmp_path))
        partial = submit(session, "tumour-presence", "test", "partial",
                         pin("epreuve-test/classifier-partial:latest", tmp_path))
        session.commit()
    worker.run(until_idle=True)
    with sessions() as session:
        assert session.get(SubmissionRow, full.id).status == "succeeded"
        missing = session.scalars(select(CaseResultRow).where(
            CaseResultRow.submission_id == partial.id, CaseResultRow.valid.is_(False))).all()
        assert [r.reason for r in missing] == ["OUTPUT_MISSING"]  # the one row it left out
        board = {e.team: e for e in leaderboard(session, "tumour-presence", "test")}
        assert set(board) == {"full", "partial"}
        assert board["partial"].n_failed == 1 and board["full"].n_failed == 0
        assert board["full"].scores["roc_auc"] == pytest.approx(
            expected_roc_auc(tmp_path / "data"), rel=1e-12)


def expected_roc_auc(dataset) -> float:
    """scikit-learn's ROC AUC of what CLASSIFIER writes, against the sealed labels."""
    import csv
    import hashlib

    from sklearn.metrics import roc_auc_score

    with open(dataset / "ground_truth/labels.csv", newline="") as handle:
        truth = {row["case_id"]: int(row["label"]) for row in csv.DictReader(handle)}
    cases = sorted(truth)
    scores = [round(hashlib.sha256(c.encode()).digest()[0] / 255, 3) for c in cases]
    assert 0 < sum(truth.values()) < len(truth)  # both classes present: AUC is defined
    return roc_auc_score([truth[c] for c in cases], scores)
