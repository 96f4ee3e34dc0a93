"""Segmentation metrics: public test vectors, every empty-mask case, and MONAI as the oracle."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from engine.scoring.conventions import EmptyMaskPolicy, image_diagonal_mm, worst_value
from engine.scoring.lesions import lesion_wise
from engine.scoring.segmentation import (
    SegmentationSettings,
    score_label,
    score_segmentation,
    weighted_percentile,
)


def ball(shape, centre, radius):
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius ** 2


# -- public vectors (MONAI's own tests; DeepMind's two cubes) -----------------------------------


@pytest.fixture(scope="module")
def balls():
    return ball((99, 99, 99), (20, 33, 22), 20), ball((99, 99, 99), (20, 33, 22), 40)


def test_monai_ball_vectors(balls):
    pred, ref = balls
    scores = score_label(pred, ref, (1.0, 1.0, 1.0))
    assert scores["hd"] == pytest.approx(20.223748416156685, rel=1e-12)
    assert scores["hd95"] == pytest.approx(20.09975124224178, rel=1e-12)
    assert scores["assd"] == pytest.approx(15.117741, rel=1e-6)


def test_monai_ball_directed_vectors(balls):
    """The directed values of the same vectors, from our one distance computation."""
    from engine.scoring.surface import edge_distances, edges

    pred, ref = balls
    distances = edge_distances(edges(pred), edges(ref), (1.0, 1.0, 1.0))
    assert distances.pred_to_ref.max() == pytest.approx(20.09975124224178, rel=1e-12)
    assert np.percentile(distances.pred_to_ref, 95) == pytest.approx(19.924858845171276,
                                                                     rel=1e-12)
    assert distances.pred_to_ref.mean() == pytest.approx(12.040033513150455, rel=1e-12)


def test_deepmind_two_cubes_edge_mode():
    ref = np.zeros((100, 100, 100), bool)
    ref[0:50] = True
    pred = np.zeros_like(ref)
    pred[0:51] = True
    scores = score_label(pred, ref, (2.0, 1.0, 1.0))
    assert scores["dice"] == pytest.approx(0.990, abs=5e-4)
    assert scores["hd95"] == pytest.approx(2.0)


# -- empty masks: the conventions table ------------------------------------------------------


EMPTY = np.zeros((10, 12, 14), bool)
SOME = EMPTY.copy()
SOME[3:6, 4:8, 5:9] = True
DIAGONAL = image_diagonal_mm((10, 12, 14), (1.0, 2.0, 3.0))


def test_both_empty_is_perfect():
    scores = score_label(EMPTY, EMPTY, (1.0, 2.0, 3.0))
    assert {k: scores[k] for k in ("dice", "iou", "nsd", "sensitivity", "precision")} == \
        dict.fromkeys(("dice", "iou", "nsd", "sensitivity", "precision"), 1.0)
    assert scores["hd"] == scores["hd95"] == scores["assd"] == scores["masd"] == 0.0
    assert scores["volume_difference_ml"] == 0.0


def test_reference_empty_prediction_not():
    scores = score_label(SOME, EMPTY, (1.0, 2.0, 3.0))
    assert scores["dice"] == scores["iou"] == scores["nsd"] == 0.0
    assert scores["hd"] == scores["hd95"] == scores["assd"] == scores["masd"] == DIAGONAL
    assert scores["sensitivity"] == 1.0 and scores["precision"] == 0.0
    assert scores["volume_difference_ml"] == pytest.approx(48 * 6 / 1000)


def test_prediction_empty_reference_not():
    scores = score_label(EMPTY, SOME, (1.0, 2.0, 3.0))
    assert scores["dice"] == scores["nsd"] == 0.0
    assert scores["hd95"] == DIAGONAL
    assert scores["sensitivity"] == 0.0 and scores["precision"] == 1.0


def test_empty_policy_is_configurable():
    policy = EmptyMaskPolicy(both_empty_overlap=0.0, one_empty_distance=373.0,
                             both_empty_distance="diagonal")
    custom = SegmentationSettings(empty=policy)
    assert score_label(EMPTY, EMPTY, (1, 1, 1), custom)["dice"] == 0.0
    assert score_label(EMPTY, EMPTY, (1, 1, 1), custom)["hd"] == image_diagonal_mm(
        EMPTY.shape, (1, 1, 1))
    assert score_label(SOME, EMPTY, (1, 1, 1), custom)["hd95"] == 373.0


def test_no_metric_is_ever_nan_or_infinite():
    for pred, ref in ((EMPTY, EMPTY), (SOME, EMPTY), (EMPTY, SOME), (SOME, SOME)):
        assert all(np.isfinite(v) for v in score_label(pred, ref, (1, 1, 1)).values())


def test_worst_values_for_failed_cases():
    assert worst_value("dice", diagonal_mm=100.0) == 0.0
    assert worst_value("hd95", diagonal_mm=100.0) == 100.0
    assert worst_value("abs_volume_difference_ml", diagonal_mm=1, reference_volume_ml=3) == 3


def test_multi_label_scores_each_label():
    pred = np.zeros((20, 20, 20), np.uint8)
    ref = pred.copy()
    ref[2:8, 2:8, 2:8], pred[2:8, 2:8, 2:8] = 1, 1
    ref[10:15, 10:15, 10:15], pred[11:16, 10:15, 10:15] = 2, 2
    scores = score_segmentation(pred, ref, (1, 1, 1), SegmentationSettings(labels=(1, 2, 3)))
    assert scores[1]["dice"] == 1.0 and scores[1]["hd"] == 0.0
    assert scores[2]["dice"] == pytest.approx(2 * 100 / 250)
    assert scores[3]["dice"] == 1.0  # absent from both: the both-empty row


def test_weighted_percentile_is_nearest_rank():
    values = np.array([1.0, 2.0, 3.0, 4.0])
    assert weighted_percentile(values, np.ones(4), 50) == 2.0
    assert weighted_percentile(values, np.array([1, 1, 1, 97.0]), 50) == 4.0


def test_cropping_does_not_change_values():
    """A structure touching the image border and one far inside score as uncropped."""
    big = np.zeros((60, 60, 60), bool)
    big[0:10, 20:30, 20:30] = True
    shifted = np.roll(big, 2, axis=1)
    scores = score_label(shifted, big, (0.5, 1.0, 2.0))
    monai = monai_scores(shifted, big, (0.5, 1.0, 2.0), 1.0)
    for metric, value in monai.items():
        assert scores[metric] == pytest.approx(value, rel=1e-5, abs=1e-6)


# -- MONAI as the oracle, on random masks and spacings (edge mode) ---------------------------


def monai_scores(pred, ref, spacing, tolerance):
    import torch
    from monai.metrics import (
        compute_average_surface_distance,
        compute_dice,
        compute_hausdorff_distance,
        compute_surface_dice,
    )

    def onehot(mask):
        return torch.from_numpy(np.stack([~mask, mask])[None].astype(np.float32))

    p, r = onehot(pred), onehot(ref)
    spacing = [float(s) for s in spacing]
    return {
        "dice": float(compute_dice(p, r, include_background=False)[0, 0]),
        "hd": float(compute_hausdorff_distance(p, r, include_background=False, spacing=spacing)[
            0, 0]),
        "hd95": float(compute_hausdorff_distance(p, r, include_background=False, percentile=95,
                                                 spacing=spacing)[0, 0]),
        "assd": float(compute_average_surface_distance(p, r, include_background=False,
                                                       symmetric=True, spacing=spacing)[0, 0]),
        "nsd": float(compute_surface_dice(p, r, class_thresholds=[tolerance],
                                          include_background=False, spacing=spacing)[0, 0]),
    }


# Realistic structures, not coin flips: blobs (unions of ellipsoids), shells, thin lines and
# planes, a little speckle; the prediction is the reference moved, grown, shrunk, given a
# spurious blob, or another structure altogether; spacings often strongly anisotropic.
shapes = st.tuples(st.integers(6, 22), st.integers(6, 22), st.integers(4, 14))
spacings = st.one_of(
    st.tuples(*(st.floats(0.3, 3.0, allow_nan=False) for _ in range(3))),
    st.tuples(st.floats(0.3, 1.0), st.floats(0.3, 1.0), st.floats(2.0, 6.0)),  # thick slices
    st.permutations([0.4, 0.8, 5.0]).map(tuple),
)


@st.composite
def ellipsoid(draw, shape, *, scale: float = 1.0) -> np.ndarray:
    centre = [draw(st.floats(0, n - 1)) for n in shape]
    radii = [draw(st.floats(0.8, max(1.0, n / 2.5))) * scale for n in shape]
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1.0


@st.composite
def blob(draw, shape) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for _ in range(draw(st.integers(1, 3))):
        mask |= draw(ellipsoid(shape))
    return mask


@st.composite
def shell(draw, shape) -> np.ndarray:
    from scipy import ndimage

    solid = draw(ellipsoid(shape))
    return solid & ~ndimage.binary_erosion(solid, iterations=draw(st.integers(1, 2)))


@st.composite
def thin(draw, shape) -> np.ndarray:
    """A one-voxel line or plane along an axis, or a one-voxel diagonal line."""
    mask = np.zeros(shape, bool)
    kind = draw(st.sampled_from(["line", "plane", "diagonal"]))
    axis = draw(st.integers(0, 2))
    index = [draw(st.integers(0, n - 1)) for n in shape]
    if kind == "diagonal":
        steps = np.arange(min(shape))
        mask[steps, steps, steps[::-1] if draw(st.booleans()) else steps] = True
        return mask
    where = [slice(None) if (a == axis) == (kind == "line") else index[a] for a in range(3)]
    mask[tuple(where)] = True
    return mask


@st.composite
def speckle(draw, shape) -> np.ndarray:
    seed = draw(st.integers(0, 2 ** 32 - 1))
    return np.random.default_rng(seed).random(shape) < draw(st.floats(0.02, 0.3))


STRUCTURES = (blob, shell, thin, speckle)


@st.composite
def perturbed(draw, ref: np.ndarray) -> np.ndarray:
    """Never the reference itself (identical masks are the tests above): a shift along a
    plane or a line's own axis, say, becomes growth instead."""
    from scipy import ndimage

    pred = draw(_perturbation(ref))
    return ndimage.binary_dilation(ref) if np.array_equal(pred, ref) else pred


@st.composite
def _perturbation(draw, ref: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    how = draw(st.sampled_from(["shift", "grow", "shrink", "spurious", "other"]))
    if how == "shift":
        offset = draw(st.tuples(*(st.integers(-2, 2) for _ in range(3))).filter(any))
        return np.roll(ref, offset, axis=(0, 1, 2))
    if how == "grow":
        return ndimage.binary_dilation(ref, iterations=draw(st.integers(1, 2)))
    if how == "shrink":
        shrunk = ndimage.binary_erosion(ref)
        return shrunk if shrunk.any() else np.roll(ref, 1, axis=0)
    if how == "spurious":
        return ref | draw(ellipsoid(ref.shape, scale=0.5))
    return draw(draw(st.sampled_from(STRUCTURES))(ref.shape))


@st.composite
def mask_pairs(draw) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, reference): both non-empty (MONAI's empty conventions differ: see above)."""
    shape = draw(shapes)
    ref = draw(draw(st.sampled_from(STRUCTURES))(shape))
    pred = draw(perturbed(ref))
    assume(pred.any() and ref.any())
    return pred, ref


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=mask_pairs(), spacing=spacings, tolerance=st.floats(0.0, 4.0))
def test_edge_mode_matches_monai(pair, spacing, tolerance):
    pred, ref = pair
    ours = score_label(pred, ref, spacing, SegmentationSettings(nsd_tolerance_mm=tolerance))
    theirs = monai_scores(pred, ref, spacing, tolerance)
    for metric in ("dice", "hd", "hd95", "assd"):
        # MONAI keeps distances in float32: agreement to float32 precision
        assert ours[metric] == pytest.approx(theirs[metric], rel=1e-5, abs=1e-5), metric
    # NSD counts distances <= tolerance; MONAI's float32 copy of a distance lying exactly on
    # the tolerance can fall on the other side. Only such borderline distances may differ.
    from engine.scoring.surface import edge_distances, edges

    distances = edge_distances(edges(pred), edges(ref), spacing)
    every = np.concatenate([distances.pred_to_ref, distances.ref_to_pred])
    borderline = np.count_nonzero(np.abs(every - tolerance) <= 1e-6 * max(tolerance, 1.0))
    assert abs(ours["nsd"] - theirs["nsd"]) <= borderline / every.size + 1e-7


# -- lesion-wise -------------------------------------------------------------------------


def test_lesion_wise_counts_misses_and_false_positives():
    shape = (40, 40, 40)
    ref = ball(shape, (10, 10, 10), 4) | ball(shape, (30, 30, 30), 4)
    pred = ball(shape, (10, 10, 11), 4) | ball(shape, (30, 10, 30), 4)  # one hit, one FP
    scores = lesion_wise(pred, ref, (1.0, 1.0, 1.0), min_voxels=10)
    hit = score_label(ball(shape, (10, 10, 11), 4), ball(shape, (10, 10, 10), 4), (1, 1, 1))
    diagonal = image_diagonal_mm(shape, (1, 1, 1))
    assert scores["lesions"] == 2 and scores["false_positive_lesions"] == 1
    assert scores["lesion_dice"] == pytest.approx(hit["dice"] / 3)
    assert scores["lesion_hd95"] == pytest.approx((hit["hd95"] + 2 * diagonal) / 3)


def test_lesion_wise_drops_small_lesions_and_handles_empty():
    shape = (30, 30, 30)
    speck = np.zeros(shape, bool)
    speck[5, 5, 5] = True
    assert lesion_wise(speck, np.zeros(shape, bool), (1, 1, 1), min_voxels=2) == {
        "lesion_dice": 1.0, "lesion_hd95": 0.0, "lesions": 0.0, "false_positive_lesions": 0.0}


# -- subvoxel mode: DeepMind's surface-distance as the oracle ----------------------------


def test_deepmind_two_cubes_subvoxel_mode():
    ref = np.zeros((100, 100, 100), bool)
    ref[0:50] = True
    pred = np.zeros_like(ref)
    pred[0:51] = True
    scores = score_label(pred, ref, (2.0, 1.0, 1.0), SegmentationSettings(
        surface="subvoxel", nsd_tolerance_mm=1.0))
    assert scores["nsd"] == pytest.approx(0.836, abs=5e-4)
    assert scores["hd95"] == pytest.approx(2.0)
    assert scores["dice"] == pytest.approx(0.990, abs=5e-4)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.7, 1.3, 2.9), (2.0, 0.5, 0.5)])
def test_area_table_equals_the_published_one(spacing):
    from monai.metrics.utils import create_table_neighbour_code_to_surface_area

    from engine.scoring.subvoxel import area_table

    published = create_table_neighbour_code_to_surface_area(spacing)[0].numpy()
    assert np.allclose(area_table(spacing), published, rtol=1e-6, atol=1e-6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=mask_pairs(), spacing=spacings, tolerance=st.floats(0.0, 4.0))
def test_subvoxel_mode_matches_deepmind(pair, spacing, tolerance):
    import surface_distance as deepmind

    pred, ref = pair
    ours = score_label(pred, ref, spacing, SegmentationSettings(surface="subvoxel",
                                                                nsd_tolerance_mm=tolerance))
    distances = deepmind.compute_surface_distances(ref, pred, spacing)
    ref_to_pred, pred_to_ref = deepmind.compute_average_surface_distance(distances)
    # A distance lying exactly on the tolerance may round an ulp apart in the two
    # implementations: NSD must lie between DeepMind's just below and just above it.
    low = deepmind.compute_surface_dice_at_tolerance(distances, tolerance * (1 - 1e-9))
    high = deepmind.compute_surface_dice_at_tolerance(distances, tolerance * (1 + 1e-9) + 1e-12)
    assert low - 1e-12 <= ours["nsd"] <= high + 1e-12
    expected = {
        "hd95": deepmind.compute_robust_hausdorff(distances, 95),
        "hd": deepmind.compute_robust_hausdorff(distances, 100),
        "masd": (ref_to_pred + pred_to_ref) / 2,
    }
    for metric, value in expected.items():
        assert ours[metric] == pytest.approx(value, rel=1e-9, abs=1e-12), metric
