"""`evaluate_alignment` on a tiny Keras model and on a NumPy explainer, against SciPy/NumPy references."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from harmonization import evaluation
from harmonization.saliency import saliency_map

SIZE = 16
NUM_CLASSES = 3
RNG = np.random.default_rng(7)


@pytest.fixture(autouse=True)
def _same_data_whatever_runs_first():
    """Each test draws from a freshly seeded RNG, so its data do not depend on the tests before it."""
    global RNG
    RNG = np.random.default_rng(7)


def human_maps(n, size=SIZE):
    rows, cols = np.mgrid[:size, :size]
    centres = RNG.uniform(0.25, 0.75, (n, 2)) * size
    blobs = np.exp(-((rows - centres[:, :1, None]) ** 2 + (cols - centres[:, 1:, None]) ** 2) / 8.0)
    return np.where(blobs > 0.1, blobs, 0.0).astype(np.float32)  # mostly zeros, like ClickMe


def make_data(n=10):
    images = RNG.uniform(0, 1, (n, SIZE, SIZE, 3)).astype(np.float32)
    heatmaps = human_maps(n)
    labels = RNG.integers(0, NUM_CLASSES, n).astype(np.int64)
    tokens = np.array([1, 0, 1, 1, 0, 1, 1, 1, 0, 1][:n], np.int64)
    return images, heatmaps, labels, tokens


def tiny_model():
    keras.utils.set_random_seed(3)
    return keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 3)),
            keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(4, 3, padding="same", activation="tanh"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(NUM_CLASSES),
        ]
    )


def reference_scores(saliency, heatmaps, percentile=10):
    spearman = [stats.spearmanr(s.ravel(), h.ravel())[0] for s, h in zip(saliency, heatmaps)]
    dice, iou = [], []
    for s, h in zip(saliency, heatmaps):
        a, b = s > np.percentile(s, 100 - percentile), h > np.percentile(h, 100 - percentile)
        inter = np.sum(a & b)
        dice.append(2 * inter / (a.sum() + b.sum()))
        iou.append(inter / np.sum(a | b))
    return np.array(spearman), np.array(dice), np.array(iou)


def numpy_explainer(images, labels):
    """A saliency 'model' in plain NumPy: brightness of the red channel, at half resolution."""
    assert isinstance(images, np.ndarray) and isinstance(labels, np.ndarray)
    red = images[..., 0]
    return red.reshape(len(red), SIZE // 2, 2, SIZE // 2, 2).mean(axis=(2, 4))[..., None]


def numpy_bilinear_resize(maps, size):
    """Bilinear upsampling with half-pixel centres (TensorFlow's and PIL's convention)."""

    def axis_weights(n_in, n_out):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        low = np.floor(src).astype(int)
        high = np.minimum(low + 1, n_in - 1)
        weights = np.zeros((n_out, n_in))
        np.add.at(weights, (np.arange(n_out), low), 1 - (src - low))
        np.add.at(weights, (np.arange(n_out), high), src - low)
        return weights

    rows, cols = axis_weights(maps.shape[1], size[0]), axis_weights(maps.shape[2], size[1])
    return np.einsum("ih,nhw,jw->nij", rows, maps.astype(np.float64), cols)


def test_keras_model_scores_match_references_and_skip_token_zero():
    model = tiny_model()
    images, heatmaps, labels, tokens = make_data()
    dataset = tf.data.Dataset.from_tensor_slices(
        {"image": images, "heatmap": heatmaps[..., None], "label": labels, "token": tokens}
    ).batch(4)

    result = evaluation.evaluate_alignment(model, dataset, verbose=0)

    kept = tokens > 0
    saliency = saliency_map(model, images[kept], labels[kept]).numpy()
    spearman, dice, iou = reference_scores(saliency, heatmaps[kept])
    assert result["num_images"] == kept.sum() == 7
    np.testing.assert_allclose(result["spearman"], spearman, atol=1e-5)
    np.testing.assert_allclose(result["dice"], dice, atol=1e-6)
    np.testing.assert_allclose(result["iou"], iou, atol=1e-6)
    assert result["spearman_mean"] == pytest.approx(spearman.mean(), abs=1e-5)
    assert result["dice_mean"] == pytest.approx(dice.mean(), abs=1e-6)
    assert result["iou_mean"] == pytest.approx(iou.mean(), abs=1e-6)
    assert result["alignment_score"] == pytest.approx(spearman.mean() / 0.65753, abs=1e-5)
    predicted = np.argmax(model.predict(images[kept], verbose=0), axis=-1)
    assert result["accuracy"] == pytest.approx(np.mean(predicted == labels[kept]))
    assert np.ptp(result["spearman"]) > 0  # the maps really differ from image to image


def test_one_hot_labels_and_max_batches():
    model = tiny_model()
    images, heatmaps, labels, _ = make_data()
    batches = [
        (images[i : i + 3], heatmaps[i : i + 3], np.eye(NUM_CLASSES)[labels[i : i + 3]])
        for i in range(0, 9, 3)
    ]
    result = evaluation.evaluate_alignment(model, batches, max_batches=2, verbose=0)
    assert result["num_images"] == 6  # no token: every example of the first two batches counts
    predicted = np.argmax(model.predict(images[:6], verbose=0), axis=-1)
    assert result["accuracy"] == pytest.approx(np.mean(predicted == labels[:6]))
    saliency = saliency_map(model, images[:6], labels[:6]).numpy()
    np.testing.assert_allclose(result["spearman"], reference_scores(saliency, heatmaps[:6])[0], atol=1e-5)


def test_numpy_explainer_is_resized_to_the_heatmaps_and_scored():
    images, heatmaps, labels, tokens = make_data()

    def batches():  # a generator of tuples, not a tf.data.Dataset
        for i in range(0, 10, 5):
            yield images[i : i + 5], heatmaps[i : i + 5], labels[i : i + 5], tokens[i : i + 5]

    result = evaluation.evaluate_alignment(numpy_explainer, batches(), percentile=20, verbose=0)

    kept = tokens > 0
    upsampled = numpy_bilinear_resize(numpy_explainer(images[kept], labels[kept])[..., 0], (SIZE, SIZE))
    spearman, dice, iou = reference_scores(upsampled.astype(np.float32), heatmaps[kept], percentile=20)
    np.testing.assert_allclose(result["spearman"], spearman, atol=1e-5)
    np.testing.assert_allclose(result["dice"], dice, atol=1e-6)
    np.testing.assert_allclose(result["iou"], iou, atol=1e-6)
    assert result["num_images"] == 7
    assert "accuracy" not in result  # a bare explainer has no logits
    assert result["alignment_score"] == pytest.approx(np.mean(spearman) / 0.65753, abs=1e-5)


def test_an_explainer_returning_the_human_maps_scores_perfectly():
    _, heatmaps, labels, _ = make_data(6)
    heatmaps = heatmaps.astype(np.float16).astype(np.float32)  # exact in float16, too
    images = np.repeat(heatmaps[..., None], 3, axis=-1)  # the human map, in every channel
    data = tf.data.Dataset.from_tensor_slices((images, heatmaps, labels)).batch(4)
    explainers = [
        lambda x, y: tf.convert_to_tensor(x[..., 0]),  # a TensorFlow tensor (N, H, W)
        lambda x, y: x[..., :1].astype(np.float16),  # NumPy float16 (N, H, W, 1)
    ]
    for explainer in explainers:
        result = evaluation.evaluate_alignment(explainer, data, verbose=0)
        np.testing.assert_allclose(result["spearman"], np.ones(6), atol=1e-6)
        np.testing.assert_allclose(result["dice"], np.ones(6), atol=1e-6)
        np.testing.assert_allclose(result["iou"], np.ones(6), atol=1e-6)
        assert result["alignment_score"] == pytest.approx(1 / 0.65753, abs=1e-5)


def test_a_batch_without_scored_examples_is_skipped():
    images, heatmaps, labels, _ = make_data(4)
    dataset = [
        {"image": images[:2], "heatmap": heatmaps[:2], "label": labels[:2], "token": np.zeros(2)},
        {"image": images[2:], "heatmap": heatmaps[2:], "label": labels[2:], "token": np.array([0, 1])},
    ]
    result = evaluation.evaluate_alignment(numpy_explainer, dataset, verbose=0)
    assert result["num_images"] == 1
    upsampled = numpy_bilinear_resize(numpy_explainer(images[3:], labels[3:])[..., 0], (SIZE, SIZE))
    np.testing.assert_allclose(
        result["spearman"], reference_scores(upsampled, heatmaps[3:])[0], atol=1e-5
    )


def test_progress_bar_is_shown_unless_verbose_is_zero(capsys):
    images, heatmaps, labels, _ = make_data(4)
    dataset = tf.data.Dataset.from_tensor_slices((images, heatmaps, labels)).batch(2)
    evaluation.evaluate_alignment(numpy_explainer, dataset, verbose=0)
    assert capsys.readouterr().out == ""
    evaluation.evaluate_alignment(numpy_explainer, dataset, verbose=1)
    out = capsys.readouterr().out
    assert "2/2" in out and "spearman" in out


# ----------------------------------------------------------------------------- errors
def test_empty_datasets_raise():
    images, heatmaps, labels, _ = make_data(2)
    with pytest.raises(ValueError, match="yielded no batches"):
        evaluation.evaluate_alignment(numpy_explainer, [], verbose=0)
    empty = tf.data.Dataset.from_tensor_slices((images, heatmaps, labels)).batch(2).take(0)
    with pytest.raises(ValueError, match="yielded no batches"):
        evaluation.evaluate_alignment(numpy_explainer, empty, verbose=0)
    unscored = [(images, heatmaps, labels, np.zeros(2))]
    with pytest.raises(ValueError, match="token > 0"):
        evaluation.evaluate_alignment(numpy_explainer, unscored, verbose=0)


def test_malformed_batches_raise():
    images, heatmaps, labels, _ = make_data(2)
    run = lambda data: evaluation.evaluate_alignment(numpy_explainer, data, verbose=0)  # noqa: E731
    with pytest.raises(ValueError, match=r"lacks the key\(s\) \['heatmap'\]"):
        run([{"image": images, "label": labels}])
    with pytest.raises(ValueError, match="tuple of 2 elements"):
        run([(images, labels)])
    with pytest.raises(ValueError, match=r"Batch 0 of `dataset` is a ndarray"):
        run([images])
    with pytest.raises(ValueError, match=r"\(N, H, W, C\).*dataset.batch"):
        run(tf.data.Dataset.from_tensor_slices((images, heatmaps, labels)))  # not batched
    with pytest.raises(ValueError, match="different batch sizes"):
        run([(images, heatmaps[:1], labels)])
    with pytest.raises(ValueError, match="`heatmap` of batch 0"):
        run([(images, np.ones((2, SIZE, SIZE, 3)), labels)])
    with pytest.raises(ValueError, match="`heatmap` of batch 0 contains NaN"):
        run([(images, np.where(heatmaps > 0, np.nan, 0.0), labels)])


def test_bad_explainer_output_raises():
    images, heatmaps, labels, _ = make_data(2)
    data = [(images, heatmaps, labels)]
    with pytest.raises(ValueError, match="returned 1 maps for batch 0"):
        evaluation.evaluate_alignment(lambda x, y: x[:1, ..., 0], data, verbose=0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        evaluation.evaluate_alignment(lambda x, y: np.full(x.shape[:3], np.nan), data, verbose=0)
    with pytest.raises(ValueError, match="model_or_explainer output"):
        evaluation.evaluate_alignment(lambda x, y: x, data, verbose=0)  # 3 channels
    with pytest.raises(TypeError, match="`model_or_explainer` must be"):
        evaluation.evaluate_alignment("resnet50", data, verbose=0)


def test_bad_arguments_raise():
    images, heatmaps, labels, _ = make_data(2)
    data = [(images, heatmaps, labels)]
    with pytest.raises(ValueError, match="`percentile`"):
        evaluation.evaluate_alignment(numpy_explainer, data, percentile=0, verbose=0)
    with pytest.raises(ValueError, match="`ceiling`"):
        evaluation.evaluate_alignment(numpy_explainer, data, ceiling=-1, verbose=0)
    with pytest.raises(ValueError, match="`max_batches`"):
        evaluation.evaluate_alignment(numpy_explainer, data, max_batches=0, verbose=0)
    with pytest.raises(ValueError, match="`verbose`"):
        evaluation.evaluate_alignment(numpy_explainer, data, verbose=3)
    endless = tf.data.Dataset.from_tensor_slices((images, heatmaps, labels)).batch(2).repeat()
    with pytest.raises(ValueError, match="infinite.*max_batches"):
        evaluation.evaluate_alignment(numpy_explainer, endless, verbose=0)
    assert evaluation.evaluate_alignment(numpy_explainer, endless, max_batches=3, verbose=0)[
        "num_images"
    ] == 6


# ----------------------------------------------------------------------------- labels and tokens (issue 10, §2)
@pytest.mark.parametrize(
    "bad, match",
    [
        (999, r"`label` of batch 1 must hold class ids in \[0, 3\).*out-of-range value\(s\) \[999\].*"
              r"index \[1\].*The model has 3 logits"),
        (-1, r"`label` of batch 1 must hold class ids in \[0, num_classes\).*\[-1\]"),
    ],
)
def test_a_keras_model_refuses_labels_outside_its_classes_instead_of_scoring_zero(bad, match):
    # tf.one_hot makes an all-zero row of such an id: a blank saliency map, a Spearman of 0, silently.
    images, heatmaps, labels, _ = make_data(4)
    labels[3] = bad
    batches = [(images[:2], heatmaps[:2], labels[:2]), (images[2:], heatmaps[2:], labels[2:])]
    with pytest.raises(ValueError, match=match):
        evaluation.evaluate_alignment(tiny_model(), batches, verbose=0)


def test_labels_are_checked_for_explainers_too():
    images, heatmaps, labels, _ = make_data(2)

    def run(labels):
        return evaluation.evaluate_alignment(numpy_explainer, [(images, heatmaps, labels)], verbose=0)

    with pytest.raises(ValueError, match=r"`label` of batch 0 .*\[-1\].*index \[0\]"):
        run(np.array([-1, 2]))
    with pytest.raises(ValueError, match=r"`label` of batch 0 .*not whole numbers \(float labels are not rounded\)"):
        run(np.array([1.5, 2.0]))
    with pytest.raises(ValueError, match=r"`label` of batch 0 .*one-hot/soft rows must be finite, >= 0 and not all"):
        run(np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))


def test_whole_number_float_labels_score_as_integer_ids():
    model = tiny_model()
    images, heatmaps, labels, _ = make_data(4)
    ids = evaluation.evaluate_alignment(model, [(images, heatmaps, labels)], verbose=0)
    floats = evaluation.evaluate_alignment(model, [(images, heatmaps, labels.astype(np.float32))], verbose=0)
    np.testing.assert_array_equal(floats["spearman"], ids["spearman"])
    assert floats["accuracy"] == ids["accuracy"]


@pytest.mark.parametrize("bad", [-1.0, 2.0, np.nan])
def test_tokens_outside_zero_one_are_refused(bad):
    # A token of -1 or NaN used to drop the example silently (token > 0 is scored), 2 to score it.
    images, heatmaps, labels, _ = make_data(3)
    tokens = np.array([1.0, bad, 0.0])
    with pytest.raises(ValueError, match=r"`token` of batch 0 must be finite and in \[0, 1\].*index \[1\]"):
        evaluation.evaluate_alignment(numpy_explainer, [(images, heatmaps, labels, tokens)], verbose=0)


def test_two_tokens_per_example_name_both_shapes():
    images, heatmaps, labels, _ = make_data(3)
    with pytest.raises(ValueError, match=r"`token` of batch 0 must have shape \(N,\) or \(N, 1\).*got \(3, 2\)"):
        evaluation.evaluate_alignment(numpy_explainer, [(images, heatmaps, labels, np.ones((3, 2)))], verbose=0)
