"""Human-alignment metrics against SciPy (Spearman) and NumPy (percentile masks) references."""

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from harmonization import metrics

RNG = np.random.default_rng(2022)


@pytest.fixture(autouse=True)
def _same_data_whatever_runs_first():
    """Each test draws from a freshly seeded RNG, so its data do not depend on the tests before it."""
    global RNG
    RNG = np.random.default_rng(2022)


def human_like_maps(n, size):
    """ClickMe-like maps: mostly exact zeros, with one or two smooth blobs of clicks."""
    rows, cols = np.mgrid[:size, :size]
    maps = np.zeros((n, size, size), np.float32)
    for i in range(n):
        for _ in range(RNG.integers(1, 3)):
            r, c = RNG.uniform(0.2, 0.8, 2) * size
            sigma = RNG.uniform(0.04, 0.1) * size
            blob = np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * sigma**2))
            maps[i] += np.where(blob > 0.05, blob, 0.0).astype(np.float32)
    return maps


def saliency_like_maps(n, size):
    """Continuous, non-negative, noisy maps, like |input gradients|."""
    return np.abs(RNG.normal(size=(n, size, size))).astype(np.float32)


def scipy_spearman(a, b):
    return np.array([stats.spearmanr(x.ravel(), y.ravel())[0] for x, y in zip(a, b)])


def numpy_overlaps(a, b, percentile):
    """The published formulas (serre-lab/Harmonization evaluation/metrics.py), epsilon 1e-9 included."""
    masks_a = np.stack([m > np.percentile(m, 100 - percentile) for m in a]).reshape(len(a), -1)
    masks_b = np.stack([m > np.percentile(m, 100 - percentile) for m in b]).reshape(len(b), -1)
    inter = (masks_a & masks_b).sum(1)
    dice = 2.0 * inter / (masks_a.sum(1) + masks_b.sum(1) + 1e-9)
    iou = inter / ((masks_a | masks_b).sum(1) + 1e-9)
    return dice, iou


# ----------------------------------------------------------------------------- ranks and Spearman
def test_average_ranks_match_scipy_rankdata_with_ties():
    values = np.round(RNG.normal(size=(4, 300)) * 3).astype(np.float32)  # ~20 distinct values
    values[1] = 0.0  # a constant row
    values[2, :150] = -0.0  # signed zeros tie with zeros, as in scipy
    expected = np.stack([stats.rankdata(row) for row in values])
    doubled = metrics.average_ranks(values).numpy()
    assert doubled.dtype == np.int64
    np.testing.assert_array_equal(doubled / 2, expected)


def test_spearman_matches_scipy_on_224_maps_with_large_constant_regions():
    human = human_like_maps(3, 224)
    assert np.mean(human == 0) > 0.5  # large tie groups, the case float32 rank sums get wrong
    saliency = saliency_like_maps(3, 224)
    saliency[:, :40] = 0.0  # ties on both sides
    saliency[1] += 10 * human[1]  # one well-aligned pair
    expected = scipy_spearman(saliency, human)
    got = metrics.spearman(saliency, human)
    assert got.shape == (3,) and got.dtype == tf.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-6)
    assert expected[1] > 0.3  # the reference is not trivially ~0


def test_spearman_matches_scipy_on_heavily_tied_maps_and_input_layouts():
    a = np.round(RNG.random((5, 12, 9)) * 4)  # float64, five distinct values
    b = np.round(RNG.random((5, 12, 9, 1)) * 3).astype(np.float32)  # (N, H, W, 1), other dtype
    expected = scipy_spearman(a, b[..., 0])
    np.testing.assert_allclose(metrics.spearman(a, b).numpy(), expected, atol=1e-6)
    ids = RNG.integers(0, 5, (5, 12, 9))  # integer maps
    np.testing.assert_allclose(
        metrics.spearman(ids, a).numpy(), scipy_spearman(ids, a), atol=1e-6
    )


def test_spearman_is_rank_based():
    a = saliency_like_maps(2, 16)
    np.testing.assert_allclose(metrics.spearman(a, np.exp(3 * a)).numpy(), [1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(metrics.spearman(a, -a).numpy(), [-1.0, -1.0], atol=1e-6)


def test_constant_map_scores_zero_where_scipy_gives_nan():
    a = saliency_like_maps(3, 8)
    b = saliency_like_maps(3, 8)
    b[0] = 0.0  # a blank human map
    a[1] = 5.0  # a blank saliency map
    a[2] = b[2] = 1.0  # both blank
    with pytest.warns(stats.ConstantInputWarning):
        assert np.isnan(scipy_spearman(a[:1], b[:1])[0])
    np.testing.assert_array_equal(metrics.spearman(a, b).numpy(), [0.0, 0.0, 0.0])


def test_spearman_in_a_graph_with_unknown_shapes_matches_eager():
    a, b = saliency_like_maps(3, 20), human_like_maps(3, 20)
    graph_fn = tf.function(
        metrics.spearman,
        input_signature=[tf.TensorSpec([None, None, None], tf.float32)] * 2,
    )
    np.testing.assert_allclose(graph_fn(a, b).numpy(), scipy_spearman(a, b), atol=1e-6)


def test_metrics_compile_with_xla_on_full_size_maps():
    a, b = saliency_like_maps(2, 224), human_like_maps(2, 224)
    spearman_xla = tf.function(metrics.spearman, jit_compile=True)
    dice_xla = tf.function(lambda x, y: metrics.dice(x, y, 30), jit_compile=True)
    np.testing.assert_allclose(spearman_xla(a, b).numpy(), scipy_spearman(a, b), atol=1e-6)
    np.testing.assert_allclose(dice_xla(a, b).numpy(), numpy_overlaps(a, b, 30)[0], atol=1e-6)


# ----------------------------------------------------------------------------- Dice and IoU
@pytest.mark.parametrize("percentile", [10, 2.5, 33.3, 50, 90, 99.5])
def test_dice_and_iou_match_numpy_percentile_masks(percentile):
    a = saliency_like_maps(4, 30)
    b = human_like_maps(4, 30)
    b[2] = saliency_like_maps(1, 30)[0]  # a continuous pair, too
    a[3] = np.round(a[3] * 2) / 2  # ties straddling the threshold
    expected_dice, expected_iou = numpy_overlaps(a, b, percentile)
    np.testing.assert_allclose(metrics.dice(a, b, percentile).numpy(), expected_dice, atol=1e-6)
    np.testing.assert_allclose(metrics.iou(a, b, percentile).numpy(), expected_iou, atol=1e-6)
    assert np.any(expected_iou > 0)


def test_percentile_threshold_follows_numpys_float32_interpolation():
    # Threshold halfway between two adjacent float32 values: numpy interpolates in float32 and rounds
    # onto one of them, which decides whether that pixel is kept; float64 arithmetic can disagree.
    disagreements = 0
    for start in (1.0, 1.5, 3.0, 0.1, 0.3, 0.7):
        low = np.float32(start)
        high = np.nextafter(low, np.float32(2 * start + 1))
        row = np.array([0.0, low, high], np.float32)  # 25th percentile: virtual index 1.5 of 3
        expected = row > np.percentile(row, 75)
        disagreements += np.any(expected != (row > np.percentile(row.astype(np.float64), 75)))
        got = metrics._top_percentile_masks(tf.constant(row[None]), 25.0).numpy()[0]
        np.testing.assert_array_equal(got, expected)
    assert disagreements > 0  # the case is really exercised


def test_dice_and_iou_by_hand():
    # Top 40 % of 5 pixels: threshold = 60th percentile; a keeps {3, 4}, b keeps {2, 4}.
    a = np.array([[[0.0, 1.0, 2.0, 3.0, 4.0]]])
    b = np.array([[[0.0, 1.0, 3.0, 2.0, 4.0]]])
    assert metrics.dice(a, b, 40).numpy()[0] == pytest.approx(2 * 1 / (2 + 2))
    assert metrics.iou(a, b, 40).numpy()[0] == pytest.approx(1 / 3)
    assert metrics.dice(a, a, 40).numpy()[0] == pytest.approx(1.0)


def test_empty_masks_score_zero():
    blank = np.zeros((2, 6, 6), np.float32)  # nothing is above its own percentile
    other = saliency_like_maps(2, 6)
    np.testing.assert_array_equal(metrics.dice(blank, blank).numpy(), [0.0, 0.0])
    np.testing.assert_array_equal(metrics.iou(blank, blank).numpy(), [0.0, 0.0])
    np.testing.assert_array_equal(metrics.dice(blank, other).numpy(), [0.0, 0.0])
    np.testing.assert_array_equal(metrics.iou(other, blank).numpy(), [0.0, 0.0])


def test_dice_and_iou_add_the_published_epsilon_to_the_denominator():
    assert metrics.EPSILON == 1e-9
    # Visible only when the denominator is 0: the published ratio, not a guarded "0 if empty".
    ratio = metrics._published_ratio(tf.constant([1.0, 0.0, 3.0]), tf.constant([0.0, 0.0, 4.0]))
    np.testing.assert_allclose(ratio.numpy(), [1e9, 0.0, 0.75], rtol=1e-7)


def test_dice_in_a_graph_with_unknown_shapes_matches_numpy():
    a, b = saliency_like_maps(3, 11), human_like_maps(3, 11)
    graph_fn = tf.function(
        lambda x, y: metrics.dice(x, y, 20),
        input_signature=[tf.TensorSpec([None, None, None], tf.float32)] * 2,
    )
    np.testing.assert_allclose(graph_fn(a, b).numpy(), numpy_overlaps(a, b, 20)[0], atol=1e-6)


# ----------------------------------------------------------------------------- alignment score
def test_alignment_score_is_mean_over_ceiling():
    values = np.array([0.1, 0.5, 0.3])
    assert metrics.alignment_score(values) == pytest.approx(0.3 / 0.65753)
    assert metrics.alignment_score(tf.constant(values), ceiling=0.6) == pytest.approx(0.5)
    assert isinstance(metrics.alignment_score([0.2]), float)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("metric", [metrics.spearman, metrics.dice, metrics.iou])
def test_bad_maps_raise_errors_naming_the_argument(metric):
    good = np.ones((2, 4, 4), np.float32)
    with pytest.raises(ValueError, match="`a`.*rank 2"):
        metric(np.ones((4, 4)), good)
    with pytest.raises(ValueError, match="`b`.*3 channels"):
        metric(good, np.ones((2, 4, 4, 3)))
    with pytest.raises(ValueError, match=r"same shape.*\(2, 4, 4\).*\(2, 4, 5\)"):
        metric(good, np.ones((2, 4, 5)))
    nan_map = good.copy()
    nan_map[1, 2, 2] = np.nan
    with pytest.raises(ValueError, match="`b` contains NaN"):
        metric(good, nan_map)


def test_nan_in_a_graph_fails_naming_the_argument():
    maps = np.ones((1, 4, 4), np.float32)
    bad = maps.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="`a` contains NaN"):
        tf.function(metrics.spearman)(bad, maps)


@pytest.mark.parametrize("percentile", [0, 100, -5, 150, float("nan"), True, "10", None])
def test_bad_percentile_raises(percentile):
    maps = np.ones((1, 3, 3))
    for metric in (metrics.dice, metrics.iou):
        with pytest.raises(ValueError, match="`percentile` must be a number strictly between 0 and 100"):
            metric(maps, maps, percentile)


@pytest.mark.parametrize("ceiling", [0, -0.5, float("nan"), float("inf"), "0.6"])
def test_bad_ceiling_raises(ceiling):
    with pytest.raises(ValueError, match="`ceiling` must be a finite number > 0"):
        metrics.alignment_score([0.3], ceiling)


@pytest.mark.parametrize("spearmans", [[], [[0.1, 0.2]], [0.1, float("nan")], 0.3])
def test_bad_spearmans_raise(spearmans):
    with pytest.raises(ValueError, match="`spearmans`"):
        metrics.alignment_score(spearmans)
