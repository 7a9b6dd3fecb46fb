"""Alignment metrics and `evaluate_alignment` on every Keras backend (issue 19, §1-2), against SciPy and the
published formulas.

The references are independent of our code: `scipy.stats.spearmanr` per map (0 where a map is constant, where
scipy gives NaN), and the published binarisation `m > np.percentile(m, 100 - p)` with Dice and IoU over it plus
1e-9 (serre-lab/Harmonization `evaluation/metrics.py`), written out per map below. Inputs are NumPy arrays and the
backend's own tensors; on TensorFlow the results are tensors, on JAX and PyTorch NumPy arrays. No TensorFlow is
imported here: CI runs this file under JAX and PyTorch where it is not installed.
"""

from __future__ import annotations


import keras
import numpy as np
import pytest
from scipy import stats

from backend_helpers import current_backend, installed, other_backends, run_on_backend
from harmonization import _spearman_device, evaluate_alignment, metrics
from harmonization.saliency import saliency_map

pytestmark = pytest.mark.backends


def human_like_maps(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """ClickMe-like maps: mostly exact zeros (ties), one smooth blob of clicks each."""
    rows, cols = np.mgrid[:size, :size]
    maps = np.zeros((n, size, size), np.float32)
    for i in range(n):
        r, c = rng.uniform(0.2, 0.8, 2) * size
        blob = np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * (0.12 * size) ** 2))
        maps[i] = np.where(blob > 0.1, blob, 0.0)
    return maps


def saliency_like_maps(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Continuous non-negative maps, like |input gradients|, with a few exact ties."""
    maps = np.abs(rng.normal(size=(n, size, size))).astype(np.float32)
    maps[:, 0, :3] = maps[:, 1, 0:1]
    return maps


def scipy_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """scipy's Spearman per map, 0 for a constant map (the documented difference)."""
    values = []
    for x, y in zip(a, b):
        x, y = x.ravel(), y.ravel()
        values.append(0.0 if np.ptp(x) == 0 or np.ptp(y) == 0 else stats.spearmanr(x, y)[0])
    return np.array(values)


def published_dice_iou(a: np.ndarray, b: np.ndarray, percentile: float) -> tuple[np.ndarray, np.ndarray]:
    """The published Dice and IoU, one map at a time: masks above numpy's percentile, epsilon 1e-9."""
    dice, iou = [], []
    for x, y in zip(a, b):
        mask_x, mask_y = x > np.percentile(x, 100 - percentile), y > np.percentile(y, 100 - percentile)
        intersection = np.sum(mask_x & mask_y)
        dice.append(2.0 * intersection / (np.sum(mask_x) + np.sum(mask_y) + 1e-9))
        iou.append(intersection / (np.sum(mask_x | mask_y) + 1e-9))
    return np.array(dice), np.array(iou)


def host(values) -> np.ndarray:
    """A metric's result on the host, and a check of its type: a tensor on TensorFlow, NumPy elsewhere."""
    if current_backend() != "tensorflow":
        assert isinstance(values, np.ndarray), type(values)
        return values
    return keras.ops.convert_to_numpy(values)


@pytest.fixture
def maps() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(19)
    a, b = saliency_like_maps(rng, 5, 12), human_like_maps(rng, 5, 12)
    a[3] = 0.5  # a constant saliency map: Spearman 0, an empty mask
    return a, b


@pytest.mark.parametrize("as_tensor", [False, True], ids=["numpy", "tensor"])
def test_spearman_equals_scipy_with_ties_and_constant_maps(maps, as_tensor):
    a, b = maps
    expected = scipy_spearman(a, b)
    x, y = (keras.ops.convert_to_tensor(a), keras.ops.convert_to_tensor(b)) if as_tensor else (a, b)
    got = host(metrics.spearman(x, y))
    assert got.dtype == np.float32 and got.shape == (5,)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert got[3] == 0.0
    # (N, H, W, 1), float64 results, integer maps (ranked exactly) and rank invariance.
    np.testing.assert_allclose(host(metrics.spearman(a[..., None], b[..., None], dtype="float64")), expected,
                               rtol=1e-12, atol=1e-12)
    ids = np.round(a * 3).astype(np.int64)
    np.testing.assert_allclose(host(metrics.spearman(ids, b)), scipy_spearman(ids, b), atol=1e-6)
    np.testing.assert_allclose(host(metrics.spearman(a[:3], np.exp(2 * a[:3]))), [1.0, 1.0, 1.0], atol=1e-6)


@pytest.mark.parametrize("percentile", [10, 25, 37.5])
@pytest.mark.parametrize("as_tensor", [False, True], ids=["numpy", "tensor"])
def test_dice_and_iou_equal_the_published_formulas(maps, percentile, as_tensor):
    a, b = maps
    expected_dice, expected_iou = published_dice_iou(a, b, percentile)
    x, y = (keras.ops.convert_to_tensor(a), keras.ops.convert_to_tensor(b[..., None])) if as_tensor else (a, b)
    np.testing.assert_allclose(host(metrics.dice(x, y, percentile)), expected_dice, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(host(metrics.iou(x, y, percentile)), expected_iou, rtol=1e-6, atol=1e-7)
    assert host(metrics.dice(a, b, percentile))[3] == 0.0  # a constant map keeps no pixel
    assert host(metrics.iou(a, b, percentile, dtype="float64")).dtype == np.float64


def test_top_percentile_masks_and_overlap_are_the_published_binarisation(maps):
    a, b = maps
    expected_a = np.stack([m > np.percentile(m, 80) for m in a])
    expected_b = np.stack([m > np.percentile(m, 80) for m in b])
    np.testing.assert_array_equal(host(metrics.top_percentile_masks(a, 20)), expected_a)
    np.testing.assert_array_equal(host(metrics.top_percentile_masks(keras.ops.convert_to_tensor(b[..., None]), 20)),
                                  expected_b)
    overlap = metrics.top_percentile_overlap(a, b, 20)
    np.testing.assert_array_equal(host(overlap.intersection), (expected_a & expected_b).sum((1, 2)))
    np.testing.assert_array_equal(host(overlap.sizes), expected_a.sum((1, 2)) + expected_b.sum((1, 2)))
    np.testing.assert_array_equal(host(overlap.union), (expected_a | expected_b).sum((1, 2)))


def test_the_percentile_threshold_is_numpys_float32_interpolation():
    """Halfway between two adjacent float32 values numpy rounds onto one of them, which decides the mask."""
    for start in (1.0, 1.5, 3.0, 0.1, 0.3, 0.7):
        low = np.float32(start)
        row = np.array([0.0, low, np.nextafter(low, np.float32(2 * start + 1))], np.float32)
        got = host(metrics.top_percentile_masks(row[None, None], 25.0))[0, 0]
        np.testing.assert_array_equal(got, row > np.percentile(row, 75))


def test_chunked_scores_equal_unchunked(maps, monkeypatch):
    a, b = maps
    whole = [host(metric(a, b)) for metric in (metrics.spearman, metrics.dice, metrics.iou)]
    monkeypatch.setattr(metrics, "CHUNK_PIXELS", 2 * 12 * 12)  # chunks of 2, 2 and 1 maps
    for metric, expected in zip((metrics.spearman, metrics.dice, metrics.iou), whole):
        np.testing.assert_array_equal(host(metric(a, b)), expected)


def test_alignment_score_takes_backend_tensors():
    values = [0.1, 0.5, 0.3]
    assert metrics.alignment_score(keras.ops.convert_to_tensor(values)) == pytest.approx(0.3 / 0.65753)
    assert metrics.alignment_score(np.array(values), ceiling=0.6) == pytest.approx(0.5)
    assert dict(metrics.DEFAULT_METRICS) == {"spearman": metrics.spearman, "dice": metrics.dice, "iou": metrics.iou}


@pytest.mark.parametrize("metric", [metrics.spearman, metrics.dice, metrics.iou])
def test_bad_maps_raise_the_same_errors_on_every_backend(metric):
    good = np.ones((2, 4, 4), np.float32)
    with pytest.raises(ValueError, match="`a`.*rank 2"):
        metric(np.ones((4, 4)), good)
    for three_channels in (np.ones((2, 4, 4, 3)), keras.ops.convert_to_tensor(np.ones((2, 4, 4, 3)))):
        with pytest.raises(ValueError, match="`b`.*3 channels"):
            metric(good, three_channels)
    with pytest.raises(ValueError, match=r"same shape.*\(2, 4, 4\).*\(2, 4, 5\)"):
        metric(good, np.ones((2, 4, 5)))
    for value in (np.nan, np.inf):
        bad = good.copy()
        bad[1, 2, 2] = value
        with pytest.raises(ValueError, match="`b` contains NaN or Inf"):
            metric(good, bad)


@pytest.mark.parametrize("percentile", [0, 100, -5, float("nan"), True, "10", None])
def test_bad_percentile_ceiling_and_spearmans_raise(percentile):
    maps = np.ones((1, 3, 3))
    for metric in (metrics.dice, metrics.iou, metrics.top_percentile_overlap):
        with pytest.raises(ValueError, match="`percentile` must be a number strictly between 0 and 100"):
            metric(maps, maps, percentile)
    with pytest.raises(ValueError, match="`ceiling` must be a finite number > 0"):
        metrics.alignment_score([0.3], 0)
    with pytest.raises(ValueError, match="`spearmans`"):
        metrics.alignment_score([0.1, float("nan")])


def test_shared_overlaps_binarise_maps_that_cannot_change_once(maps, monkeypatch):
    """Inside the block, read-only arrays that own their memory are binarised once for Dice and IoU (how
    evaluate_alignment hands them over); writeable arrays can change in place, so they are scored afresh."""
    a, b = maps
    calls = []
    counts = metrics._overlap_counts
    monkeypatch.setattr(metrics, "_overlap_counts", lambda *args: calls.append(1) or counts(*args))
    frozen_a, frozen_b = a.copy(), b.copy()
    frozen_a.setflags(write=False)
    frozen_b.setflags(write=False)
    expected_dice, expected_iou = published_dice_iou(a, b, 10)
    with metrics.shared_overlaps():
        np.testing.assert_allclose(host(metrics.dice(frozen_a, frozen_b)), expected_dice, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(host(metrics.iou(frozen_a, frozen_b)), expected_iou, rtol=1e-6, atol=1e-7)
        assert len(calls) == 1
        writeable = b.copy()
        metrics.dice(a, writeable)
        writeable[:] = a
        np.testing.assert_allclose(host(metrics.dice(a, writeable)), published_dice_iou(a, a, 10)[0], rtol=1e-6)
        assert len(calls) == 3


def test_tensors_on_the_backends_device_and_in_autograd_are_read_on_the_host(maps):
    """`keras.ops.convert_to_tensor` puts a tensor on the backend's default device (the GPU where there is one);
    a PyTorch tensor may also require grad, which NumPy cannot read without detaching it."""
    a, b = maps
    x, y = keras.ops.convert_to_tensor(a), keras.ops.convert_to_tensor(b)
    if current_backend() == "torch":
        x.requires_grad_(True)
    np.testing.assert_allclose(host(metrics.spearman(x, y)), scipy_spearman(a, b), atol=1e-6)
    np.testing.assert_allclose(host(metrics.iou(x, y)), published_dice_iou(a, b, 10)[1], rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- Spearman where the maps are
def check_device_spearman() -> bool:
    """Spearman's device path (`harmonization._spearman_device`, what JAX and PyTorch use for maps on a GPU), forced
    here on the backend's CPU, against scipy and the host path: ties, constant maps, (N, H, W, 1) tensors, float16,
    bfloat16, integers and booleans, chunks, maps wider than one JAX block of 2**16 pixels, and the same errors.

    Runs on JAX or PyTorch (the test process's backend, or a child's); raises AssertionError on a difference.
    """
    import ml_dtypes  # NumPy's bfloat16 (a Keras dependency)

    backend = current_backend()
    assert backend in ("jax", "torch"), backend

    def device(x, y, **kwargs):
        return metrics._spearman_off_tensorflow(x, y, on_device=True, **kwargs)

    def on_host(x, y):
        return metrics._spearman_off_tensorflow(x, y, on_device=False)

    rng = np.random.default_rng(20)
    a, b = saliency_like_maps(rng, 6, 12), human_like_maps(rng, 6, 12)
    a[3] = 0.5  # constant: 0.0
    b[5] = 0.0
    expected = scipy_spearman(a, b)
    tensor = keras.ops.convert_to_tensor
    for x, y in ((a, b), (tensor(a), tensor(b[..., None])), (tensor(a[..., None]), b)):
        got = device(x, y)
        assert got.dtype == np.float64 and got.shape == (6,)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(got, on_host(a, b))  # the same exact sums: the same bits
    assert device(a, b)[3] == device(a, b)[5] == 0.0
    # Half precision is ranked as it is stored (float32 is exact for it); integers and booleans exactly.
    for dtype in (np.float16, ml_dtypes.bfloat16):
        half_a, half_b = a.astype(dtype), b.astype(dtype)
        reference = scipy_spearman(half_a.astype(np.float32), half_b.astype(np.float32))
        for x, y in ((half_a, half_b), (tensor(half_a.astype(np.float32), dtype.__name__), tensor(half_b))):
            np.testing.assert_allclose(device(x, y), reference, rtol=1e-12, atol=1e-12)
    ids, flags = np.round(a * 3).astype(np.int32), b > 0.3
    np.testing.assert_array_equal(device(tensor(ids), tensor(flags)), on_host(ids, flags))
    # Chunks of 2, 2, 2 maps equal one chunk; 2 maps of 260x260 span two JAX blocks of 2**16 pixels.
    whole = device(a, b)
    original = metrics.CHUNK_PIXELS
    metrics.CHUNK_PIXELS = 2 * 12 * 12
    try:
        np.testing.assert_array_equal(device(tensor(a), tensor(b)), whole)
    finally:
        metrics.CHUNK_PIXELS = original
    wide_a, wide_b = saliency_like_maps(rng, 2, 260), np.round(rng.uniform(0, 4, (2, 260, 260)))
    np.testing.assert_allclose(device(wide_a, wide_b), scipy_spearman(wide_a, wide_b), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(device(wide_a, wide_b), on_host(wide_a, wide_b))
    # The host path's errors, word for word, `a` checked before `b`.
    good = np.ones((2, 4, 4), np.float32)
    nan, inf = good.copy(), good.copy()
    nan[1, 2, 2], inf[0, 0, 0] = np.nan, np.inf
    bad_pairs = [(np.ones((4, 4)), good), (good, np.ones((2, 4, 4, 3))), (good, tensor(np.ones((2, 4, 4, 3)))),
                 (good, np.ones((2, 4, 5))), (good, nan), (tensor(nan), tensor(inf)), (tensor(good), inf),
                 (np.zeros((2, 0, 4)), np.zeros((2, 0, 4))), (np.array([[["x"]]]), good)]
    for x, y in bad_pairs:
        messages = []
        for run in (on_host, device):
            try:
                run(x, y)
            except ValueError as error:
                messages.append(str(error))
        assert len(messages) == 2 and messages[0] == messages[1], messages
    # The public function keeps maps that are not on an accelerator (NumPy, CPU tensors) on the host path.
    assert not any(_spearman_device.on_accelerator(x) for x in (a, tensor(a)))
    return True


CHECK_DEVICE_CHILD = r"""
import json, sys
sys.path.insert(0, "tests")
from test_backends_metrics import check_device_spearman
print(json.dumps(check_device_spearman()))
"""


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_spearman_device_path_equals_scipy_and_the_host_path(backend):
    """The JAX and PyTorch device path, checked on CPU (CI has no GPU; bench/gpu checks it on one)."""
    if current_backend() == backend:
        assert check_device_spearman()
    elif not installed(backend):
        pytest.skip(f"{backend} is not installed")  # CI's JAX environment has no PyTorch, and vice versa
    else:
        assert run_on_backend(backend, CHECK_DEVICE_CHILD) is True


# ----------------------------------------------------------------------------- across backends
def default_scores() -> dict[str, list[float]]:
    """The default metrics of fixed maps (continuous vs heavily tied), for the comparison across backends."""
    rng = np.random.default_rng(7)
    a = np.abs(rng.normal(size=(4, 10, 10))).astype(np.float32)
    b = np.round(rng.uniform(0, 3, (4, 10, 10))).astype(np.float32)
    return {name: np.asarray(keras.ops.convert_to_numpy(fn(a, b)), np.float64).tolist()
            for name, fn in metrics.DEFAULT_METRICS.items()}


CHILD = r"""
import json, sys
sys.path.insert(0, "tests")
from test_backends_metrics import default_scores
print(json.dumps(default_scores()))
"""


def test_every_backend_returns_the_same_scores():
    here = default_scores()
    for backend in other_backends():
        there = run_on_backend(backend, CHILD)
        for name in here:
            np.testing.assert_array_equal(there[name], here[name], err_msg=f"{name} on {backend}")


# ----------------------------------------------------------------------------- evaluate_alignment
def tiny_model() -> keras.Model:
    """A fixed conv net (weights from NumPy), preprocessing inside, 3 logits."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="tanh")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3)(x))
    rng = np.random.default_rng(3)
    model.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) for w in model.get_weights()])
    return model


def alignment_data(n: int = 7):
    rng = np.random.default_rng(11)
    images = rng.uniform(0, 255, (n, 8, 8, 3)).astype(np.float32)
    return images, human_like_maps(rng, n, 8), rng.integers(0, 3, n)


def test_evaluate_alignment_on_arrays_and_on_a_generator_equals_the_metrics():
    model = tiny_model()
    images, heatmaps, labels = alignment_data()
    tokens = np.array([1, 1, 0, 1, 1, 1, 1], np.float32)

    def batches():  # any iterable of batches: dicts and tuples, one with a token 0 example
        yield {"image": images[:4], "heatmap": heatmaps[:4, ..., None], "label": labels[:4], "token": tokens[:4]}
        yield images[4:], heatmaps[4:], labels[4:]

    result = evaluate_alignment(model, batches(), verbose=0)
    keep = tokens > 0
    saliency = keras.ops.convert_to_numpy(saliency_map(model, images[keep], labels[keep]))
    assert result["num_images"] == 6
    np.testing.assert_allclose(result["spearman"], scipy_spearman(saliency, heatmaps[keep]), atol=1e-6)
    expected_dice, expected_iou = published_dice_iou(saliency, heatmaps[keep], 10)
    np.testing.assert_allclose(result["dice"], expected_dice, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(result["iou"], expected_iou, rtol=1e-6, atol=1e-7)
    assert result["alignment_score"] == pytest.approx(result["spearman"].mean() / metrics.HUMAN_CEILING, rel=1e-6)
    predicted = np.argmax(keras.ops.convert_to_numpy(model(images[keep])), axis=-1)
    assert result["accuracy"] == pytest.approx(np.mean(predicted == labels[keep]))
    # One batch of NumPy arrays gives the same per-image scores.
    whole = evaluate_alignment(model, [(images[keep], heatmaps[keep], labels[keep])], verbose=0, percentile=10)
    for key in ("spearman", "dice", "iou"):
        np.testing.assert_allclose(whole[key], result[key], rtol=1e-5, atol=1e-6)


def test_evaluate_alignment_of_an_explainer_resizes_its_maps_and_refuses_bad_ones():
    images, heatmaps, labels = alignment_data(4)

    def coarse(x, y):  # half the size: resized (bilinear) to the human maps
        return np.asarray(x)[:, ::2, ::2, 0] + 0.0 * np.asarray(y)[:, None, None]

    result = evaluate_alignment(coarse, [(images, heatmaps, labels)], verbose=0)
    resized = keras.ops.convert_to_numpy(
        keras.ops.image.resize(images[:, ::2, ::2, :1], (8, 8), interpolation="bilinear"))[..., 0]
    np.testing.assert_allclose(result["spearman"], scipy_spearman(resized, heatmaps), atol=1e-6)
    perfect = evaluate_alignment(lambda x, y: heatmaps, [(images, heatmaps, labels)], verbose=0)
    np.testing.assert_allclose(perfect["spearman"], 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="returned 1 maps for batch 0"):
        evaluate_alignment(lambda x, y: heatmaps[:1], [(images, heatmaps, labels)], verbose=0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        evaluate_alignment(lambda x, y: heatmaps * np.nan, [(images, heatmaps, labels)], verbose=0)
    with pytest.raises(ValueError, match=r"`label` of batch 0 .*\[-1\]"):
        evaluate_alignment(coarse, [(images, heatmaps, np.array([0, -1, 1, 2]))], verbose=0)


TF_DATA_CHILD = r"""
import json, sys, numpy as np, tensorflow as tf
sys.path.insert(0, "tests")
from test_backends_metrics import alignment_data, tiny_model
from harmonization import evaluate_alignment
images, heatmaps, labels = alignment_data()
data = tf.data.Dataset.from_tensor_slices({"image": images, "heatmap": heatmaps, "label": labels}).batch(3)
result = evaluate_alignment(tiny_model(), data, verbose=0)
print(json.dumps({key: np.asarray(result[key], np.float64).tolist() for key in ("spearman", "dice", "iou")}))
"""

NO_TENSORFLOW_CHILD = r"""
import json, sys, numpy as np
sys.path.insert(0, "tests")
from test_backends_metrics import alignment_data, tiny_model
from harmonization import evaluate_alignment, metrics, saliency_methods
images, heatmaps, labels = alignment_data()
evaluate_alignment(tiny_model(), [(images, heatmaps, labels)], verbose=0, saliency="smoothgrad")
print(json.dumps("tensorflow" in sys.modules))
"""


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_a_tf_data_pipeline_is_scored_on_another_backend_where_tensorflow_is_installed(backend):
    if not installed("tensorflow"):
        pytest.skip("TensorFlow is not installed: no tf.data pipeline can exist")
    if not installed(backend):
        pytest.skip(f"{backend} is not installed")
    images, heatmaps, labels = alignment_data()
    there = run_on_backend(backend, TF_DATA_CHILD)
    expected = evaluate_alignment(tiny_model(), [(images, heatmaps, labels)], verbose=0)
    for key in there:
        np.testing.assert_allclose(there[key], expected[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_jax_and_torch_never_import_tensorflow_for_metrics_saliency_or_evaluation(backend):
    if not installed(backend):
        pytest.skip(f"{backend} is not installed")
    assert run_on_backend(backend, NO_TENSORFLOW_CHILD) is False
