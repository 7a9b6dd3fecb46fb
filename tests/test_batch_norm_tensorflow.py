"""Training-mode batch normalisation on TensorFlow's fused kernels (`harmonization.batch_norm_tensorflow`).

The fused kernels run in float32 only, so the second derivatives are checked against the float64 composite
written out here from the definition (the exactness of that composite is itself checked against finite
differences in tests/test_second_order.py); float32 rounding is the only difference allowed.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import harmonization
from harmonization import batch_norm_tensorflow, second_order

RNG = np.random.default_rng(11)
EPSILON = 1e-3


def reference_batch_norm(x, gamma, beta, epsilon=EPSILON):
    """Training-mode batch normalisation over every axis but the last, from its definition."""
    axes = list(range(len(x.shape) - 1))
    mean = tf.reduce_mean(x, axes)
    variance = tf.reduce_mean(tf.square(x - mean), axes)
    return (x - mean) * tf.math.rsqrt(variance + epsilon) * gamma + beta


def fused_batch_norm(x, gamma, beta, epsilon=EPSILON):
    shape = tf.shape(x)
    x4 = x if len(x.shape) == 4 else tf.reshape(x, [-1, 1, 1, x.shape[-1]])
    y, _, _ = batch_norm_tensorflow.batch_norm_training(x4, gamma, beta, epsilon)
    return tf.reshape(y, shape)


def harmonized_shape_gradients(norm, arrays, dtype, inner_wrt_gamma):
    """Gradients w.r.t. (W, gamma, beta) of a function of an input gradient taken through `norm`.

    The shape of the harmonized step: an inner gradient (w.r.t. the input, and optionally gamma), then a loss
    of it differentiated w.r.t. the weights. Returns the outer gradients and the inner input gradient.
    """
    x, w, gamma, beta, v, u = (tf.constant(a, dtype) for a in arrays)
    w, gamma, beta = tf.Variable(w), tf.Variable(gamma), tf.Variable(beta)
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            inner.watch(x)
            h = tf.tensordot(x, w, 1)
            y = tf.reduce_sum(tf.sin(norm(h, gamma, beta)) * v)
        targets = [x, gamma] if inner_wrt_gamma else [x]
        grads = inner.gradient(y, targets)
        loss = tf.reduce_sum(tf.square(grads[0]) * u) + tf.reduce_sum(tf.cos(norm(h, gamma, beta)))
        if inner_wrt_gamma:
            loss += tf.reduce_sum(tf.square(grads[1]))
    outer_grads = outer.gradient(loss, [w, gamma, beta])
    return [g.numpy().astype(np.float64) for g in [*outer_grads, grads[0]]]


@pytest.mark.parametrize("shape", [(4, 5, 6, 3), (12, 3), (3, 7, 3)], ids=["NHWC", "dense", "sequence"])
@pytest.mark.parametrize("inner_wrt_gamma", [False, True], ids=["input-gradient", "input-and-gamma-gradient"])
def test_second_derivatives_equal_the_float64_definition(shape, inner_wrt_gamma):
    channels = shape[-1]
    arrays = [
        RNG.normal(size=shape) * 2 + 1.5,  # a mean well away from 0, as activations have
        RNG.normal(size=(channels, channels)),
        RNG.normal(size=channels),
        RNG.normal(size=channels),
        RNG.normal(size=shape),
        RNG.uniform(size=shape),
    ]
    want = harmonized_shape_gradients(reference_batch_norm, arrays, tf.float64, inner_wrt_gamma)
    got = harmonized_shape_gradients(fused_batch_norm, arrays, tf.float32, inner_wrt_gamma)
    float32 = harmonized_shape_gradients(reference_batch_norm, arrays, tf.float32, inner_wrt_gamma)
    for name, g, w, f in zip(("W", "gamma", "beta", "input gradient"), got, want, float32):
        error = np.abs(g - w).max() / np.abs(w).max()
        composite_error = np.abs(f - w).max() / np.abs(w).max()
        # float32 noise: within a few times what the float32 composite itself gets
        assert error < max(1e-5, 10 * composite_error), (name, error, composite_error)


def test_the_check_above_can_fail():
    """A batch norm exact to first order but not to second (Keras-TF's own moments) fails the comparison."""
    arrays = [RNG.normal(size=(4, 5, 6, 3)) + 1.0, RNG.normal(size=(3, 3)), RNG.normal(size=3),
              RNG.normal(size=3), RNG.normal(size=(4, 5, 6, 3)), RNG.uniform(size=(4, 5, 6, 3))]
    want = harmonized_shape_gradients(reference_batch_norm, arrays, tf.float64, False)

    def keras_moments(x, gamma, beta):  # tf.nn.moments: the variance's mean is a stop_gradient
        mean = tf.reduce_mean(x, [0, 1, 2])
        variance = tf.reduce_mean(tf.square(x - tf.stop_gradient(mean)), [0, 1, 2])
        return (x - mean) * tf.math.rsqrt(variance + EPSILON) * gamma + beta

    wrong = harmonized_shape_gradients(keras_moments, arrays, tf.float32, False)
    assert np.abs(wrong[0] - want[0]).max() / np.abs(want[0]).max() > 1e-2


def keras_layer(**kwargs):
    layer = keras.layers.BatchNormalization(momentum=0.9, **kwargs)
    layer.build((None, 6, 6, 4) if kwargs.get("axis", -1) == -1 else (None, 4, 6, 6))
    layer.gamma.assign(RNG.normal(size=4))
    layer.beta.assign(RNG.normal(size=4))
    layer.moving_mean.assign(RNG.normal(size=4))
    layer.moving_variance.assign(RNG.uniform(1, 2, size=4))
    return layer


def twin(layer):
    other = keras.layers.BatchNormalization.from_config(layer.get_config())
    other.build((None, 6, 6, 4) if layer.axis in (-1, 3) else (None, 4, 6, 6))
    other.set_weights(layer.get_weights())
    return other


def test_a_keras_layer_in_the_block_runs_fused_with_keras_outputs_and_moving_statistics():
    layer = keras_layer()
    plain = twin(layer)
    x = tf.constant(RNG.normal(size=(5, 6, 6, 4)) * 3 + 2, tf.float32)

    @tf.function(autograph=False)
    def traced(x):
        with second_order.exact_moments():
            return layer(x, training=True)

    got = traced(x)
    op_types = {op.type for op in traced.get_concrete_function(x).graph.get_operations()}
    assert "FusedBatchNormV3" in op_types
    want = plain(x, training=True)  # Keras's own call (outside the block)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    for fused_weight, keras_weight in zip(layer.non_trainable_weights, plain.non_trainable_weights):
        np.testing.assert_allclose(fused_weight.numpy(), keras_weight.numpy(), rtol=1e-6, atol=1e-6)
    assert keras.layers.BatchNormalization.call is not second_order._fused_batch_norm_call  # restored


def test_mixed_bfloat16_layers_compute_in_float32_and_return_bfloat16():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        layer = keras_layer()
        plain = twin(layer)
        x = tf.cast(tf.constant(RNG.normal(size=(5, 6, 6, 4)), tf.float32), tf.bfloat16)
        with second_order.exact_moments():
            got = layer(x, training=True)
        want = plain(x, training=True)
    finally:
        keras.config.set_dtype_policy(previous)
    assert got.dtype == tf.bfloat16
    np.testing.assert_allclose(tf.cast(got, tf.float32).numpy(), tf.cast(want, tf.float32).numpy(), atol=2e-2)


def test_one_value_per_channel_normalises_to_beta_without_nan():
    layer = keras_layer()
    x = tf.constant(RNG.normal(size=(1, 1, 1, 4)), tf.float32)
    with second_order.exact_moments():
        y = layer(x, training=True)
    np.testing.assert_allclose(y.numpy().ravel(), layer.beta.numpy(), atol=1e-6)
    assert np.isfinite(layer.moving_variance.numpy()).all()


@pytest.mark.parametrize("case", ["float64", "channels-first", "mask", "renorm", "tiny-epsilon", "inference"])
def test_what_the_fused_kernels_do_not_cover_stays_with_keras(case):
    kwargs = {"channels-first": {"axis": 1}, "renorm": {"renorm": True}, "tiny-epsilon": {"epsilon": 1e-6}}
    layer = keras_layer(**kwargs.get(case, {}))
    shape = (2, 4, 6, 6) if case == "channels-first" else (2, 6, 6, 4)
    x = tf.constant(RNG.normal(size=shape), tf.float64 if case == "float64" else tf.float32)
    mask = tf.ones(shape[:-1], tf.bool) if case == "mask" else None
    training = case != "inference"
    assert batch_norm_tensorflow.fused_call(layer, x, training=training, mask=mask) is None


def test_a_harmonized_step_in_float32_equals_the_float64_step():
    """One whole train step of a conv + batch-norm model: the fused float32 step against the float64 composite."""

    def build(dtype):
        keras.utils.set_random_seed(4)
        inputs = keras.Input((8, 8, 3), dtype=dtype)
        x = keras.layers.Conv2D(6, 3, padding="same", dtype=dtype)(inputs)
        x = harmonization.layers.BatchNormalization(dtype=dtype)(x)
        x = keras.layers.Activation("gelu", dtype=dtype)(x)
        x = keras.layers.Conv2D(6, 3, strides=2, padding="same", dtype=dtype)(x)
        x = keras.layers.BatchNormalization(dtype=dtype)(x)  # Keras's own layer: fused inside the step
        x = keras.layers.GlobalAveragePooling2D(dtype=dtype)(x)
        model = keras.Model(inputs, keras.layers.Dense(3, dtype=dtype)(x))
        trainer = harmonization.HarmonizedModel(model, lambda_harmonization=10.0)
        trainer.compile(optimizer=keras.optimizers.SGD(0.5))
        return model, trainer

    data = {
        "image": RNG.normal(size=(6, 8, 8, 3)),
        "heatmap": RNG.uniform(size=(6, 8, 8, 1)),
        "label": RNG.integers(0, 3, 6),
    }
    results, start = {}, None
    for dtype in ("float64", "float32"):
        model, trainer = build(dtype)
        start = start or [w.numpy() for w in model.weights]  # the same weights in both (initialisers draw by dtype)
        model.set_weights([w.astype(dtype) for w in start])
        before = [w.numpy().astype(np.float64) for w in model.weights]
        trainer.train_on_batch({k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in data.items()})
        results[dtype] = [w.numpy().astype(np.float64) - b for w, b in zip(model.weights, before)]
    for got, want in zip(results["float32"], results["float64"]):
        # float32 noise; a bias before batch normalisation has a zero gradient, so its change is noise alone
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max() + 1e-6


def test_verification_catches_fused_kernels_that_stop_being_exact(monkeypatch):
    """`verify_exact_second_order` (run at compile) also checks the fused path: here a wrong second derivative."""

    def first_order_only(x, gamma, beta, epsilon):
        mean = tf.reduce_mean(x, [0, 1, 2])
        variance = tf.reduce_mean(tf.square(x - tf.stop_gradient(mean)), [0, 1, 2])
        y = (x - mean) * tf.math.rsqrt(variance + epsilon) * gamma + beta
        return y, tf.stop_gradient(mean), tf.stop_gradient(variance)

    monkeypatch.setattr(second_order, "_VERIFIED", False)
    monkeypatch.setattr(batch_norm_tensorflow, "batch_norm_training", first_order_only)
    with pytest.raises(second_order.SecondOrderError, match="BatchNormalization are not exact"):
        second_order.verify_exact_second_order()
