"""Exact second derivatives through Keras normalisation layers on the TensorFlow backend (the others are exact).

Why: harmonized training differentiates a gradient (the saliency map) with respect to the weights.
Keras-TF computes the moments of `LayerNormalization`, `BatchNormalization` (training mode) and
`GroupNormalization` with `tf.nn.moments`, whose variance is `mean((x - stop_gradient(mean))^2)`.
That is exact to first order (the missing term is zero) but not to second order: the harmonization
gradient comes out silently wrong (23% relative error measured on a small conv+LN model).

`exact_moments()` swaps, for the duration of a `with` block, the one private Keras function that
computes the moments for one whose gradient also flows through the mean. Within the block,
training-mode `BatchNormalization` in the common case (float32 compute, channels last, no mask)
runs instead on TensorFlow's fused kernels with a hand-written second derivative
(`harmonization.batch_norm_tensorflow`): exact as well, and faster (on ResNet50V2 it makes the
harmonized step ~20% faster; bench/train_step.py). The block is thread-safe and reference-counted
(MirroredStrategy traces replicas in parallel threads), restores the originals on exit, refuses
loudly if Keras no longer has what it replaces, and verifies once per process, numerically, that
second derivatives of LayerNormalization and BatchNormalization are exact inside the block.
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
_ORIGINAL_BATCH_NORM_CALL = None
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


def _fused_batch_norm_call(original):
    """`BatchNormalization.call` that takes the fused exact path where it applies, else Keras's own `call`."""
    from harmonization import batch_norm_tensorflow  # on use: it imports TensorFlow

    def call(self, inputs, training=None, mask=None):
        outputs = batch_norm_tensorflow.fused_call(self, inputs, training=training, mask=mask)
        return original(self, inputs, training=training, mask=mask) if outputs is None else outputs

    call.__wrapped__ = original
    return call


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
    global _DEPTH, _ORIGINAL, _ORIGINAL_BATCH_NORM_CALL
    if keras.backend.backend() != "tensorflow":
        yield
        return
    module = _target_module()
    batch_norm = keras.layers.BatchNormalization
    with _LOCK:
        if _DEPTH == 0:
            _ORIGINAL = getattr(module, _TARGET_NAME)
            setattr(module, _TARGET_NAME, _exact_compute_moments)
            _ORIGINAL_BATCH_NORM_CALL = batch_norm.call
            batch_norm.call = _fused_batch_norm_call(_ORIGINAL_BATCH_NORM_CALL)
        _DEPTH += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                setattr(module, _TARGET_NAME, _ORIGINAL)
                batch_norm.call = _ORIGINAL_BATCH_NORM_CALL
                _ORIGINAL = _ORIGINAL_BATCH_NORM_CALL = None


def is_active() -> bool:
    """True while some `exact_moments()` block is open."""
    return _DEPTH > 0


def verify_exact_second_order() -> None:
    """Check numerically, once per process, that `exact_moments` makes normalisation Hessians exact.

    Compares the gradient of a gradient through `keras.layers.LayerNormalization` (float64) and through
    training-mode `keras.layers.BatchNormalization` (float32: the fused kernels) inside the block against the
    same quantity written out by hand in float64. Raises SecondOrderError on mismatch, so a future Keras that
    computes moments elsewhere, or a TensorFlow whose fused kernels change, fails loudly instead of training
    silently wrong.
    """
    global _VERIFIED
    if _VERIFIED or keras.backend.backend() != "tensorflow":  # see `exact_moments` for the other backends
        return
    import tensorflow as tf  # on use: this module is imported on every backend

    rng = np.random.default_rng(0)
    x, w, v, u = (rng.normal(size=shape) for shape in ((4, 6), (6, 6), (4, 6), (4, 6)))

    def reference(z, axis):
        mean = tf.reduce_mean(z, axis, keepdims=True)
        var = tf.reduce_mean(tf.square(z - mean), axis, keepdims=True)
        return (z - mean) / tf.sqrt(var + 1e-3)

    def second_order(norm, dtype):
        # d/dw <u, (d f(norm(x w)) / dx)^2>: the shape of the harmonization gradient (an input gradient,
        # differentiated w.r.t. a weight before the normalisation). `u` weighs each example and value
        # differently: the error of Keras-TF's moments cancels in a sum symmetric over the batch.
        xs, ws, vs, us = (tf.constant(a, dtype) for a in (x, w, v, u))
        with tf.GradientTape() as outer:
            outer.watch(ws)
            with tf.GradientTape() as inner:
                inner.watch(xs)
                y = tf.reduce_sum(tf.sin(norm(tf.matmul(xs, ws))) * vs)
            g = inner.gradient(y, xs)
            s = tf.reduce_sum(tf.square(g) * us)
        return tf.cast(outer.gradient(s, ws), tf.float64)

    checks = (
        ("LayerNormalization", keras.layers.LayerNormalization(epsilon=1e-3, dtype="float64", center=False,
                                                               scale=False), -1, tf.float64, 1e-9),
        ("BatchNormalization", lambda z, layer=keras.layers.BatchNormalization(
            epsilon=1e-3, dtype="float32", center=False, scale=False): layer(z, training=True), 0, tf.float32, 1e-4),
    )
    for name, norm, axis, dtype, tolerance in checks:
        with exact_moments():
            got = second_order(norm, dtype)
        want = second_order(lambda z, axis=axis: reference(z, axis), tf.float64)
        err = float(tf.reduce_max(tf.abs(got - want)) / (tf.reduce_max(tf.abs(want)) + 1e-30))
        if not err < tolerance:
            raise SecondOrderError(
                f"Second derivatives through keras.layers.{name} are not exact under "
                f"harmonization.exact_moments() with Keras {keras.__version__} (relative error {err:.2e}). "
                "Harmonized training would be silently wrong; pin keras to a tested version (3.12-3.15)."
            )
    _VERIFIED = True
