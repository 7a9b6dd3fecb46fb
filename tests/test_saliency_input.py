"""Saliency in the published input space: a model with its preprocessing inside is differentiated at the
preprocessed input, so its step and maps equal the published method on the bare network fed
`preprocess_input(images)` (serre-lab/Harmonization `training/loss.py`, `evaluation/clickme.py`)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import harmonization
from harmonization import second_order
from harmonization.architectures import ViT, VGG
from harmonization.saliency_input import SoftmaxOutputError, resolve_saliency_input
from architecture_helpers import perturb_weights, random_images
from published_reference import (MEAN, STD, published_harmonizer_gradients, published_input_gradients,
                                 published_preprocess_input, published_saliency)

NUM_CLASSES = 5
TINY = {
    "vgg": (VGG, dict(image_size=32, block_convs=[1, 1, 1, 1, 1], block_filters=[4, 4, 4, 4, 4], fc_units=8)),
    "vit": (ViT, dict(image_size=16, patch_size=8, hidden_size=8, num_layers=1, num_heads=2, mlp_dim=16, dropout_rate=0.0)),
}


# ------------------------------------------------------------------ the published formulas (published_reference)
def published_preprocess_input_f32(images):
    """The published `preprocess_input` computed in float64, fed to the network as float32."""
    return published_preprocess_input(np.asarray(images, np.float64)).astype(np.float32)


def build_pair(key, seed=0):
    """The zoo architecture with its preprocessing inside, and the bare network with the same weights."""
    cls, config = TINY[key]
    keras.utils.set_random_seed(seed)
    full = perturb_weights(cls(**config, num_classes=NUM_CLASSES), seed=seed + 1)
    bare = cls(**config, num_classes=NUM_CLASSES, preprocess=False)
    for layer in bare.layers:
        if layer.weights:
            layer.set_weights(full.get_layer(layer.name).get_weights())
    return full, bare


def batch(size, n=4, seed=0):
    rng = np.random.default_rng(seed)
    images = random_images(size, n, seed)
    heatmaps = rng.uniform(0, 1, (n, size, size)).astype("float32") ** 4
    labels = rng.integers(0, NUM_CLASSES, n)
    return images, heatmaps, labels


def relative_difference(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# ------------------------------------------------------------------ the step
# The published weight decay, and one large enough that its gradient (added after the tape, to save memory:
# HarmonizedModel._add_weight_decay_gradients) is a visible part of the step.
@pytest.mark.parametrize("lambda_weights", [1e-5, 0.05])
@pytest.mark.parametrize("key", sorted(TINY))
def test_zoo_step_equals_the_published_step_on_the_bare_network(key, lambda_weights):
    full, bare = build_pair(key)
    images, heatmaps, labels = batch(full.input_shape[1])
    onehot = tf.one_hot(labels, NUM_CLASSES)
    with second_order.exact_moments():  # exact second order on both sides (tested in test_second_order)
        want = published_harmonizer_gradients(bare, published_preprocess_input_f32(images), heatmaps, onehot,
                                              lambda_weights=lambda_weights)

    hmodel = harmonization.HarmonizedModel(full, lambda_weights=lambda_weights)
    assert hmodel.saliency_input.layers == ("preprocessing",)
    assert "'preprocessing' (ImageNetNormalization)" in repr(hmodel.saliency_input)
    lr = 0.5
    hmodel.compile(optimizer=keras.optimizers.SGD(lr))
    before = {v.path: v.numpy() for v in full.trainable_variables}
    hmodel.train_on_batch({"image": images, "heatmap": heatmaps, "label": labels})
    got = {v.path: (before[v.path] - v.numpy()) / lr for v in full.trainable_variables}
    paths = [v.path for v in bare.trainable_variables]
    assert sorted(paths) == sorted(got)
    # Per variable, relative to its own scale; a variable whose gradient is zero by symmetry (the attention's
    # key bias) is measured against 1% of the largest gradient instead of against its rounding noise.
    floor = 1e-2 * max(float(np.max(np.abs(g))) for g in want)
    worst = max(
        float(np.max(np.abs(got[p] - g.numpy()))) / max(float(np.max(np.abs(g))), floor) for p, g in zip(paths, want)
    )
    assert worst < 2e-4, worst


def test_raw_input_gradients_would_differ_from_the_published_step():
    """The check above can fail: the same step taken at the raw [0, 255] input is far from the published one."""
    full, bare = build_pair("vgg")
    images, heatmaps, labels = batch(32)
    onehot = tf.one_hot(labels, NUM_CLASSES)
    want = published_harmonizer_gradients(bare, published_preprocess_input_f32(images), heatmaps, onehot)
    hmodel = harmonization.HarmonizedModel(full, saliency_input="input")
    assert "own input" in repr(hmodel.saliency_input)
    hmodel.compile(optimizer=keras.optimizers.SGD(1.0))
    before = [v.numpy() for v in full.trainable_variables]
    hmodel.train_on_batch({"image": images, "heatmap": heatmaps, "label": labels})
    got = [b - v.numpy() for b, v in zip(before, full.trainable_variables)]
    assert max(relative_difference(g, w) for g, w in zip(got, want)) > 1e-2


# ------------------------------------------------------------------ the evaluation maps
@pytest.mark.parametrize("key", sorted(TINY))
def test_evaluation_maps_equal_the_published_saliency_on_the_bare_network(key):
    full, bare = build_pair(key)
    images, heatmaps, labels = batch(full.input_shape[1])
    x, onehot = published_preprocess_input_f32(images), tf.one_hot(labels, NUM_CLASSES)
    gradient = published_input_gradients(bare, x, onehot)
    want = published_saliency(bare, x, onehot)  # xplique Saliency
    got = harmonization.saliency_map(full, images, labels).numpy()
    assert relative_difference(got, want) < 1e-5
    training_map = harmonization.input_gradients(full, images, labels).numpy()
    assert relative_difference(training_map, tf.reduce_mean(gradient, -1)) < 1e-5
    scores = harmonization.evaluate_alignment(full, [(images, heatmaps, labels)], verbose=0)
    published = harmonization.evaluate_alignment(
        lambda i, l: want, [(images, heatmaps, labels)], verbose=0
    )
    np.testing.assert_allclose(scores["spearman"], published["spearman"], atol=1e-6)
    raw = harmonization.saliency_map(full, images, labels, saliency_input="input").numpy()
    assert relative_difference(raw, want) > 1e-2  # the raw-pixel map is a different map


def test_the_preprocessing_function_option_is_the_published_preprocess_inputs():
    full, bare = build_pair("vgg")
    images, heatmaps, labels = batch(32)

    def preprocess(x):
        return (x / 255.0 - MEAN.astype("float32")) / STD.astype("float32")

    want = harmonization.saliency_map(full, images, labels).numpy()
    got = harmonization.saliency_map(bare, images, labels, preprocessing=preprocess).numpy()
    assert relative_difference(got, want) < 1e-5
    hmodel = harmonization.HarmonizedModel(bare, preprocessing=preprocess)
    assert "`preprocessing` (preprocess)" in repr(hmodel.saliency_input)
    np.testing.assert_allclose(hmodel(images).numpy(), full(images).numpy(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ users' own classifiers
def cnn_tail(x):
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.layers.Dense(NUM_CLASSES, name="logits")(x)


def test_a_users_rescaling_layer_is_recognised_and_keeps_the_harmonization_signal():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    with_scaling = keras.Model(inputs, cnn_tail(keras.layers.Rescaling(1 / 255.0, name="scale")(inputs)))
    bare_inputs = keras.Input((16, 16, 3))
    bare = keras.Model(bare_inputs, cnn_tail(bare_inputs))
    for name in ("conv", "logits"):
        bare.get_layer(name).set_weights(with_scaling.get_layer(name).get_weights())
    images, heatmaps, labels = batch(16, n=8)
    data = {"image": images, "heatmap": heatmaps, "label": labels}

    def harmonization_term(model, data):
        hmodel = harmonization.HarmonizedModel(model)
        hmodel.compile()
        return hmodel.test_on_batch(data, return_dict=True)["harmonization"], hmodel

    term, hmodel = harmonization_term(with_scaling, data)
    assert hmodel.saliency_input.layers == ("scale",)
    reference, _ = harmonization_term(bare, {**data, "image": images / 255.0})
    assert term == pytest.approx(reference, rel=1e-4)
    assert term > 0.05  # a real signal, not the ~0.003 of the raw-pixel gradient


def test_sequential_models_and_chains_of_preprocessing_layers():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="scale"),
            keras.layers.Normalization(mean=[0.1, 0.2, 0.3], variance=[1.0, 2.0, 3.0], name="norm"),
            keras.layers.Conv2D(4, 3, name="conv"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(NUM_CLASSES),
        ]
    )
    images, heatmaps, labels = batch(16)
    maps = harmonization.saliency_map(model, images, labels)  # builds the unbuilt Sequential first
    assert maps.shape == (4, 16, 16)
    assert resolve_saliency_input(model).layers == ("scale", "norm")
    x = tf.constant(model.get_layer("norm")(model.get_layer("scale")(images)))
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = x
        for layer in model.layers[2:]:
            out = layer(out)
        score = tf.reduce_sum(out * tf.one_hot(labels, NUM_CLASSES), -1)
    want = tf.reduce_max(tf.abs(tape.gradient(score, x)), -1)
    assert relative_difference(maps, want) < 1e-5


def test_a_zoo_backbone_nested_in_a_users_model():
    full, _ = build_pair("vgg")
    features = keras.Model(full.input, full.get_layer("predictions").input, name="backbone")
    model = keras.Sequential([keras.Input((32, 32, 3)), features, keras.layers.Dense(3, name="head")])
    view = resolve_saliency_input(model)
    assert view.layers == ("preprocessing",) and "'backbone'" in view.description
    images, _, labels = batch(32)
    labels = labels % 3
    np.testing.assert_allclose(view.network(view.split(images)).numpy(), model(images).numpy(), rtol=1e-5, atol=1e-6)


def test_a_named_layer_and_the_raw_input_can_be_chosen():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(3, 1, name="learned_colour")(inputs)
    model = keras.Model(inputs, cnn_tail(x))
    assert "no preprocessing layer" in resolve_saliency_input(model).description
    view = resolve_saliency_input(model, saliency_input="learned_colour")
    assert view.layers == ("learned_colour",)
    with pytest.raises(ValueError, match="'nope' is not a top-level layer.*learned_colour"):
        resolve_saliency_input(model, saliency_input="nope")


def test_a_subclassed_model_says_what_it_differentiates():
    class Classifier(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(NUM_CLASSES)

        def call(self, x):
            return self.dense(tf.reduce_mean(x, axis=(1, 2)))

    model = Classifier()
    images, _, labels = batch(8)
    assert harmonization.saliency_map(model, images, labels).shape == (4, 8, 8)
    assert "subclassed" in resolve_saliency_input(model).description
    with pytest.raises(ValueError, match="subclassed.*preprocessing="):
        resolve_saliency_input(model, saliency_input="dense")


# ------------------------------------------------------------------ outputs
def softmax_models():
    inputs = keras.Input((8, 8, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    yield keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(pooled))
    yield keras.Model(inputs, keras.layers.Softmax()(keras.layers.Dense(3)(pooled)))
    yield keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(3), keras.layers.Activation("softmax")])
    inner = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(pooled))
    yield keras.Sequential([keras.Input((8, 8, 3)), inner])


@pytest.mark.parametrize("index", range(4))
def test_a_classifier_ending_in_softmax_is_refused_with_the_way_out(index):
    model = list(softmax_models())[index]
    images, heatmaps, labels = batch(8)
    labels = labels % 3
    with pytest.raises(SoftmaxOutputError, match="ends in a softmax.*allow_softmax=True"):
        harmonization.HarmonizedModel(model)
    with pytest.raises(SoftmaxOutputError, match="ends in a softmax"):
        harmonization.evaluate_alignment(model, [(images, heatmaps, labels)], verbose=0)
    hmodel = harmonization.HarmonizedModel(model, allow_softmax=True)  # for those who mean it
    hmodel.compile()
    hmodel.train_on_batch({"image": images, "heatmap": heatmaps, "label": labels})


def test_a_model_with_several_outputs_needs_to_be_told_which_holds_the_logits():
    inputs = keras.Input((8, 8, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    model = keras.Model(inputs, [keras.layers.Dense(2, name="aux")(pooled), keras.layers.Dense(3, name="logits")(pooled)])
    images, heatmaps, labels = batch(8)
    labels = labels % 3
    with pytest.raises(ValueError, match="2 outputs.*output="):
        harmonization.HarmonizedModel(model)
    for output in (1, "logits"):
        hmodel = harmonization.HarmonizedModel(model, output=output)
        assert hmodel(images).shape == (4, 3)
        hmodel.compile()
        hmodel.train_on_batch({"image": images, "heatmap": heatmaps, "label": labels})
    with pytest.raises(ValueError, match="'nope' is not an output.*aux"):
        harmonization.HarmonizedModel(model, output="nope")


def test_options_survive_get_config_and_saving(tmp_path):
    full, _ = build_pair("vgg")
    hmodel = harmonization.HarmonizedModel(full, saliency_input="preprocessing")
    config = hmodel.get_config()
    assert config["saliency_input"] == "preprocessing" and config["allow_softmax"] is False
    hmodel.compile()
    path = tmp_path / "h.keras"
    hmodel.save(path)
    restored = keras.saving.load_model(path)
    assert restored.saliency_input.layers == ("preprocessing",)


def test_the_chosen_output_is_kept_behind_a_nested_zoo_backbone():
    full, _ = build_pair("vgg")
    features = keras.Model(full.input, full.get_layer("predictions").input, name="backbone")
    inputs = keras.Input((32, 32, 3))
    pooled = features(inputs)
    model = keras.Model(inputs, [keras.layers.Dense(2, name="aux")(pooled), keras.layers.Dense(3, name="head")(pooled)])
    view = resolve_saliency_input(model, output="head")
    assert view.layers == ("preprocessing",)
    images, _, _ = batch(32)
    np.testing.assert_allclose(view.network(view.split(images)).numpy(), model(images)[1].numpy(), rtol=1e-5, atol=1e-6)
