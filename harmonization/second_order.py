"""Exact second derivatives through Keras normalisation layers on the TensorFlow backend (the others are exact).

Why: harmonized training differentiates a gradient (the saliency map) with respect to the weights.
Keras-TF computes the moments of `LayerNormalization`, `BatchNormalization` (training mode) and
`GroupNormalization` with `tf.nn.moments`, whose variance is `mean((x - stop_gradient(mean))^2)`.
That is exact to first order (the missing term is zero) but not to second order: the harmonization
gradient comes out silently wrong (23% relative error measured on a small conv+LN model).

`exact_moments()` swaps, for the duration of a `with` block, the one private Keras function that
computes the moments for one whose gradient also flows through the mean. It is thread-safe and
reference-counted (MirroredStrategy traces replicas in parallel threads), restores the original on
exit, refuses loudly if Keras no longer has the function it replaces, and verifies once per process,
numerically, that second derivatives of LayerNormalization are exact inside the block.
"""

from __future__ import annotations

import contextlib
import inspect
import threading

import keras
import numpy as np

_LOCK = threading.RLock()
_DEPTH = 0
_ORIGINAL = None
_VERIFIED = False

_TARGET_MODULE = "keras.src.backend.tensorflow.nn"
_TARGET_NAME = "_compute_moments"


class SecondOrderError(RuntimeError):
    """Raised when exact second derivatives cannot be guaranteed with the installed Keras."""


def _exact_compute_moments(x, axes, keepdims):
    """mean and population variance, differentiable twice (no stop_gradient on the mean)."""
    import tensorflow as tf  # on use: this module is imported on every backend, and only TensorFlow's is patched

    mean = tf.reduce_mean(x, axis=axes, keepdims=True)
    variance = tf.reduce_mean(tf.math.squared_difference(x, mean), axis=axes, keepdims=True)
    if not keepdims:
        mean = tf.squeeze(mean, axes)
        variance = tf.squeeze(variance, axes)
    return mean, variance


def _target_module():
    import importlib

    try:
        module = importlib.import_module(_TARGET_MODULE)
    except ImportError as err:  # pragma: no cover - depends on the Keras version
        raise SecondOrderError(
            f"Keras {keras.__version__} has no module {_TARGET_MODULE}; harmonization cannot guarantee exact "
            "second derivatives through normalisation layers. Pin keras to a tested version (3.12-3.15)."
        ) from err
    original = getattr(module, _TARGET_NAME, None)
    moments = getattr(module, "moments", None)
    if (
        original is None
        or moments is None
        or list(inspect.signature(original).parameters) != ["x", "axes", "keepdims"]
        or _TARGET_NAME not in moments.__code__.co_names
    ):
        raise SecondOrderError(
            f"Keras {keras.__version__} changed how it computes moments ({_TARGET_MODULE}.{_TARGET_NAME}); "
            "harmonization cannot guarantee exact second derivatives through normalisation layers. "
            "Pin keras to a tested version (3.12-3.15) or report this issue."
        )
    return module


@contextlib.contextmanager
def exact_moments():
    """Within this block, Keras-TF normalisation layers have exact second derivatives.

    Nothing changes outside the block: the original Keras function is restored when the last
    (possibly concurrent) user leaves. Graphs traced inside the block keep the exact computation.

    On JAX and PyTorch the block changes nothing: Keras computes their moments without a stop-gradient
    (`jnp.var`; `E[x^2] - E[x]^2` on PyTorch, whose LayerNormalization is `torch.nn.functional.layer_norm`), and
    tests/test_backends_second_order.py checks their second derivatives against finite differences in float64.
    """
    global _DEPTH, _ORIGINAL
    if keras.backend.backend() != "tensorflow":
        yield
        return
    module = _target_module()
    with _LOCK:
        if _DEPTH == 0:
            _ORIGINAL = getattr(module, _TARGET_NAME)
            setattr(module, _TARGET_NAME, _exact_compute_moments)
        _DEPTH += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                setattr(module, _TARGET_NAME, _ORIGINAL)
                _ORIGINAL = None


def is_active() -> bool:
    """True while some `exact_moments()` block is open."""
    return _DEPTH > 0


def verify_exact_second_order() -> None:
    """Check numerically, once per process, that `exact_moments` makes LayerNorm's Hessian exact.

    Compares the gradient of a gradient through `keras.layers.LayerNormalization` inside the block
    against the same quantity written out by hand in float64. Raises SecondOrderError on mismatch,
    so a future Keras that computes moments elsewhere fails loudly instead of training silently wrong.
    """
    global _VERIFIED
    if _VERIFIED or keras.backend.backend() != "tensorflow":  # see `exact_moments` for the other backends
        return
    import tensorflow as tf  # on use: this module is imported on every backend

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(3, 6)), tf.float64)
    w = tf.constant(rng.normal(size=(6, 6)), tf.float64)
    v = tf.constant(rng.normal(size=(3, 6)), tf.float64)
    layer = keras.layers.LayerNormalization(epsilon=1e-3, dtype="float64", center=False, scale=False)

    def reference(z):
        mean = tf.reduce_mean(z, -1, keepdims=True)
        var = tf.reduce_mean(tf.square(z - mean), -1, keepdims=True)
        return (z - mean) / tf.sqrt(var + 1e-3)

    def second_order(norm):
        # d/dw |d f(norm(x w)) / dx|^2: the shape of the harmonization gradient (an input gradient,
        # differentiated w.r.t. a weight before the normalisation).
        with tf.GradientTape() as outer:
            outer.watch(w)
            with tf.GradientTape() as inner:
                inner.watch(x)
                y = tf.reduce_sum(tf.sin(norm(tf.matmul(x, w))) * v)
            g = inner.gradient(y, x)
            s = tf.reduce_sum(tf.square(g))
        return outer.gradient(s, w)

    with exact_moments():
        got = second_order(layer)
    want = second_order(reference)
    err = float(tf.reduce_max(tf.abs(got - want)) / (tf.reduce_max(tf.abs(want)) + 1e-30))
    if not err < 1e-9:
        raise SecondOrderError(
            f"Second derivatives through keras.layers.LayerNormalization are not exact under "
            f"harmonization.exact_moments() with Keras {keras.__version__} (relative error {err:.2e}). "
            "Harmonized training would be silently wrong; pin keras to a tested version (3.12-3.15)."
        )
    _VERIFIED = True
