"""Saliency methods on every Keras backend (issue 19, §2): the published training and evaluation maps, SmoothGrad
and Integrated Gradients equal closed forms in-process, and TensorFlow's maps across backends.

In-process (whatever the backend): on a linear model the input gradient is its weight column, so the published maps
and Integrated Gradients have closed forms; on a one-hidden-layer tanh MLP SmoothGrad equals a float64 NumPy loop
over the documented noise. Across backends (child processes, `backend_helpers.run_on_backend`): the same conv net,
built from the same NumPy weights, gives the same four maps on TensorFlow, JAX and PyTorch to 1e-5 relative, and
the NumPy reproduction of TensorFlow's stateless noise equals TensorFlow's own. No TensorFlow is imported here.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from backend_helpers import current_backend, other_backends, require_backend, run_on_backend
from harmonization import saliency_methods
from harmonization.saliency import logits_at, saliency_view
from harmonization.saliency_methods import (
    GradientSaliency,
    IntegratedGradients,
    SmoothGrad,
    get_saliency_method,
    list_saliency_methods,
    training_saliency_method,
)

pytestmark = pytest.mark.backends

SIZE, CLASSES, HIDDEN = 5, 3, 4
#: max |map - reference| / max |reference|: float32 noise of a few layers.
RELATIVE = 1e-5


def images_and_labels(n: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (n, SIZE, SIZE, 3)).astype(np.float32), rng.integers(0, CLASSES, n)


def preprocessed(images: np.ndarray) -> np.ndarray:
    """What the models' Rescaling layer makes of the images, where the saliency is taken, in float64."""
    return images.astype(np.float64) / 127.5 - 1.0


def with_weights(model: keras.Model, seed: int) -> keras.Model:
    """`model` with weights drawn by NumPy: the same numbers on every backend."""
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(0, 0.3, w.shape).astype(np.float32) for w in model.get_weights()])
    return model


def mlp(hidden: bool = True) -> keras.Model:
    """Rescaling to [-1, 1] (split off by the saliency), Flatten, [tanh Dense,] Dense logits."""
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs))
    if hidden:
        x = keras.layers.Dense(HIDDEN, activation="tanh", name="hidden")(x)
    return with_weights(keras.Model(inputs, keras.layers.Dense(CLASSES, name="logits")(x)), seed=1)


def conv_net() -> keras.Model:
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="tanh")(x)
    x = keras.layers.Conv2D(3, 3, padding="same", activation="softplus")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return with_weights(keras.Model(inputs, keras.layers.Dense(CLASSES)(x)), seed=2)


def host(values) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(values), np.float64)


def assert_close(got, expected, what: str = "") -> None:
    """Equal to RELATIVE of the reference's largest magnitude (elementwise relative error is meaningless near 0)."""
    got, expected = host(got), np.asarray(expected, np.float64)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    gap = np.abs(got - expected).max() / np.abs(expected).max()
    assert gap < RELATIVE, f"{what}: relative gap {gap:.2e}"


# ----------------------------------------------------------------------------- closed forms, in-process
def test_the_published_maps_and_integrated_gradients_of_a_linear_model_are_its_weights():
    """logit_y = w_y . x + b: the gradient is w_y, and IG = (x - baseline) * w_y exactly, whatever the steps."""
    model = mlp(hidden=False)
    images, labels = images_and_labels()
    w = model.get_layer("logits").get_weights()[0].astype(np.float64)  # (H*W*C, classes)
    gradient = w[:, labels].T.reshape(images.shape)
    assert_close(get_saliency_method("gradient_mean")(model, images, labels), gradient.mean(-1), "gradient_mean")
    assert_close(get_saliency_method("gradient_max_abs")(model, images, labels), np.abs(gradient).max(-1),
                 "gradient_max_abs")
    for rule in ("midpoint", "right", "trapezoid"):
        method = IntegratedGradients(steps=3, rule=rule, baseline=0.25, batch_size=5)
        expected = (preprocessed(images) - 0.25) * gradient
        assert_close(method.attributions(model, images, labels), expected, f"IG {rule}")
        assert_close(method(model, images, labels), np.abs(expected.sum(-1)), f"IG {rule} map")
    # A linear model's gradient ignores the noise: SmoothGrad is the evaluation map.
    assert_close(SmoothGrad(samples=3, noise_level=0.5)(model, images, labels), np.abs(gradient).max(-1), "smoothgrad")


def mlp_input_gradient(model: keras.Model, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """d logit_y / d x of `mlp()` at preprocessed points x, in float64: W1 ((1 - a^2) * w2_y)."""
    w1, b1 = (v.astype(np.float64) for v in model.get_layer("hidden").get_weights())
    w2 = model.get_layer("logits").get_weights()[0].astype(np.float64)
    a = np.tanh(x.reshape(len(x), -1) @ w1 + b1)
    return (((1 - a**2) * w2[:, labels].T) @ w1.T).reshape(x.shape)


@pytest.mark.parametrize("batch_size", [1, 6, 1000])
def test_smoothgrad_equals_a_float64_loop_over_the_documented_noise(batch_size):
    """sigma = noise_level * (max x - min x) per image, noise s = stateless_normal(seed=[seed, s])."""
    model = mlp()
    images, labels = images_and_labels()
    x = preprocessed(images)
    sigma = 0.3 * (x.max(axis=(1, 2, 3)) - x.min(axis=(1, 2, 3)))[:, None, None, None]
    expected = np.mean([
        mlp_input_gradient(model, x + sigma * saliency_methods._stateless_normal_numpy(x.shape, 5, s), labels)
        for s in range(7)
    ], axis=0)
    method = SmoothGrad(samples=7, noise_level=0.3, seed=5, batch_size=batch_size)
    got = method.attributions(model, images, labels)
    assert_close(got, expected, "smoothgrad")
    assert_close(method(model, images, labels), np.abs(expected).max(-1), "smoothgrad map")
    # The noise matters: other noise is far from the reference.
    other = host(SmoothGrad(samples=7, noise_level=0.3, seed=6).attributions(model, images, labels))
    assert np.abs(other - expected).max() > 100 * np.abs(host(got) - expected).max()


def test_integrated_gradients_is_complete_on_a_nonlinear_model():
    """Sundararajan et al.'s completeness: the attributions sum to logit(x) - logit(0), up to the quadrature."""
    model = conv_net()
    images, labels = images_and_labels()
    rows = np.arange(len(labels))
    view, tensor = saliency_view(model, images)  # the network after its Rescaling layer, and its input there
    x = view.split(tensor)
    gain = host(logits_at(view, x))[rows, labels] - host(logits_at(view, keras.ops.zeros_like(x)))[rows, labels]

    def gap(method):
        total = host(method.attributions(model, images, labels)).sum(axis=(1, 2, 3))
        return np.max(np.abs(total - gain) / np.abs(gain))

    assert gap(IntegratedGradients(steps=64, batch_size=16)) < 1e-4
    assert gap(IntegratedGradients(steps=1, rule="right")) > 1e-2  # the check can fail


def test_seeds_reproduce_and_none_draws_new_noise():
    model = conv_net()
    images, labels = images_and_labels()
    seeded = SmoothGrad(samples=2, seed=3)
    np.testing.assert_array_equal(host(seeded(model, images, labels)), host(seeded(model, images, labels)))
    fresh = SmoothGrad(samples=2, seed=None)
    assert not np.allclose(host(fresh(model, images, labels)), host(fresh(model, images, labels)))


def test_the_registry_and_the_training_check_on_every_backend():
    assert list_saliency_methods(trainable=True) == ["gradient_mean", "gradient_max_abs"]
    assert training_saliency_method("gradient_mean").name == "gradient_mean"
    with pytest.raises(ValueError, match="'gradient_mean', 'gradient_max_abs'"):
        training_saliency_method("smoothgrad")
    square = GradientSaliency("square_sum", lambda g: keras.ops.sum(keras.ops.square(g), axis=-1))
    images, labels = images_and_labels()
    model = mlp(hidden=False)
    gradient = model.get_layer("logits").get_weights()[0].astype(np.float64)[:, labels].T.reshape(images.shape)
    assert_close(square(model, images, labels), (gradient**2).sum(-1), "custom reduction")
    with pytest.raises(ValueError, match="Did you mean 'integrated_gradients'"):
        get_saliency_method("integrated_gradient")


# ----------------------------------------------------------------------------- across backends
METHODS = {
    "gradient_mean": lambda: get_saliency_method("gradient_mean"),
    "gradient_max_abs": lambda: get_saliency_method("gradient_max_abs"),
    "smoothgrad": lambda: SmoothGrad(samples=5, noise_level=0.2, seed=4, batch_size=8),
    "integrated_gradients": lambda: IntegratedGradients(steps=6, batch_size=8),
}


def method_maps() -> dict[str, list]:
    """The four maps of `conv_net()` on fixed images, as nested lists (what a child prints)."""
    model = conv_net()
    images, labels = images_and_labels()
    return {name: host(make()(model, images, labels)).tolist() for name, make in METHODS.items()}


CHILD = r"""
import json, sys
sys.path.insert(0, "tests")
from test_backends_saliency import method_maps
print(json.dumps(method_maps()))
"""


def test_every_backend_gives_the_same_maps():
    here = method_maps()
    # From TensorFlow, both others (the test extras install them; run_on_backend fails if one is missing); from
    # JAX or PyTorch, whichever others this environment has (none in CI's environments without TensorFlow).
    backends = ["jax", "torch"] if current_backend() == "tensorflow" else other_backends()
    for backend in backends:
        there = run_on_backend(backend, CHILD)
        for name in METHODS:
            assert_close(there[name], here[name], f"{name} on {backend} vs {current_backend()}")


NOISE_CHILD = r"""
import json
import tensorflow as tf
print(json.dumps([tf.random.stateless_normal((3, 7, 5, 3), seed=seed).numpy().tolist()
                  for seed in ([0, 0], [5, 3], [2**31 - 1, 49], [123456789, 7])]))
"""


def test_the_numpy_noise_is_tensorflows_stateless_normal():
    """JAX and PyTorch draw SmoothGrad's noise with NumPy; it must be TensorFlow's stream (to a float32 ulp)."""
    require_backend("tensorflow")
    expected = run_on_backend("tensorflow", NOISE_CHILD)
    for values, seed in zip(expected, ([0, 0], [5, 3], [2**31 - 1, 49], [123456789, 7])):
        got = saliency_methods._stateless_normal_numpy((3, 7, 5, 3), *seed)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, np.array(values, np.float32), rtol=0, atol=5e-7)
