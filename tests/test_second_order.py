"""Exact second-order gradients of the harmonized step, against central finite differences in float64."""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import harmonization
from harmonization import second_order
from harmonization.harmonized_model import HarmonizedModel

RNG = np.random.default_rng(7)


@pytest.fixture
def float64():
    """Layers built in float64 (the global dtype policy wins over floatx once it has been set)."""
    previous_floatx, previous_policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx(previous_floatx)
    keras.config.set_dtype_policy(previous_policy)


def every_layer_type_model(num_classes=3):
    """Conv, BatchNorm (train), GELU, depthwise Conv, LayerNorm, MaxPool, Dense, attention."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Activation("gelu")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)
    x = keras.layers.LayerNormalization()(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Reshape((16, 4))(x)
    x = keras.layers.Dense(8)(x)
    x = x + keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)(x, x)
    x = keras.layers.LayerNormalization()(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs)


def batch(n=4, size=8, blank_heatmaps=False):
    heatmaps = np.zeros((n, size, size, 1)) if blank_heatmaps else RNG.uniform(size=(n, size, size, 1))
    return {
        "image": tf.constant(RNG.normal(size=(n, size, size, 3))),
        "heatmap": tf.constant(heatmaps),
        "label": tf.constant(RNG.integers(0, 3, n)),
    }


def directional_check(objective, variables, h=1e-6, directions=3, max_tries=12):
    """Max relative error between <grad, v> and a finite difference of `objective` along v.

    The finite difference is central and Richardson-extrapolated (steps h and h/2), so its own
    error is O(h^4): what remains is the error of the analytic gradient. Saliency maps jump where
    a max-pool switches its argmax or a ReLU its sign; a direction along which the two central
    differences disagree straddles such a jump, where no derivative exists, and is drawn again.
    """
    with tf.GradientTape() as tape:
        value = objective()
    grads = [0.0 if g is None else g for g in tape.gradient(value, variables)]
    originals = [v.numpy() for v in variables]

    def along(direction, t):
        for v, o, d in zip(variables, originals, direction):
            v.assign(o + t * d)
        result = float(objective())
        for v, o in zip(variables, originals):
            v.assign(o)
        return result

    errors = []
    for _ in range(max_tries):
        direction = [RNG.normal(size=v.shape) for v in variables]
        analytic = sum(float(tf.reduce_sum(g * d)) for g, d in zip(grads, direction))
        coarse, fine = [(along(direction, step) - along(direction, -step)) / (2 * step) for step in (h, h / 2)]
        if abs(coarse - fine) > 1e-5 * abs(fine):
            continue  # not differentiable along this direction within the step
        fd = (4 * fine - coarse) / 3
        errors.append(abs(analytic - fd) / abs(fd))
        if len(errors) == directions:
            return max(errors)
    raise AssertionError(f"only {len(errors)} of {max_tries} directions were smooth enough to check")


def saliency_objective(hmodel, data, weights):
    """A smooth function of the training saliency map, differentiated w.r.t. the weights."""

    def objective():
        _, _, _, grads, _, _ = hmodel._forward(data, training=True)
        saliency = tf.reduce_mean(grads, axis=-1)
        return tf.reduce_sum(saliency * weights) + 0.5 * tf.reduce_sum(tf.square(saliency))

    return objective


def test_saliency_gradient_is_exact_through_every_layer_type(float64):
    model = every_layer_type_model()
    hmodel = HarmonizedModel(model)
    data = batch()
    weights = tf.constant(RNG.normal(size=(4, 8, 8)))
    err = directional_check(saliency_objective(hmodel, data, weights), model.trainable_variables)
    assert err <= 1e-6


def test_without_the_fix_keras_normalisation_is_wrong_to_second_order(float64):
    """The check above can fail: plain Keras-TF LayerNorm/BatchNorm give a wrong Hessian."""
    model = every_layer_type_model()
    hmodel = HarmonizedModel(model, exact_second_order=False)
    data = batch()
    weights = tf.constant(RNG.normal(size=(4, 8, 8)))
    err = directional_check(saliency_objective(hmodel, data, weights), model.trainable_variables)
    assert err > 1e-3


def test_full_training_loss_gradient_matches_finite_differences(float64):
    """The total loss of the training step (CE + harmonization + weight decay) end to end.

    With blank human maps the rescaled human map is 0, so the stop-gradient on the saliency peak
    does not enter and the finite difference of the loss is its true gradient.
    """
    model = every_layer_type_model()
    hmodel = HarmonizedModel(model, lambda_weights=1e-2)
    hmodel.compile(optimizer="sgd")
    data = batch(blank_heatmaps=True)

    def objective():
        terms = hmodel._forward(data, training=True)
        total, _, harmonization_term = hmodel._loss_terms(*terms, training=True)
        assert float(harmonization_term) > 0
        return total

    err = directional_check(objective, model.trainable_variables)
    assert err <= 1e-6


def test_exact_layers_are_exact_outside_the_harmonized_step(float64):
    keras.utils.set_random_seed(5)
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(3, 3, padding="same")(inputs)
    x = harmonization.layers.BatchNormalization()(x)
    x = harmonization.layers.LayerNormalization()(x)
    x = harmonization.layers.GroupNormalization(groups=3)(x)
    outputs = keras.layers.Dense(2)(keras.layers.Flatten()(x))
    model = keras.Model(inputs, outputs)
    images = tf.constant(RNG.normal(size=(3, 6, 6, 2)))
    labels = tf.constant([0, 1, 1])
    weights = tf.constant(RNG.normal(size=(3, 6, 6)))

    def objective():
        s = harmonization.input_gradients(model, images, labels, training=True)
        return tf.reduce_sum(s * weights) + 0.5 * tf.reduce_sum(tf.square(s))

    assert not second_order.is_active()
    assert directional_check(objective, model.trainable_variables) <= 1e-6


def test_the_patch_does_not_leak_and_nests():
    module = second_order._target_module()
    original = module._compute_moments
    with second_order.exact_moments():
        with second_order.exact_moments():
            assert module._compute_moments is second_order._exact_compute_moments
        assert second_order.is_active()
    assert module._compute_moments is original
    assert not second_order.is_active()
    with contextlib.suppress(RuntimeError), second_order.exact_moments():
        raise RuntimeError("boom")
    assert module._compute_moments is original


def test_a_keras_without_the_patched_function_is_refused(monkeypatch):
    module = second_order._target_module()
    monkeypatch.delattr(module, "_compute_moments")
    with pytest.raises(second_order.SecondOrderError, match="changed how it computes moments"):
        with second_order.exact_moments():
            pass


def test_verification_catches_a_patch_that_no_longer_reaches_keras(monkeypatch):
    monkeypatch.setattr(second_order, "_VERIFIED", False)
    monkeypatch.setattr(second_order, "_exact_compute_moments", second_order._target_module()._compute_moments)
    with pytest.raises(second_order.SecondOrderError, match="not exact"):
        second_order.verify_exact_second_order()
