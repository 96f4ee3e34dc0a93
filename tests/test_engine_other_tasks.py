"""The engine beyond built-in segmentation metrics: an organiser's evaluation image, and a
classification challenge, both through real containers."""

from __future__ import annotations

import subprocess
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
from tests.engine_fixtures import pin

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
    worker.run(until_idle=True)
    with sessions() as session:
        assert session.get(SubmissionRow, sub.id).status == "succeeded"
        rows = session.scalars(select(CaseResultRow).where(
            CaseResultRow.submission_id == sub.id)).all()
        assert len(rows) == 3
        assert all(set(r.metrics) == {"dice", "false_positive_ml"} for r in rows)
        assert all(r.metrics["dice"] > 0.8 for r in rows)
        (entry,) = leaderboard(session, "eval-liver", "test")
        assert entry.scores["dice"] > 0.8 and entry.n_failed == 0


def test_a_classification_challenge_end_to_end(tmp_path, adversarial):
    context = tmp_path / "classifier"
    context.mkdir()
    (context / "classify.py").write_text(textwrap.dedent(CLASSIFIER))
    for tag, extra in (("full", ""), ("partial", ', "--skip-last"')):
        (context / "Dockerfile").write_text(
            f'FROM {adversarial["probe"]}\nCOPY classify.py /opt/classify.py\n'
            f'CMD ["python3", "/opt/classify.py"{extra}]\n')
        subprocess.run(["docker", "build", "-q", "--network", "none", "-t",
                        f"epreuve-test/classifier-{tag}:latest", str(context)], check=True,
                       capture_output=True, env={"DOCKER_BUILDKIT": "0",
                                                 "PATH": "/usr/bin:/usr/local/bin:/bin"})
    sessions, worker = scene(tmp_path, CLASSIFICATION_CHALLENGE, cases=7,
                             task="classification")
    with sessions() as session:
        register_challenge(session, tmp_path / "challenge.yaml")
        full = submit(session, "tumour-presence", "test", "full",
                      pin("epreuve-test/classifier-full:latest", tmp_path))
        partial = submit(session, "tumour-presence", "test", "partial",
                         pin("epreuve-test/classifier-partial:latest", tmp_path))
    worker.run(until_idle=True)
    with sessions() as session:
        assert session.get(SubmissionRow, full.id).status == "succeeded"
        missing = session.scalars(select(CaseResultRow).where(
            CaseResultRow.submission_id == partial.id, CaseResultRow.valid.is_(False))).all()
        assert [r.reason for r in missing] == ["OUTPUT_MISSING"]  # the one row it left out
        board = {e.team: e for e in leaderboard(session, "tumour-presence", "test")}
        assert set(board) == {"full", "partial"}
        assert board["partial"].n_failed == 1 and board["full"].n_failed == 0
        assert 0.0 <= board["full"].scores["roc_auc"] <= 1.0
