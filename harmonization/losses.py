"""The harmonization loss of the neural harmonizer (Fel et al., NeurIPS 2022, arXiv 2211.04533).

Functions of `keras.ops`, so the same code runs on TensorFlow, JAX and PyTorch, each testable on its own:

    standardize_cut  ->  gaussian_pyramid  ->  pyramidal_mse  ->  harmonization_loss

Each public function checks its arguments; `harmonization_loss_unchecked` (and the private `_name`
versions below it) compute the same thing from arguments already checked, so that `HarmonizedModel`,
which checks its batch once per step, does not check the same maps and tokens again in every function
of the chain.

Defaults reproduce the published method exactly: both maps are z-scored per map and rectified, the human
map is rescaled to the saliency map's peak (without letting the gradient flow through that peak), and the
squared error is averaged over the first five levels of a 5x5 binomial Gaussian pyramid, each example
weighted by its token (0 = this example has no human map; it still counts in the mean's denominator).
"""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
from keras import ops

from harmonization import _host_checks
from harmonization._numbers import check_int, check_number

#: Added to both peaks before the rescaling, as in the published code.
PEAK_EPSILON = 1e-6
#: The most pyramid levels a loss compares. Halving 15 times takes any image of up to 32768 px to 1x1 (SAME
#: padding keeps a 1x1 map 1x1), so more levels only repeat the last one; a huge count (10^6) built a graph that
#: never finished. Recipes allow the same (`harmonization.recipes.SCHEMA`).
MAX_PYRAMID_LEVELS = 16


def _tensorflow_checks():
    """`harmonization._validation` (checks that also run inside a tf.function) on the TensorFlow backend, else None.

    On JAX and PyTorch the public functions check concrete values on the host instead (`_host_checks`).
    """
    if keras.backend.backend() != "tensorflow":
        return None
    from harmonization import _validation  # on use: it imports TensorFlow, which the other backends may lack

    return _validation


def _is_traced(x) -> bool:
    """True for a value whose numbers are unknown until it runs (a JAX tracer inside `jit`, a symbolic tensor)."""
    return "Tracer" in type(x).__name__ or isinstance(x, keras.KerasTensor)


def _as_maps(maps, name: str, dtype=None):
    """`maps` as float (N, H, W) from (N, H, W) or (N, H, W, 1), on any backend (see `_validation.as_maps`)."""
    checks = _tensorflow_checks()
    if checks is not None:
        return checks.as_maps(maps, name, dtype)
    maps = ops.convert_to_tensor(maps)
    if dtype is not None:
        maps = ops.cast(maps, dtype)
    elif "float" not in keras.backend.standardize_dtype(maps.dtype):
        maps = ops.cast(maps, "float32")
    shape = tuple(maps.shape)
    if len(shape) == 4 and shape[-1] == 1:
        return maps[..., 0]
    if len(shape) != 3:
        raise ValueError(
            f"`{name}` must have shape (N, H, W) or (N, H, W, 1); got shape {shape}"
            + (f" with {shape[-1]} channels. Reduce the channels first (e.g. mean over the last axis)."
               if len(shape) == 4 else ".")
        )
    return maps


def _check_same_shape(a, b, name_a: str, name_b: str) -> None:
    checks = _tensorflow_checks()
    if checks is not None:
        return checks.check_same_shape(a, b, name_a, name_b)
    return _host_checks.check_same_map_shape(a.shape, b.shape, name_a, name_b)


def _check_finite(x, name: str):
    checks = _tensorflow_checks()
    if checks is not None:
        return checks.check_finite(x, name)
    if not _is_traced(x):
        _host_checks.check_finite_on_host(x, name)
    return x


def _as_tokens(tokens, batch_size, dtype, name: str = "tokens"):
    """(N,) per-example weights of `dtype` (all ones for None), as `_validation.as_tokens` without value checks."""
    checks = _tensorflow_checks()
    if checks is not None:
        return checks.as_tokens(tokens, batch_size, dtype, name=name)
    if tokens is None:
        return ops.ones([batch_size], dtype)
    tokens = ops.convert_to_tensor(tokens)
    if len(tokens.shape) == 0:
        tokens = ops.full([batch_size], tokens)
    elif len(tokens.shape) == 2 and tokens.shape[-1] == 1:
        tokens = tokens[:, 0]
    if len(tokens.shape) != 1:
        raise ValueError(
            f"`{name}` must have shape (N,) or (N, 1) (one weight per example); got shape {tuple(tokens.shape)}."
        )
    return ops.cast(tokens, dtype)


def _safe_sqrt(x):
    """sqrt with a finite gradient at 0: a blank map (std 0) must not turn the whole step into NaN."""
    positive = x > 0
    return ops.where(positive, ops.sqrt(ops.where(positive, x, ops.ones_like(x))), ops.zeros_like(x))


def _check_epsilon(epsilon):
    """`epsilon` unchanged after checking it is finite and >= 0 (a tensor only when its value is known).

    A negative epsilon can make std + epsilon vanish or flip its sign, an infinite one zeroes every
    map, silently. 0 is allowed here (an exact z-score; a blank map then gives NaN).
    """
    value = epsilon
    if keras.backend.backend() == "tensorflow" and ops.is_tensor(epsilon):
        import tensorflow as tf  # on use: only a TensorFlow tensor's static value is read here

        value = tf.get_static_value(epsilon)
    elif ops.is_tensor(epsilon):
        value = None if _is_traced(epsilon) else float(_host_checks.host_array(epsilon))
    if value is not None:
        check_number(value, "epsilon", minimum=0, strict=False, why=" (added to each map's std)")
    return epsilon


def standardize_cut(maps, epsilon: float = 1e-5):
    """Per map: subtract the mean, divide by (std + epsilon) over H, W, then ReLU.

    Args:
        maps: (N, H, W) or (N, H, W, 1) float tensor.
        epsilon: added to the standard deviation; finite, >= 0.

    Returns:
        A tensor of the input's shape.
    """
    epsilon = _check_epsilon(epsilon)
    original = ops.convert_to_tensor(maps)
    out = _standardize_cut(_as_maps(original, "maps"), epsilon)
    return ops.expand_dims(out, -1) if len(original.shape) == 4 else out


def _standardize_cut(maps, epsilon):
    """`standardize_cut` of float (N, H, W) maps and an epsilon already checked."""
    mean = ops.mean(maps, axis=(1, 2), keepdims=True)
    centred = maps - mean
    # Population std, as tf.math.reduce_std; written out so the gradient is exact and finite.
    std = _safe_sqrt(ops.mean(ops.square(centred), axis=(1, 2), keepdims=True))
    return ops.relu(centred / (std + ops.cast(epsilon, maps.dtype)))


def binomial_kernel(dtype="float32"):
    """The 5x5 binomial kernel, outer([1,4,6,4,1]) / 256, shaped (5, 5, 1, 1) for conv2d."""
    taps = np.array([1.0, 4.0, 6.0, 4.0, 1.0])
    kernel = np.outer(taps, taps)
    kernel /= kernel.sum()
    return ops.convert_to_tensor(kernel[:, :, None, None], dtype=dtype)


def gaussian_pyramid(maps, levels: int) -> list:
    """Blur with the binomial kernel and downsample by 2 (SAME padding), `levels` times.

    Args:
        maps: (N, H, W) or (N, H, W, 1).
        levels: number of downsamplings (>= 0).

    Returns:
        `levels + 1` tensors of shape (N, H_k, W_k, 1), the input first.
    """
    levels = check_int(levels, "levels", minimum=0, maximum=MAX_PYRAMID_LEVELS)
    return _gaussian_pyramid(ops.expand_dims(_as_maps(maps, "maps"), -1), levels)


def _gaussian_pyramid(maps, levels: int) -> list:
    """`gaussian_pyramid` of float (N, H, W, 1) maps and a level count already checked."""
    kernel = binomial_kernel(maps.dtype)
    pyramid = [maps]
    for _ in range(levels):
        # TensorFlow's SAME padding (more on the bottom/right for an even size), which keras.ops.conv applies on
        # every backend: the published `tf.nn.conv2d(..., strides=2, padding="SAME")`.
        maps = ops.conv(maps, kernel, strides=2, padding="same", data_format="channels_last")
        pyramid.append(maps)
    return pyramid


def pyramidal_mse(a, b, tokens=None, levels: int = 5):
    """Mean over pyramid levels 0..levels-1 of mean((a - b)^2 * token).

    Args:
        a, b: (N, H, W) or (N, H, W, 1) maps of the same shape.
        tokens: (N,) per-example weights (1 = has a human map, 0 = none); None means all ones.
        levels: number of pyramid levels compared (the published method uses 5: levels 0..4).

    Returns:
        A scalar.
    """
    levels = check_int(levels, "levels", minimum=1, maximum=MAX_PYRAMID_LEVELS)
    a = _as_maps(a, "a")
    b = _as_maps(b, "b", dtype=a.dtype)
    _check_same_shape(a, b, "a", "b")
    return _pyramidal_mse(a, b, _as_tokens(tokens, ops.shape(a)[0], a.dtype), levels)


def _pyramidal_mse(a, b, tokens, levels: int):
    """`pyramidal_mse` of (N, H, W) maps of one shape and dtype, and (N,) tokens of that dtype, checked."""
    # The published code builds levels+1 maps and compares the first `levels` of them
    # (serre-lab/Harmonization `training/loss.py`, `pyramidal_mse_with_tokens`).
    pyr_a = _gaussian_pyramid(a[..., None], levels - 1)
    pyr_b = _gaussian_pyramid(b[..., None], levels - 1)
    weights = tokens[:, None, None, None]
    per_level = [ops.mean(ops.square(la - lb) * weights) for la, lb in zip(pyr_a, pyr_b)]
    return ops.mean(ops.stack(per_level))


def harmonization_loss(saliency, human_maps, tokens=None, levels: int = 5, epsilon: float = 1e-5):
    """The published harmonization term between saliency maps and human feature-importance maps.

    Both are `standardize_cut`; the human maps are rescaled so that their peak equals the saliency
    map's peak (a stop-gradient on the latter, so the model cannot lower the loss by shrinking its
    saliency), then compared with `pyramidal_mse`.

    Args:
        saliency: (N, H, W) or (N, H, W, 1), e.g. `harmonization.saliency.input_gradients`.
        human_maps: same shape, e.g. ClickMe maps.
        tokens: (N,) weights, 1 where a human map exists; None means all ones.
        levels: pyramid levels compared.
        epsilon: added to the std in `standardize_cut`; finite, >= 0.

    Returns:
        A scalar in the saliency's float dtype (at least float32).
    """
    epsilon = _check_epsilon(epsilon)
    levels = check_int(levels, "levels", minimum=1, maximum=MAX_PYRAMID_LEVELS)
    saliency = _as_maps(saliency, "saliency")
    if keras.backend.standardize_dtype(saliency.dtype) in ("float16", "bfloat16"):
        saliency = ops.cast(saliency, "float32")
    human_maps = _as_maps(human_maps, "human_maps", dtype=saliency.dtype)
    _check_same_shape(saliency, human_maps, "saliency", "human_maps")
    human_maps = _check_finite(human_maps, "human_maps")
    tokens = _as_tokens(tokens, ops.shape(saliency)[0], saliency.dtype)
    return harmonization_loss_unchecked(saliency, human_maps, tokens, levels, epsilon)


def harmonization_loss_unchecked(saliency, human_maps, tokens, levels: int, epsilon):
    """`harmonization_loss` of arguments already checked: float (N, H, W) maps of one shape and dtype
    (float32 at least, human maps finite), (N,) tokens of that dtype, levels >= 1, epsilon >= 0.

    For callers that have checked their inputs (`HarmonizedModel` checks its batch once, at the start of the
    step); anyone else should call `harmonization_loss`, which checks them.
    """
    saliency_cut = _standardize_cut(saliency, epsilon)
    human_cut = _standardize_cut(human_maps, epsilon)
    human_peak = ops.max(human_cut, axis=(1, 2), keepdims=True) + PEAK_EPSILON
    saliency_peak = ops.stop_gradient(ops.max(saliency_cut, axis=(1, 2), keepdims=True)) + PEAK_EPSILON
    human_rescaled = human_cut / human_peak * saliency_peak
    return _pyramidal_mse(saliency_cut, human_rescaled, tokens, levels)


def half_squared_norm(values: Sequence):
    """sum(0.5 * ||v||^2) over `values` (variables or tensors), in float32 at least; 0.0 for none.

    TensorFlow keeps `tf.nn.l2_loss`, the published training code's term (serre-lab/Harmonization
    `training/loss.py`), so its numbers do not move; the other backends compute the same sum with keras.ops.
    """
    values = [ops.cast(v, "float32") if keras.backend.standardize_dtype(v.dtype) in ("float16", "bfloat16") else v
              for v in values]
    if not values:
        return ops.convert_to_tensor(0.0)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # on use: the TensorFlow backend's own op, the published one

        return tf.add_n([tf.nn.l2_loss(v) for v in values])
    return sum(ops.sum(ops.square(v)) for v in values) * 0.5
