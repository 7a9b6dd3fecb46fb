"""The point of it all: harmonized training makes a model look where the human maps point.

Generated data: the class is decided only by a striped patch (horizontal vs vertical stripes) at a
random place on a noisy background; the human map marks that patch. Two identical models, same seed,
same steps: one with cross-entropy alone, one with HarmonizedModel.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import harmonization

SIZE, PATCH = 24, 8


def make_data(n, seed):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (n, SIZE, SIZE, 3)).astype("float32")
    heatmaps = np.zeros((n, SIZE, SIZE, 1), "float32")
    labels = rng.integers(0, 2, n).astype("int32")
    stripes = (np.arange(PATCH) % 2 * 255.0)[:, None] * np.ones((1, PATCH))
    for i in range(n):
        y, x = rng.integers(0, SIZE - PATCH, 2)
        patch = stripes if labels[i] == 0 else stripes.T
        images[i, y : y + PATCH, x : x + PATCH, :] = patch[..., None]
        heatmaps[i, y : y + PATCH, x : x + PATCH, 0] = 1.0
    heatmaps = tf.nn.avg_pool2d(heatmaps, 3, 1, "SAME").numpy()  # soft edges, like ClickMe's blur
    return {"image": images, "heatmap": heatmaps, "label": labels}


def make_model():
    keras.utils.set_random_seed(42)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(2)(x))


@pytest.mark.slow
def test_harmonized_training_aligns_better_than_cross_entropy_alone():
    train = tf.data.Dataset.from_tensor_slices(make_data(512, seed=0)).batch(32)
    test = tf.data.Dataset.from_tensor_slices(make_data(128, seed=1)).batch(64)

    baseline = make_model()
    baseline.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
    )
    baseline.fit(train.map(lambda b: (b["image"], tf.one_hot(b["label"], 2))), epochs=6, verbose=0)

    model = make_model()
    hmodel = harmonization.HarmonizedModel(model)
    hmodel.compile(optimizer=keras.optimizers.Adam(2e-3))
    hmodel.fit(train, epochs=6, verbose=0)

    # The harmonization term on held-out data: lower than for the model trained without it.
    judge = harmonization.HarmonizedModel(baseline)
    judge.compile()
    base_term = judge.evaluate(test, return_dict=True, verbose=0)["harmonization"]
    harm_term = hmodel.evaluate(test, return_dict=True, verbose=0)["harmonization"]
    assert harm_term < 0.85 * base_term

    base_scores = harmonization.evaluate_alignment(baseline, test, verbose=0)
    harm_scores = harmonization.evaluate_alignment(model, test, verbose=0)
    assert harm_scores["alignment_score"] > base_scores["alignment_score"] + 0.1
    assert harm_scores["accuracy"] >= 0.9  # it still solves the task
