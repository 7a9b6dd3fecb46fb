"""The harmonization loss of the neural harmonizer (Fel et al., NeurIPS 2022, arXiv 2211.04533).

Pure TensorFlow functions, each testable on its own:

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

import numpy as np
import tensorflow as tf

from harmonization._validation import as_maps, as_tokens, check_finite, check_int, check_number, check_same_shape

#: Added to both peaks before the rescaling, as in the published code.
PEAK_EPSILON = 1e-6
#: The most pyramid levels a loss compares. Halving 15 times takes any image of up to 32768 px to 1x1 (SAME
#: padding keeps a 1x1 map 1x1), so more levels only repeat the last one; a huge count (10^6) built a graph that
#: never finished. Recipes allow the same (`harmonization.recipes.SCHEMA`).
MAX_PYRAMID_LEVELS = 16


def _safe_sqrt(x: tf.Tensor) -> tf.Tensor:
    """sqrt with a finite gradient at 0: a blank map (std 0) must not turn the whole step into NaN."""
    positive = x > 0
    return tf.where(positive, tf.sqrt(tf.where(positive, x, tf.ones_like(x))), tf.zeros_like(x))


def _check_epsilon(epsilon):
    """`epsilon` unchanged after checking it is finite and >= 0 (a tensor only when its value is known).

    A negative epsilon can make std + epsilon vanish or flip its sign, an infinite one zeroes every
    map, silently. 0 is allowed here (an exact z-score; a blank map then gives NaN).
    """
    value = tf.get_static_value(epsilon) if isinstance(epsilon, (tf.Tensor, tf.Variable)) else epsilon
    if value is not None:
        check_number(value, "epsilon", minimum=0, strict=False, why=" (added to each map's std)")
    return epsilon


def standardize_cut(maps, epsilon: float = 1e-5) -> tf.Tensor:
    """Per map: subtract the mean, divide by (std + epsilon) over H, W, then ReLU.

    Args:
        maps: (N, H, W) or (N, H, W, 1) float tensor.
        epsilon: added to the standard deviation; finite, >= 0.

    Returns:
        A tensor of the input's shape.
    """
    epsilon = _check_epsilon(epsilon)
    original = tf.convert_to_tensor(maps)
    out = _standardize_cut(as_maps(original, "maps"), epsilon)
    return tf.reshape(out, tf.shape(original)) if original.shape.rank == 4 else out


def _standardize_cut(maps: tf.Tensor, epsilon) -> tf.Tensor:
    """`standardize_cut` of float (N, H, W) maps and an epsilon already checked."""
    mean = tf.reduce_mean(maps, axis=(1, 2), keepdims=True)
    centred = maps - mean
    # Population std, as tf.math.reduce_std; written out so the gradient is exact and finite.
    std = _safe_sqrt(tf.reduce_mean(tf.square(centred), axis=(1, 2), keepdims=True))
    return tf.nn.relu(centred / (std + tf.cast(epsilon, maps.dtype)))


def binomial_kernel(dtype=tf.float32) -> tf.Tensor:
    """The 5x5 binomial kernel, outer([1,4,6,4,1]) / 256, shaped (5, 5, 1, 1) for conv2d."""
    taps = np.array([1.0, 4.0, 6.0, 4.0, 1.0])
    kernel = np.outer(taps, taps)
    kernel /= kernel.sum()
    return tf.constant(kernel[:, :, None, None], dtype=dtype)


def gaussian_pyramid(maps, levels: int) -> list[tf.Tensor]:
    """Blur with the binomial kernel and downsample by 2 (SAME padding), `levels` times.

    Args:
        maps: (N, H, W) or (N, H, W, 1).
        levels: number of downsamplings (>= 0).

    Returns:
        `levels + 1` tensors of shape (N, H_k, W_k, 1), the input first.
    """
    levels = check_int(levels, "levels", minimum=0, maximum=MAX_PYRAMID_LEVELS)
    return _gaussian_pyramid(as_maps(maps, "maps")[..., None], levels)


def _gaussian_pyramid(maps: tf.Tensor, levels: int) -> list[tf.Tensor]:
    """`gaussian_pyramid` of float (N, H, W, 1) maps and a level count already checked."""
    kernel = binomial_kernel(maps.dtype)
    pyramid = [maps]
    for _ in range(levels):
        maps = tf.nn.conv2d(maps, kernel, strides=2, padding="SAME")
        pyramid.append(maps)
    return pyramid


def pyramidal_mse(a, b, tokens=None, levels: int = 5) -> tf.Tensor:
    """Mean over pyramid levels 0..levels-1 of mean((a - b)^2 * token).

    Args:
        a, b: (N, H, W) or (N, H, W, 1) maps of the same shape.
        tokens: (N,) per-example weights (1 = has a human map, 0 = none); None means all ones.
        levels: number of pyramid levels compared (the published method uses 5: levels 0..4).

    Returns:
        A scalar.
    """
    levels = check_int(levels, "levels", minimum=1, maximum=MAX_PYRAMID_LEVELS)
    a = as_maps(a, "a")
    b = as_maps(b, "b", dtype=a.dtype)
    check_same_shape(a, b, "a", "b")
    return _pyramidal_mse(a, b, as_tokens(tokens, tf.shape(a)[0], a.dtype), levels)


def _pyramidal_mse(a: tf.Tensor, b: tf.Tensor, tokens: tf.Tensor, levels: int) -> tf.Tensor:
    """`pyramidal_mse` of (N, H, W) maps of one shape and dtype, and (N,) tokens of that dtype, checked."""
    # The published code builds levels+1 maps and compares the first `levels` of them
    # (serre-lab/Harmonization `training/loss.py`, `pyramidal_mse_with_tokens`).
    pyr_a = _gaussian_pyramid(a[..., None], levels - 1)
    pyr_b = _gaussian_pyramid(b[..., None], levels - 1)
    weights = tokens[:, None, None, None]
    per_level = [tf.reduce_mean(tf.square(la - lb) * weights) for la, lb in zip(pyr_a, pyr_b)]
    return tf.reduce_mean(tf.stack(per_level))


def harmonization_loss(saliency, human_maps, tokens=None, levels: int = 5, epsilon: float = 1e-5) -> tf.Tensor:
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
    saliency = as_maps(saliency, "saliency")
    if saliency.dtype in (tf.float16, tf.bfloat16):
        saliency = tf.cast(saliency, tf.float32)
    human_maps = as_maps(human_maps, "human_maps", dtype=saliency.dtype)
    check_same_shape(saliency, human_maps, "saliency", "human_maps")
    human_maps = check_finite(human_maps, "human_maps")
    tokens = as_tokens(tokens, tf.shape(saliency)[0], saliency.dtype)
    return harmonization_loss_unchecked(saliency, human_maps, tokens, levels, epsilon)


def harmonization_loss_unchecked(
    saliency: tf.Tensor, human_maps: tf.Tensor, tokens: tf.Tensor, levels: int, epsilon
) -> tf.Tensor:
    """`harmonization_loss` of arguments already checked: float (N, H, W) maps of one shape and dtype
    (float32 at least, human maps finite), (N,) tokens of that dtype, levels >= 1, epsilon >= 0.

    For callers that have checked their inputs (`HarmonizedModel` checks its batch once, at the start of the
    step); anyone else should call `harmonization_loss`, which checks them.
    """
    saliency_cut = _standardize_cut(saliency, epsilon)
    human_cut = _standardize_cut(human_maps, epsilon)
    human_peak = tf.reduce_max(human_cut, axis=(1, 2), keepdims=True) + PEAK_EPSILON
    saliency_peak = tf.stop_gradient(tf.reduce_max(saliency_cut, axis=(1, 2), keepdims=True)) + PEAK_EPSILON
    human_rescaled = human_cut / human_peak * saliency_peak
    return _pyramidal_mse(saliency_cut, human_rescaled, tokens, levels)
