"""Human-alignment metrics against SciPy (Spearman) and NumPy (percentile masks) references."""

import os
import subprocess
import sys
from pathlib import Path

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


# ----------------------------------------------------------------------------- the two Spearman paths, chunks
def _spearman_tf_path(a, b, **kwargs):
    """`spearman` forced onto its TensorFlow path while executing eagerly (the path a GPU takes)."""
    original = metrics._numpy_path_applies
    metrics._numpy_path_applies = lambda _: False
    try:
        return metrics.spearman(a, b, **kwargs)
    finally:
        metrics._numpy_path_applies = original


def tied_map_pairs(kind, n, size, dtype):
    """Pairs of maps with many ties: integer-valued maps, or human-like maps with large zero regions."""
    if kind == "integers":
        a = RNG.integers(0, 6, (n, size, size)).astype(dtype)
        b = RNG.integers(-3, 3, (n, size, size)).astype(dtype)
    else:
        b = human_like_maps(n, size).astype(dtype)
        a = (saliency_like_maps(n, size) + 2 * b).astype(dtype)
        a[:, : size // 3] = 0.0  # a tie group in the saliency map too
        a[:, : size // 6] = -0.0  # signed zeros tie with zeros, as in scipy
    a[1] = 0.0  # a constant map
    a[3] = b[3]  # a perfect match
    return a, b


@pytest.mark.parametrize("kind", ["integers", "human_like"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_and_tensorflow_paths_agree_with_scipy_and_each_other_across_chunks(
    kind, dtype, monkeypatch
):
    a, b = tied_map_pairs(kind, 7, 40, dtype)
    monkeypatch.setattr(metrics, "CHUNK_PIXELS", 3 * 40 * 40)  # chunks of 3, 3 and 1 maps
    sorted_rows = []
    rank = metrics._centred_sorted_ranks
    monkeypatch.setattr(metrics, "_centred_sorted_ranks", lambda x: sorted_rows.append(len(x)) or rank(x))
    eager = metrics.spearman(a, b, dtype=tf.float64).numpy()
    if not tf.config.list_logical_devices("GPU"):
        assert sorted_rows == [3, 3, 3, 3, 1, 1]  # the NumPy path, in chunks (a and b each)
    tf_eager = _spearman_tf_path(a, b, dtype=tf.float64).numpy()
    graph_fn = tf.function(lambda x, y: metrics.spearman(x, y, dtype=tf.float64))
    in_graph = graph_fn(a, b).numpy()
    op_types = {op.type for op in graph_fn.get_concrete_function(a, b).graph.get_operations()}
    assert op_types & {"While", "StatelessWhile"}  # the graph path is chunked too

    expected = scipy_spearman(a[[0, 2, 3, 4, 5, 6]], b[[0, 2, 3, 4, 5, 6]])
    assert eager[1] == 0.0 and eager[3] == 1.0
    np.testing.assert_allclose(np.delete(eager, 1), expected, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(tf_eager, eager)  # identical, not just close
    np.testing.assert_array_equal(in_graph, eager)
    # The default float32 result is the same numbers, rounded.
    np.testing.assert_array_equal(metrics.spearman(a, b).numpy(), eager.astype(np.float32))
    np.testing.assert_array_equal(_spearman_tf_path(a, b).numpy(), eager.astype(np.float32))


def test_paths_agree_on_224_maps_across_a_chunk_boundary(monkeypatch):
    human = human_like_maps(5, 224)
    saliency = saliency_like_maps(5, 224)
    saliency[:, :60] = 0.0
    saliency[2] += 5 * human[2]
    monkeypatch.setattr(metrics, "CHUNK_PIXELS", 2 * 224 * 224)
    expected = scipy_spearman(saliency, human)
    eager = metrics.spearman(saliency, human, dtype=tf.float64).numpy()
    np.testing.assert_allclose(eager, expected, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(_spearman_tf_path(saliency, human, dtype=tf.float64).numpy(), eager)
    graph_fn = tf.function(lambda x, y: metrics.spearman(x, y, dtype=tf.float64))
    np.testing.assert_array_equal(graph_fn(saliency, human).numpy(), eager)


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")  # scipy's NaN: checked elsewhere
def test_paths_agree_on_mixed_low_precision_integer_and_tensor_inputs(monkeypatch):
    monkeypatch.setattr(metrics, "CHUNK_PIXELS", 2 * 10 * 10)
    a32, b = tied_map_pairs("human_like", 5, 10, np.float32)
    ints = RNG.integers(0, 4, (5, 10, 10, 1))
    cases = [
        (a32, b.astype(np.float64)),  # mixed dtypes
        (a32.astype(np.float16), b.astype(np.float16)),
        (ints, b),  # integers, (N, H, W, 1)
        (tf.constant(a32), b),  # a tensor and an array
        (tf.cast(a32, tf.bfloat16), tf.cast(b, tf.bfloat16)),
    ]
    for x, y in cases:
        x_np = x.numpy() if isinstance(x, tf.Tensor) else x
        y_np = y.numpy() if isinstance(y, tf.Tensor) else y
        expected = scipy_spearman(np.asarray(x_np, np.float64), np.asarray(y_np, np.float64))
        eager = metrics.spearman(x, y, dtype=tf.float64).numpy()
        finite = ~np.isnan(expected)
        np.testing.assert_allclose(eager[finite], expected[finite], rtol=0, atol=1e-12)
        np.testing.assert_array_equal(_spearman_tf_path(x, y, dtype=tf.float64).numpy(), eager)
        np.testing.assert_array_equal(tf.function(metrics.spearman)(x, y).numpy(), eager.astype(np.float32))


def test_spearman_of_no_maps_is_empty():
    for fn in (metrics.spearman, _spearman_tf_path, tf.function(metrics.spearman)):
        assert fn(np.zeros((0, 4, 4)), np.zeros((0, 4, 4))).shape == (0,)


def test_numpy_maps_are_read_in_place():
    a, b = saliency_like_maps(2, 8), human_like_maps(2, 8)[..., None]
    flat_a, flat_b = metrics._numpy_map_pair(a, b)
    assert flat_a.shape == flat_b.shape == (2, 64)
    assert np.shares_memory(flat_a, a) and np.shares_memory(flat_b, b)
    bad = a.copy()
    bad[0, 0, 0] = np.inf
    assert metrics._numpy_map_pair(bad, a) is None  # left to `_as_map_pair` and its error
    with pytest.raises(ValueError, match="`a` contains NaN or Inf"):
        metrics.spearman(bad, a)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_chunked_metrics_in_tf_function_match_references(jit_compile, monkeypatch):
    a, b = saliency_like_maps(5, 12), human_like_maps(5, 12)
    a[1] = np.round(a[1] * 2) / 2
    monkeypatch.setattr(metrics, "CHUNK_PIXELS", 2 * 12 * 12)  # chunks of 2, 2 and 1 maps
    spearman_fn = tf.function(metrics.spearman, jit_compile=jit_compile)
    dice_fn = tf.function(lambda x, y: metrics.dice(x, y, 25), jit_compile=jit_compile)
    iou_fn = tf.function(lambda x, y: metrics.iou(x, y, 25), jit_compile=jit_compile)
    expected_dice, expected_iou = numpy_overlaps(a, b, 25)
    np.testing.assert_allclose(spearman_fn(a, b).numpy(), scipy_spearman(a, b), atol=1e-6)
    np.testing.assert_allclose(dice_fn(a, b).numpy(), expected_dice, atol=1e-6)
    np.testing.assert_allclose(iou_fn(a, b).numpy(), expected_iou, atol=1e-6)


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


def test_dice_and_iou_across_chunks_match_unchunked(monkeypatch):
    a, b = saliency_like_maps(7, 20), human_like_maps(7, 20)
    a[2] = np.round(a[2] * 2) / 2
    ints = RNG.integers(0, 5, (7, 20, 20))
    expected = [numpy_overlaps(a, b, 15), numpy_overlaps(ints, b, 15)]
    monkeypatch.setattr(metrics, "CHUNK_PIXELS", 3 * 20 * 20)
    for (expected_dice, expected_iou), x in zip(expected, (a, ints)):
        np.testing.assert_allclose(metrics.dice(x, b, 15).numpy(), expected_dice, atol=1e-6)
        np.testing.assert_allclose(metrics.iou(tf.constant(x), b, 15).numpy(), expected_iou, atol=1e-6)


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
        got = metrics.top_percentile_masks(tf.constant(row[None, None]), 25.0).numpy()[0, 0]
        np.testing.assert_array_equal(got, expected)
    assert disagreements > 0  # the case is really exercised


def test_top_percentile_masks_and_overlap_are_the_published_binarisation():
    a, b = saliency_like_maps(3, 9), human_like_maps(3, 9)
    expected_a = np.stack([m > np.percentile(m, 85) for m in a])
    expected_b = np.stack([m > np.percentile(m, 85) for m in b])
    np.testing.assert_array_equal(metrics.top_percentile_masks(a, 15).numpy(), expected_a)
    np.testing.assert_array_equal(metrics.top_percentile_masks(b[..., None], 15).numpy(), expected_b)
    overlap = metrics.top_percentile_overlap(a, b, 15)
    np.testing.assert_array_equal(overlap.intersection.numpy(), (expected_a & expected_b).sum((1, 2)))
    np.testing.assert_array_equal(overlap.sizes.numpy(), expected_a.sum((1, 2)) + expected_b.sum((1, 2)))
    np.testing.assert_array_equal(overlap.union.numpy(), (expected_a | expected_b).sum((1, 2)))
    with pytest.raises(ValueError, match="`percentile`"):
        metrics.top_percentile_masks(a, 100)


def test_default_metrics_are_the_published_three_and_read_only():
    assert dict(metrics.DEFAULT_METRICS) == {"spearman": metrics.spearman, "dice": metrics.dice, "iou": metrics.iou}
    with pytest.raises(TypeError):
        metrics.DEFAULT_METRICS["mine"] = metrics.dice


def alignment_batches():
    import keras

    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 3, padding="same", activation="tanh"),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)])
    images = RNG.uniform(0, 1, (6, 8, 8, 3)).astype(np.float32)
    heatmaps = human_like_maps(6, 8)
    labels = RNG.integers(0, 3, 6)
    return model, [(images[:4], heatmaps[:4], labels[:4]), (images[4:], heatmaps[4:], labels[4:])]


def test_evaluate_alignment_reports_a_custom_metric_per_image_and_as_a_mean():
    from harmonization import evaluate_alignment
    from harmonization.saliency import saliency_map

    model, batches = alignment_batches()
    seen = []

    def top_share(saliency, human, percentile):  # gets evaluate_alignment's percentile
        seen.append(percentile)
        masks = metrics.top_percentile_masks(saliency, percentile).numpy()
        return (masks * human.numpy()).sum((1, 2)) / human.numpy().sum((1, 2))

    result = evaluate_alignment(model, batches, percentile=25, verbose=0,
                                metrics={**metrics.DEFAULT_METRICS, "top_share": top_share})
    default = evaluate_alignment(model, batches, percentile=25, verbose=0)
    assert set(result) == set(default) | {"top_share", "top_share_mean"} and seen == [25.0, 25.0]
    for key in default:
        np.testing.assert_array_equal(result[key], default[key])
    images = np.concatenate([b[0] for b in batches])
    human = np.concatenate([b[1] for b in batches])
    saliency = saliency_map(model, images, np.concatenate([b[2] for b in batches])).numpy()
    expected = np.array([(s > np.percentile(s, 75)) @ h.ravel() / h.sum() for s, h in
                         zip(saliency.reshape(6, -1), human.reshape(6, -1))])
    np.testing.assert_allclose(result["top_share"], expected, rtol=1e-5)
    assert result["top_share_mean"] == pytest.approx(expected.mean(), rel=1e-5)

    only = evaluate_alignment(model, batches, verbose=0, metrics={"iou": metrics.iou})
    assert set(only) == {"iou", "iou_mean", "num_images", "accuracy"}  # no Spearman, no alignment score


@pytest.mark.parametrize("bad, match", [
    ({}, "non-empty mapping"),
    ({"accuracy": metrics.dice}, "not usable"),
    ({"x": metrics.dice, "x_mean": metrics.iou}, "not usable"),
    ({"x": 3}, "must be a function"),
    ({"x": lambda a, b: np.zeros(2)}, r"shape \(4,\)"),
])
def test_evaluate_alignment_refuses_bad_metrics(bad, match):
    from harmonization import evaluate_alignment

    model, batches = alignment_batches()
    with pytest.raises((ValueError, TypeError), match=match):
        evaluate_alignment(model, batches, verbose=0, metrics=bad)


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
# The eager errors of bad maps (rank, channels, shapes, NaN and Inf) are checked on every backend, this one
# included, in tests/test_backends_metrics.py.


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


# ----------------------------------------------------------------------------- benchmark script
@pytest.mark.slow  # five fresh Python processes import TensorFlow
def test_bench_metrics_quick_run():
    script = Path(__file__).resolve().parents[1] / "bench" / "metrics.py"
    done = subprocess.run(
        [sys.executable, str(script), "--quick"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "eager and tf.function results identical: True" in done.stdout
    for line in ("(1) time of one spearman call", "SPEED eager:", "(2) peak memory", "MEMORY spearman"):
        assert line in done.stdout


def test_dice_and_iou_inside_shared_overlaps_binarise_the_same_tensors_once(monkeypatch):
    a, b, c = (tf.constant(m) for m in (saliency_like_maps(4, 10), human_like_maps(4, 10), saliency_like_maps(4, 10)))
    calls = []
    counts = metrics._overlap_counts
    monkeypatch.setattr(metrics, "_overlap_counts", lambda *args: calls.append(1) or counts(*args))
    metrics.dice(a, b), metrics.iou(a, b)
    assert len(calls) == 2  # outside the block: each on its own
    with metrics.shared_overlaps():
        dice, iou = metrics.dice(a, b).numpy(), metrics.iou(a, b).numpy()
        assert len(calls) == 3
        np.testing.assert_allclose(np.stack([dice, iou]), np.stack(numpy_overlaps(a.numpy(), b.numpy(), 10)),
                                   atol=1e-6)
        # Other maps, another percentile, or NumPy arrays (mutable) are computed afresh.
        np.testing.assert_allclose(metrics.iou(a, c).numpy(), numpy_overlaps(a.numpy(), c.numpy(), 10)[1], atol=1e-6)
        np.testing.assert_allclose(metrics.iou(a, c, 20).numpy(), numpy_overlaps(a.numpy(), c.numpy(), 20)[1],
                                   atol=1e-6)
        array = b.numpy()
        metrics.dice(array, array)
        array[:] = c.numpy()
        np.testing.assert_allclose(metrics.dice(array, b).numpy(), numpy_overlaps(c.numpy(), b.numpy(), 10)[0],
                                   atol=1e-6)
        assert len(calls) == 7
    metrics.dice(a, b)
    assert len(calls) == 8  # the block's results are gone with it
