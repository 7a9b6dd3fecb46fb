"""Exact second derivatives on the backend this suite runs on, against central finite differences in float64.

Issue 19, §3: the harmonization gradient differentiates an input gradient, so every layer's second derivative
must be right. Keras-TF's normalisation layers are not (`harmonization.second_order` patches them); this checks
the step on whichever backend runs the suite (TensorFlow in the main run, JAX and PyTorch in CI's environments
without TensorFlow): the gradient that `HarmonizedModel`'s own step applies, along random directions, equals a
Richardson-extrapolated central difference of the published loss computed from public functions.

On JAX and PyTorch, Keras computes some layers in float32 even under a float64 policy (normalisation layers
promote with `result_type(dtype, "float32")`, which those backends resolve to float32, 4e-7 from a float64 reference
here; Dense under PyTorch wobbles as much), so there the differences use larger steps and the bound is float32's
(`PRECISION`); a wrong second derivative is off by far more (23% for Keras-TF's LayerNormalization, and the negative
control below). tests/test_backends_step.py also compares those steps with TensorFlow's, which this file checks in
float64 with every normalisation layer.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import harmonization

pytestmark = pytest.mark.backends


@pytest.fixture
def float64():
    previous_floatx, previous_policy = keras.config.floatx(), keras.config.dtype_policy()
    x64 = None
    if keras.backend.backend() == "jax":
        import jax  # on use: JAX computes in float32 unless told otherwise

        x64 = jax.config.jax_enable_x64
        jax.config.update("jax_enable_x64", True)
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx(previous_floatx)
    keras.config.set_dtype_policy(previous_policy)
    if x64 is not None:
        jax.config.update("jax_enable_x64", x64)


#: (finite-difference step, smoothness bound, error bound) by whether the backend computes the model in float64.
PRECISION = (1e-6, 1e-5, 1e-6) if keras.backend.backend() == "tensorflow" else (1e-3, 1e-3, 1e-2)


def smooth_model(num_classes=3, normalisation=True):
    """Convolutions, attention and smooth activations only (so that finite differences see no kink), and every
    normalisation Keras has (BatchNormalization in training mode, Layer-, GroupNormalization) where float64 reaches
    them."""

    def normalised(layer, x):
        return layer(x) if normalisation else x

    keras.utils.set_random_seed(3)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Rescaling(0.5, offset=-0.25)(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same")(x)
    x = normalised(keras.layers.BatchNormalization(), x)
    x = keras.layers.Activation("gelu")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)
    x = normalised(keras.layers.GroupNormalization(groups=2), x)
    x = keras.layers.Activation("tanh")(x)
    x = keras.layers.AveragePooling2D(2)(x)
    x = keras.layers.Reshape((16, 4))(x)
    x = keras.layers.Dense(8)(x)
    x = x + keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)(x, x)
    x = normalised(keras.layers.LayerNormalization(), x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs)


def _batch():
    rng = np.random.default_rng(7)
    return {
        "image": rng.normal(size=(4, 8, 8, 3)),
        # Blank human maps: the rescaled human map is then 0, so the stop-gradient on the saliency's peak (the
        # published loss's) does not enter, and the finite difference of the loss is its true gradient.
        "heatmap": np.zeros((4, 8, 8)),
        "label": np.array([0, 2, 1, 2]),
    }


def _loss(model, batch) -> float:
    """The published loss (cross-entropy with label smoothing 0.1 + 1.0 x harmonization), from public functions."""
    images, labels = batch["image"], batch["label"]
    saliency = harmonization.input_gradients(model, images, labels, training=True)
    assert float(keras.ops.convert_to_numpy(keras.ops.max(keras.ops.abs(saliency)))) > 0
    logits = model(images, training=True)
    onehot = np.eye(logits.shape[-1])[labels]
    cross_entropy = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1)(onehot, logits)
    value = cross_entropy + harmonization.harmonization_loss(saliency, batch["heatmap"])
    return float(keras.ops.convert_to_numpy(value))


def _step_gradient(model, batch, **options) -> list[np.ndarray]:
    """The gradient `HarmonizedModel`'s own step applies: minus one SGD(1.0) update, per trainable variable."""
    hmodel = harmonization.HarmonizedModel(model, lambda_weights=0.0, **options)
    hmodel.compile(optimizer=keras.optimizers.SGD(1.0))
    before = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
    hmodel.train_on_batch(batch)
    after = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
    for variable, value in zip(model.trainable_variables, before):
        variable.assign(value)
    return [b - a for a, b in zip(after, before)]


def _directional_errors(model, batch, gradient, directions=3, max_tries=12) -> list[float]:
    """|<gradient, v> - d/dt loss(w + t v)| / |d/dt loss|, the difference central and Richardson-extrapolated.

    The standardised saliency is rectified: a direction along which the two central differences disagree
    straddles a kink, where no derivative exists, and is drawn again.
    """
    h, smooth, _ = PRECISION
    rng = np.random.default_rng(11)
    variables = model.trainable_variables
    base = [keras.ops.convert_to_numpy(v) for v in variables]
    non_trainable = [keras.ops.convert_to_numpy(v) for v in model.non_trainable_variables]

    def loss_at(direction, t):
        for variable, value, step in zip(variables, base, direction):
            variable.assign(value + t * step)
        for variable, value in zip(model.non_trainable_variables, non_trainable):
            variable.assign(value)  # training-mode BatchNormalization moves its statistics; they are not an input
        return _loss(model, batch)

    errors = []
    for _ in range(max_tries):
        direction = [rng.normal(size=value.shape) for value in base]
        analytic = sum(float(np.sum(g * d)) for g, d in zip(gradient, direction))
        coarse, fine = [(loss_at(direction, s) - loss_at(direction, -s)) / (2 * s) for s in (h, h / 2)]
        if abs(coarse - fine) > smooth * abs(fine):
            continue
        numeric = (4 * fine - coarse) / 3
        errors.append(abs(analytic - numeric) / abs(numeric))
        if len(errors) == directions:
            break
    loss_at([np.zeros_like(b) for b in base], 0.0)
    assert len(errors) == directions, f"only {len(errors)} of {max_tries} directions were smooth enough to check"
    return errors


def test_the_step_gradient_equals_finite_differences_in_float64(float64):
    model = smooth_model()
    batch = _batch()
    errors = _directional_errors(model, batch, _step_gradient(model, batch))
    assert max(errors) < PRECISION[2], errors


def test_the_check_sees_a_missing_second_order_term(float64):
    # Negative control: the step without the harmonization term (first order only) is far from the differences
    # of the full loss, so the comparison above would catch a wrong second derivative.
    model = smooth_model()
    batch = _batch()
    errors = _directional_errors(model, batch, _step_gradient(model, batch, lambda_harmonization=0.0))
    assert max(errors) > 5 * PRECISION[2], errors
