"""Challenge settings the other engine tests leave out, through the real engine: a dataset
version the challenge does not expect, a phase that opens in the future, lesion-wise scoring,
the test-based ranking scheme and median aggregation on the leaderboard, and a multiclass
classification challenge. Expected values come from independent code (scipy, scikit-learn,
the scoring functions on the stored files), never from the engine's own tables."""

from __future__ import annotations

import json
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from engine.challenges import ChallengeError, challenge_definition
from engine.datasets import load, seal
from engine.db.models import AggregateRow, CaseResultRow, JobRow, SubmissionRow
from engine.leaderboard import leaderboard
from engine.medio import read_volume
from engine.results import case_values
from engine.scoring.cases import LesionSettings
from engine.scoring.lesions import lesion_wise
from engine.submissions import SubmissionRefused, register_challenge, submit
from engine.synthetic import synth_dataset
from engine.worker import Worker
from runners.docker import DockerRunner
from tests.engine_fixtures import build_examples, make_scene, pin

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def images(docker_engine, module_tmp):
    return build_examples(module_tmp("example-images"))


@pytest.fixture(scope="module")
def tars(module_tmp):
    return module_tmp("tars")


def worker_for(scene) -> Worker:
    runner = DockerRunner(state_dir=scene.settings.state_dir / "runs")
    return Worker(scene.sessions, scene.settings, runner, scoring_workers=1)


def edit_challenge(scene, old: str, new: str) -> None:
    text = scene.challenge_file.read_text()
    assert old in text
    scene.challenge_file.write_text(text.replace(old, new, 1))


# -- refusals before anything runs ---------------------------------------------------------


def test_a_dataset_version_the_challenge_does_not_expect_is_refused(tmp_path):
    scene = make_scene(tmp_path)
    actual = load(tmp_path / "data/validation").version
    edit_challenge(scene, "dataset: {path: data/validation}\n    quota",
                   f"dataset: {{path: data/validation, version: '{'0' * 64}'}}\n    quota")
    with scene.sessions() as session, pytest.raises(ChallengeError) as refused:
        register_challenge(session, scene.challenge_file)
        session.commit()
    assert str(refused.value) == (
        f"test-liver.yaml, line 12, phases[0].dataset.version: phase validation: the dataset "
        f"at {tmp_path / 'data/validation'} is version {actual[:12]}, the challenge expects "
        "000000000000")

    edit_challenge(scene, f"version: '{'0' * 64}'", f"version: '{actual}'")
    with scene.sessions() as session:
        assert register_challenge(session, scene.challenge_file).id == "test-liver"
        session.commit()


def test_a_phase_that_opens_in_the_future_refuses_until_it_opens(tmp_path, images, tars):
    scene = make_scene(tmp_path)
    edit_challenge(scene, "  - id: closed\n", "  - id: later\n    dataset: {path: "
                   "data/validation}\n    opens: 2999-01-01T00:00:00Z\n  - id: closed\n")
    pinned = pin(images["threshold"], tars)
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        with pytest.raises(SubmissionRefused) as refused:
            submit(session, "test-liver", "later", "t", pinned)
        assert str(refused.value) == ("phase later of test-liver is not open: it opens "
                                      "2999-01-01 00:00 UTC")
        with pytest.raises(SubmissionRefused, match="it opens 2999-01-01 00:00 UTC"):
            submit(session, "test-liver", "later", "t", pinned,
                   now=datetime(2998, 12, 31, 23, 59, 59, tzinfo=UTC))
        opened = submit(session, "test-liver", "later", "t", pinned,
                        now=datetime(2999, 1, 1, tzinfo=UTC))
        assert opened.status == "queued"
        session.commit()


# -- one evaluated phase, ranked three ways --------------------------------------------------


@pytest.fixture(scope="module")
def evaluated(images, module_tmp):
    """Two teams evaluated with lesion-wise metrics on; the ranking is changed afterwards
    (an organiser may re-rank without re-running anything)."""
    root = module_tmp("evaluated")
    scene = make_scene(root, cases_per_run=2, scheme="aggregate-then-rank")
    edit_challenge(scene, "nsd_tolerance_mm: 4.0}", "nsd_tolerance_mm: 4.0, lesion_wise: true}")
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        full = submit(session, "test-liver", "validation", "full",
                      pin(images["threshold"], root)).id
        ablated = submit(session, "test-liver", "validation", "ablated",
                         pin(images["no-smoothing"], root)).id
        session.commit()
    assert worker_for(scene).run(until_idle=True) == 4
    with scene.sessions() as session:
        for submission_id in (full, ablated):
            assert session.get(SubmissionRow, submission_id).status == "succeeded"
    return scene, {"full": full, "ablated": ablated}


def per_case(scene, submission_id: int, key: str) -> list[float]:
    with scene.sessions() as session:
        submission = session.get(SubmissionRow, submission_id)
        challenge = challenge_definition(submission.phase.challenge)
        return case_values(session, challenge, load(scene.root / "data/validation"),
                           submission, key)


def test_lesion_wise_metrics_are_scored_by_the_engine(evaluated):
    scene, teams = evaluated
    dataset = load(scene.root / "data/validation")
    lesions = LesionSettings(enabled=True)
    checked = 0
    with scene.sessions() as session:
        for submission_id in teams.values():
            jobs = {c: j.id for j in session.scalars(select(JobRow).where(
                JobRow.submission_id == submission_id)) for c in j.case_ids}
            for row in session.scalars(select(CaseResultRow).where(
                    CaseResultRow.submission_id == submission_id)):
                stored = (scene.settings.outputs_dir / f"submission-{submission_id}"
                          / f"job-{jobs[row.case_id]}" / row.case_id / "mask.nii.gz")
                prediction = np.asarray(read_volume(stored).array)
                truth = read_volume(dataset.ground_truth_path(row.case_id))
                for label in (1, 2):
                    expected = lesion_wise(prediction == label, np.asarray(truth.array) == label,
                                           truth.spacing, min_voxels=lesions.min_voxels,
                                           dilation=lesions.dilation)
                    assert {k: row.metrics[f"{k}[{label}]"] for k in expected} == expected
                    checked += 1
    assert checked == 2 * 3 * 2  # two teams, three cases, two labels


def wilcoxon_ranks(values: dict[str, list[float]], larger_is_better: bool) -> dict[str, int]:
    """challengeR's test-based ranking, from scipy: the share of the other teams a team beats
    (one-sided Wilcoxon signed-rank, 5%), ranked from the largest share (ties: minimum)."""
    from scipy.stats import wilcoxon

    alternative = "greater" if larger_is_better else "less"
    shares = {}
    for team, mine in values.items():
        others = [t for t in values if t != team]
        beaten = sum(wilcoxon(mine, values[o], alternative=alternative).pvalue < 0.05
                     for o in others)
        shares[team] = beaten / len(others)
    return {t: 1 + sum(s > shares[t] for s in shares.values()) for t in shares}


def rerank(scene, scheme: str, aggregate: str) -> list:
    """The organiser changes the ranking and re-registers the challenge (with --force: the
    phase has submissions); nothing re-runs."""
    text = scene.challenge_file.read_text()
    block = re.compile(r"ranking:\n(  (scheme|aggregate): .*\n)+")
    assert block.search(text)
    scene.challenge_file.write_text(block.sub(
        f"ranking:\n  scheme: {scheme}\n  aggregate: {aggregate}\n", text, count=1))
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file, force=True)
        session.commit()
        return leaderboard(session, "test-liver", "validation")


def test_the_test_based_scheme_ranks_the_leaderboard(evaluated):
    scene, teams = evaluated
    dice = {t: per_case(scene, s, "dice[1]") for t, s in teams.items()}
    hd95 = {t: per_case(scene, s, "hd95[1]") for t, s in teams.items()}
    by_mean = {t: 1 + sum(np.mean(v) > np.mean(dice[t]) for v in dice.values()) for t in dice}
    assert by_mean == {"full": 1, "ablated": 2}  # aggregate-then-rank separates them...
    board = rerank(scene, "test-based", "mean")
    expected = {"dice[1]": wilcoxon_ranks(dice, True), "hd95[1]": wilcoxon_ranks(hd95, False)}
    # ... but three cases can never be significant (one-sided p >= 1/8): a tie on both
    assert expected == {"dice[1]": {"full": 1, "ablated": 1},
                        "hd95[1]": {"full": 1, "ablated": 1}}
    assert {e.team: e.metric_ranks for e in board} == {
        t: {k: expected[k][t] for k in expected} for t in teams}
    assert [(e.team, e.rank) for e in board] == [("full", 1), ("ablated", 1)]


def test_median_aggregation_ranks_the_leaderboard(evaluated):
    scene, teams = evaluated
    board = rerank(scene, "aggregate-then-rank", "median")
    for entry in board:
        dice = per_case(scene, teams[entry.team], "dice[1]")
        assert np.median(dice) != np.mean(dice)  # the two aggregates differ here
        assert entry.scores["dice[1]"] == float(np.median(dice))
        assert entry.scores["hd95[1]"] == float(np.median(per_case(scene, teams[entry.team],
                                                                  "hd95[1]")))
    assert [(e.team, e.rank) for e in board] == [("full", 1), ("ablated", 2)]


# -- multiclass classification -----------------------------------------------------------------

MULTICLASS_CHALLENGE = """
id: liver-lesion-type
title: Which kind of lesion?
task: classification
output: {kind: probabilities, filename: predictions.csv, classes: [cyst, hcc, metastasis]}
ranking: {metrics: [{metric: balanced_accuracy}]}
phases:
  - id: test
    dataset: {path: data}
    cases_per_run: 3
    limits: {memory: 512m, time_per_case: 30s}
"""
CLASSES = ["cyst", "hcc", "metastasis"]
TRIPLES = [(0.7, 0.2, 0.1), (0.1, 0.6, 0.3), (0.25, 0.25, 0.5), (0.2, 0.5, 0.3)]
CLASSIFIER = f'''
import csv, hashlib, json
triples = {TRIPLES!r}
cases = json.load(open("/input/cases.json"))["cases"]
with open("/output/predictions.csv", "w", newline="") as handle:
    writer = csv.writer(handle)
    writer.writerow(["case_id", "cyst", "hcc", "metastasis"])
    for case in cases:
        digest = hashlib.sha256(case["case_id"].encode()).digest()
        writer.writerow([case["case_id"], *triples[digest[0] % len(triples)]])
'''


def predicted(case_id: str) -> tuple[float, float, float]:
    import hashlib

    return TRIPLES[hashlib.sha256(case_id.encode()).digest()[0] % len(TRIPLES)]


def multiclass_dataset(root: Path) -> dict[str, str]:
    case_ids = synth_dataset(root, cases=9, task="classification", seed=5, size=16)
    truth = {c: CLASSES[i % 3] for i, c in enumerate(case_ids)}
    (root / "ground_truth/labels.csv").write_text(
        "case_id,label\n" + "".join(f"{c},{label}\n" for c, label in truth.items()))
    description = json.loads((root / "dataset.json").read_text())
    description["classes"] = {c: c for c in CLASSES}
    (root / "dataset.json").write_text(json.dumps(description))
    seal(root)
    return truth


def test_a_multiclass_classification_challenge_end_to_end(tmp_path, images):
    from sklearn import metrics

    truth = multiclass_dataset(tmp_path / "data")
    context = tmp_path / "classifier"
    context.mkdir()
    (context / "classify.py").write_text(CLASSIFIER)
    (context / "Dockerfile").write_text(f'FROM {images["threshold"]}\nCOPY classify.py '
                                        '/opt/classify.py\nENTRYPOINT ["python3", '
                                        '"/opt/classify.py"]\n')
    subprocess.run(["docker", "build", "-q", "--network", "none", "-t",
                    "epreuve-test/classifier-multiclass:latest", str(context)], check=True,
                   capture_output=True, env={"DOCKER_BUILDKIT": "0",
                                             "PATH": "/usr/bin:/usr/local/bin:/bin"})
    (tmp_path / "challenge.yaml").write_text(MULTICLASS_CHALLENGE)
    scene = make_scene(tmp_path / "scene")
    scene.challenge_file = tmp_path / "challenge.yaml"
    with scene.sessions() as session:
        register_challenge(session, scene.challenge_file)
        sub = submit(session, "liver-lesion-type", "test", "t",
                     pin("epreuve-test/classifier-multiclass:latest", tmp_path)).id
        session.commit()
    assert worker_for(scene).run(until_idle=True) == 4  # smoke (1 case), 8 cases in 3 shards

    cases = sorted(truth)
    labels = [truth[c] for c in cases]
    probabilities = np.array([predicted(c) for c in cases])
    onehot = np.array([[label == c for c in CLASSES] for label in labels])
    argmax = [CLASSES[i] for i in probabilities.argmax(axis=1)]
    expected = {
        "roc_auc_macro": metrics.roc_auc_score(onehot, probabilities, average="macro"),
        "roc_auc_micro": metrics.roc_auc_score(onehot, probabilities, average="micro"),
        "accuracy": metrics.accuracy_score(labels, argmax),
        "balanced_accuracy": metrics.balanced_accuracy_score(labels, argmax),
    }
    with scene.sessions() as session:
        assert session.get(SubmissionRow, sub).status == "succeeded"
        stored = {a.metric: a.summary for a in session.scalars(select(AggregateRow).where(
            AggregateRow.submission_id == sub))}
        for metric, value in expected.items():
            assert stored[metric]["value"] == pytest.approx(value, rel=1e-12), metric
            assert (stored[metric]["n"], stored[metric]["n_failed"]) == (9, 0)
        (entry,) = leaderboard(session, "liver-lesion-type", "test")
        assert entry.scores == {"balanced_accuracy": expected["balanced_accuracy"]}
        rows = session.scalars(select(CaseResultRow).where(CaseResultRow.submission_id == sub))
        assert {r.case_id: tuple(r.metrics["probabilities"][c] for c in CLASSES)
                for r in rows} == {c: predicted(c) for c in cases}
    assert (entry.team, entry.rank, entry.n_failed) == ("t", 1, 0)
