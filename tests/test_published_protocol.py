"""Our ClickMe evaluation against the published one (serre-lab/Harmonization), rewritten from its formulas
(tests/published_reference.py).

`evaluate_clickme(model, preprocess_inputs=preprocess_input)` with xplique's `Saliency`:
`parse_clickme_prototype` (common/clickme_dataset.py) reads each record, `Saliency` takes
max_c |d logit_label / d preprocessed input|, `spearman_correlation`, `dice` and
`intersection_over_union` (evaluation/metrics.py) score each image, and the alignment score is the mean
Spearman / 0.65753. Everything runs offline on tiny generated shards in the published format.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import tfds_clickme  # noqa: F401  (registers "clickme")
from harmonization import data, evaluation
from clickme_helpers import build_clickme, write_shards
from published_reference import published_metrics, published_parse, published_preprocess_input, published_saliency

NUM_VALIDATION = 5  # odd: a batch size of 2 leaves a remainder
BATCH_SIZE = 2


# ------------------------------------------------------------------------------------------------
# Fixtures: published-format shards, the TFDS dataset built from them, a tiny network.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("published_shards"), {"val-0": NUM_VALIDATION}, seed=11, quality=85)


@pytest.fixture(scope="module")
def clickme_dir(tmp_path_factory, shard_dir):
    return build_clickme(tmp_path_factory.mktemp("published_tfds"), shard_dir)


@pytest.fixture(scope="module")
def published_examples(clickme_dir, shard_dir):
    """The published parse of every raw record, in the order of the TFDS split (matched by record id)."""
    raw = list(tf.data.TFRecordDataset(str(shard_dir / "val-0.tfrecords")))
    ids = tfds.load(
        "clickme", split="validation", data_dir=str(clickme_dir), download=False,
        decoders={"image": tfds.decode.SkipDecoding(), "heatmap": tfds.decode.SkipDecoding()},
    )
    order = [int(example["id"].numpy().decode().split("_")[-1]) for example in ids]
    assert sorted(order) == list(range(NUM_VALIDATION))
    parsed = [published_parse(raw[index]) for index in order]
    return [np.stack([p[k].numpy() for p in parsed]) for k in range(3)]


def network():
    """A tiny classifier of *preprocessed* images, as the published models (preprocessing outside)."""
    keras.utils.set_random_seed(5)
    return keras.Sequential(
        [
            keras.Input((224, 224, 3)),
            keras.layers.Conv2D(4, 5, strides=2, padding="same", activation="relu"),
            keras.layers.Conv2D(4, 3, padding="same", activation="tanh"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(1000),
        ]
    )


def published_saliency_explainer(model):
    """xplique `Saliency` on `preprocess_input(images)`: max over channels of |d logit_label / d input|."""

    def explain(images, labels):
        return published_saliency(model, published_preprocess_input(images), tf.one_hot(labels, 1000))

    return explain


# ------------------------------------------------------------------------------------------------
# Tests.
# ------------------------------------------------------------------------------------------------


def test_published_batching_drops_the_remainder_and_ours_keeps_every_image(shard_dir, clickme_dir):
    published = tf.data.TFRecordDataset(str(shard_dir / "val-0.tfrecords")).map(published_parse)
    published = published.batch(BATCH_SIZE, drop_remainder=True)  # as published
    assert sum(int(images.shape[0]) for images, _, _ in published) == NUM_VALIDATION - 1
    ours = data.load_clickme("validation", BATCH_SIZE, training=False, data_dir=clickme_dir, download=False)
    assert [int(batch["image"].shape[0]) for batch in ours] == [2, 2, 1]


def test_evaluation_pipeline_equals_the_published_parse(clickme_dir, published_examples):
    batches = list(data.load_clickme("validation", BATCH_SIZE, training=False, data_dir=clickme_dir, download=False))
    images, heatmaps, labels = (
        np.concatenate([b[key].numpy() for b in batches]) for key in ("image", "heatmap", "label")
    )
    want_images, want_heatmaps, want_labels = published_examples
    assert images.shape == want_images.shape == (NUM_VALIDATION, 224, 224, 3)
    assert heatmaps.shape == want_heatmaps.shape == (NUM_VALIDATION, 224, 224, 1)
    # Images in [0, 255], heatmaps in [0, ~255]: float32 noise only.
    np.testing.assert_allclose(images, want_images, rtol=0, atol=1e-4)
    np.testing.assert_allclose(heatmaps, want_heatmaps, rtol=0, atol=5e-4)
    np.testing.assert_array_equal(labels, np.argmax(want_labels, axis=-1))
    assert heatmaps.max() > 10  # real maps, not blank ones


def test_evaluate_alignment_equals_the_published_metrics(clickme_dir, published_examples):
    explain = published_saliency_explainer(network())
    dataset = data.load_clickme("validation", BATCH_SIZE, training=False, data_dir=clickme_dir, download=False)
    result = evaluation.evaluate_alignment(explain, dataset, verbose=0)

    # The published evaluation of the same images, heatmaps and saliency.
    images, heatmaps, labels = published_examples
    saliency = explain(images, np.argmax(labels, axis=-1))
    spearman, dice, iou = published_metrics(saliency, np.mean(heatmaps, axis=-1))
    assert result["num_images"] == NUM_VALIDATION
    np.testing.assert_allclose(result["spearman"], spearman, rtol=0, atol=1e-5)
    np.testing.assert_allclose(result["dice"], dice, rtol=0, atol=1e-6)
    np.testing.assert_allclose(result["iou"], iou, rtol=0, atol=1e-6)
    assert result["alignment_score"] == pytest.approx(np.mean(spearman) / 0.65753, abs=1e-5)
    assert np.ptp(spearman) > 0 and np.all(iou > 0)  # the scores really vary and overlap


def test_a_model_with_its_preprocessing_inside_scores_as_published(clickme_dir, published_examples):
    """The Keras-model path end to end: ImageNetNormalization inside, saliency taken at its output."""
    from harmonization.architectures import ImageNetNormalization

    bare = network()
    inputs = keras.Input((224, 224, 3))
    model = keras.Model(inputs, bare(ImageNetNormalization(name="preprocessing")(inputs)))
    dataset = data.load_clickme("validation", BATCH_SIZE, training=False, data_dir=clickme_dir, download=False)
    result = evaluation.evaluate_alignment(model, dataset, verbose=0)

    images, heatmaps, labels = published_examples
    saliency = published_saliency_explainer(bare)(images, np.argmax(labels, axis=-1))
    spearman, dice, iou = published_metrics(saliency, np.mean(heatmaps, axis=-1))
    np.testing.assert_allclose(result["spearman"], spearman, rtol=0, atol=1e-4)
    np.testing.assert_allclose(result["dice"], dice, rtol=0, atol=1e-6)
    np.testing.assert_allclose(result["iou"], iou, rtol=0, atol=1e-6)
    assert result["alignment_score"] == pytest.approx(np.mean(spearman) / 0.65753, abs=1e-4)
