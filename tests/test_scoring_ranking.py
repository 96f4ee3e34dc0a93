"""Classification metrics (scikit-learn as the oracle), aggregation and challengeR rankings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.scoring.aggregation import bootstrap_ci, summarise
from engine.scoring.classification import (
    average_precision,
    binary_metrics,
    multiclass_metrics,
    roc_auc,
)
from engine.scoring.ranking import (
    aggregate_then_rank,
    bootstrap_stability,
    consensus,
    one_sided_wilcoxon,
    rank_by_significance,
    rank_then_aggregate,
    significance_shares,
)

# -- classification vs scikit-learn ------------------------------------------------------

binary_cases = st.integers(2, 40).flatmap(lambda n: st.tuples(
    st.lists(st.booleans(), min_size=n, max_size=n),
    st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.5, 0.75, 0.9, 1.0]) | st.floats(0, 1),
             min_size=n, max_size=n)))


@settings(max_examples=100, deadline=None)
@given(binary_cases)
def test_binary_metrics_match_scikit_learn(case):
    from sklearn import metrics

    labels, scores = np.array(case[0]), np.array(case[1])
    if labels.all() or not labels.any():
        assert roc_auc(labels, scores) is None
        return
    assert roc_auc(labels, scores) == pytest.approx(metrics.roc_auc_score(labels, scores))
    assert average_precision(labels, scores) == pytest.approx(
        metrics.average_precision_score(labels, scores))
    ours = binary_metrics(labels, scores, threshold=0.5)
    predicted = scores >= 0.5
    assert ours["accuracy"] == pytest.approx(metrics.accuracy_score(labels, predicted))
    assert ours["balanced_accuracy"] == pytest.approx(
        metrics.balanced_accuracy_score(labels, predicted))
    assert ours["brier"] == pytest.approx(metrics.brier_score_loss(labels, scores))
    assert ours["sensitivity"] == pytest.approx(metrics.recall_score(labels, predicted))


def test_multiclass_one_vs_rest_macro_and_micro():
    from sklearn import metrics

    rng = np.random.default_rng(1)
    classes = ["a", "b", "c"]
    labels = list(rng.choice(classes, size=60))
    probabilities = rng.dirichlet([1, 1, 1], size=60)
    ours = multiclass_metrics(labels, probabilities, classes)
    truth = np.array([[label == c for c in classes] for label in labels])
    assert ours["roc_auc_macro"] == pytest.approx(
        metrics.roc_auc_score(truth, probabilities, average="macro"))
    assert ours["roc_auc_micro"] == pytest.approx(
        metrics.roc_auc_score(truth, probabilities, average="micro"))
    assert ours["average_precision_macro"] == pytest.approx(
        metrics.average_precision_score(truth, probabilities, average="macro"))
    predicted = np.asarray(classes)[probabilities.argmax(axis=1)]
    assert ours["accuracy"] == pytest.approx(metrics.accuracy_score(labels, predicted))
    assert ours["balanced_accuracy"] == pytest.approx(
        metrics.balanced_accuracy_score(labels, predicted))


# -- aggregation -------------------------------------------------------------------------


def test_failed_cases_get_the_worst_value_and_are_counted():
    summary = summarise([0.9, None, 0.7, None], worst=0.0, bootstrap=200, seed=3)
    assert summary.n == 4 and summary.n_failed == 2
    assert summary.mean == pytest.approx(0.4)
    assert summary.minimum == 0.0
    assert summary.ci_low <= summary.mean <= summary.ci_high


def test_per_case_worst_values():
    summary = summarise([1.0, None], worst=[300.0, 200.0], bootstrap=0)
    assert summary.mean == 100.5 and summary.maximum == 200.0


def test_bootstrap_is_seeded_and_reproducible():
    data = np.random.default_rng(0).random(30)
    assert bootstrap_ci(data, seed=7) == bootstrap_ci(data, seed=7)
    assert bootstrap_ci(data, seed=7) != bootstrap_ci(data, seed=8)


# -- challengeR semantics ------------------------------------------------------------------


def test_missing_algorithm_ranks_last_in_both_schemes():
    values = {"A1": [None], "A2": [0.8]}
    assert aggregate_then_rank(values, larger_is_better=True) == {"A1": 2, "A2": 1}
    assert rank_then_aggregate(values, larger_is_better=True) == {"A1": 2, "A2": 1}


def test_test_based_ranking_example():
    values = {"A1": [0.2] * 4, "A2": [1.0] * 4}
    p = one_sided_wilcoxon(np.array(values["A1"]), np.array(values["A2"]),
                           larger_is_better=False)
    assert p == pytest.approx(0.0359, abs=5e-5)
    assert significance_shares(values, larger_is_better=False, worst=10.0) == {"A1": 1.0,
                                                                              "A2": 0.0}
    assert rank_by_significance(values, larger_is_better=False, worst=10.0) == {
        "A1": 1, "A2": 2}


def test_ties_take_the_minimum_rank():
    values = {"A": [0.5, 0.5], "B": [0.5, 0.5], "C": [0.1, 0.2]}
    assert aggregate_then_rank(values, larger_is_better=True) == {"A": 1, "B": 1, "C": 3}


def test_rank_then_aggregate_differs_from_aggregate_then_rank():
    # A wins most cases narrowly, B wins one case by far: the schemes disagree.
    values = {"A": [0.8, 0.8, 0.8, 0.0], "B": [0.7, 0.7, 0.7, 1.0]}
    assert aggregate_then_rank(values, larger_is_better=True) == {"A": 2, "B": 1}
    assert rank_then_aggregate(values, larger_is_better=True) == {"A": 1, "B": 2}


def test_consensus_is_the_mean_rank_over_metrics():
    dice = {"A": 1, "B": 2, "C": 3}
    hd95 = {"A": 3, "B": 1, "C": 2}
    assert consensus([dice, hd95]) == {"A": 2, "B": 1, "C": 3}  # mean ranks 2, 1.5, 2.5
    nsd = {"A": 2, "B": 1, "C": 3}
    assert consensus([dice, nsd]) == {"A": 1, "B": 1, "C": 3}  # 1.5, 1.5, 3: a tie


def test_bootstrap_stability_is_seeded():
    rng = np.random.default_rng(2)
    values = {name: list(rng.normal(mean, 0.05, 20)) for name, mean in
              (("A", 0.8), ("B", 0.79), ("C", 0.5))}  # A and B close: samples disagree

    def rank(v):
        return aggregate_then_rank(v, larger_is_better=True)

    first = bootstrap_stability(values, rank, resamples=200, seed=5)
    assert first == bootstrap_stability(values, rank, resamples=200, seed=5)
    other = bootstrap_stability(values, rank, resamples=200, seed=6)
    assert first["kendall_tau_mean"] != other["kendall_tau_mean"]  # the seed is what decides
    assert first["rank_frequencies"]["C"] == {3: 1.0}  # C is far behind in every sample


def test_bootstrap_stability_of_a_ranking_no_sample_can_change():
    """A beats B beats C on every case: every resample ranks them so, tau is exactly 1."""
    rng = np.random.default_rng(4)
    base = rng.random(15)
    values = {"A": list(base + 2.0), "B": list(base + 1.0), "C": list(base)}
    firmness = bootstrap_stability(
        values, lambda v: rank_then_aggregate(v, larger_is_better=True), resamples=100, seed=1)
    assert (firmness["kendall_tau_mean"], firmness["kendall_tau_median"]) == (1.0, 1.0)
    assert firmness["rank_frequencies"] == {"A": {1: 1.0}, "B": {2: 1.0}, "C": {3: 1.0}}


# -- the command line ----------------------------------------------------------------------


def test_score_command_json(tmp_path):
    from engine.medio import Volume, write_nifti

    affine = np.diag([0.8, 0.8, 1.5, 1.0])
    ref = np.zeros((30, 30, 20), np.uint8)
    ref[5:15, 5:15, 5:10] = 1
    ref[20:25, 20:25, 12:16] = 2
    pred = np.roll(ref, 1, axis=0)
    write_nifti(Volume(pred, affine), tmp_path / "pred.nii.gz")
    write_nifti(Volume(ref, affine), tmp_path / "ref.nii.gz")
    epreuve = str(Path(sys.executable).parent / "epreuve")
    proc = subprocess.run([epreuve, "score", str(tmp_path / "pred.nii.gz"),
                           str(tmp_path / "ref.nii.gz"), "--labels", "1,2",
                           "--nsd-tolerance", "1.0", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    scores = json.loads(proc.stdout)
    assert set(scores) == {"1", "2"}
    assert {"dice", "iou", "hd", "hd95", "assd", "masd", "nsd"} <= set(scores["1"])
    assert scores["1"]["dice"] == pytest.approx(2 * 9 * 10 * 5 / (2 * 500))
    assert scores["1"]["hd"] == pytest.approx(0.8)


def test_score_command_refuses_masks_on_different_grids(tmp_path):
    from engine.medio import Volume, write_nifti

    write_nifti(Volume(np.ones((4, 4, 4), np.uint8), np.eye(4)), tmp_path / "a.nii.gz")
    write_nifti(Volume(np.ones((4, 4, 4), np.uint8), np.diag([2, 1, 1, 1.0])),
                tmp_path / "b.nii.gz")
    epreuve = str(Path(sys.executable).parent / "epreuve")
    proc = subprocess.run([epreuve, "score", str(tmp_path / "a.nii.gz"),
                           str(tmp_path / "b.nii.gz")], capture_output=True, text=True)
    assert proc.returncode == 1 and "not on the same voxel grid" in proc.stderr
