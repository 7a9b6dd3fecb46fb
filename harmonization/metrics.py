"""Human-alignment metrics: how much a model's saliency map agrees with a human feature-importance map.

The neural harmonizer (Fel et al., NeurIPS 2022, arXiv 2211.04533) reports alignment with ClickMe maps
as the per-image Spearman rank correlation between the saliency map and the human map, divided by the
human inter-rater ceiling (`alignment_score`). Dice and IoU of the top `percentile` % pixels of each map
are reported alongside.

All three per-image metrics are batched TensorFlow: one sort per map, no Python loop over images, so
they run on a GPU, inside `tf.function` and under XLA (`jit_compile=True`): every shape is static.
Maps are (N, H, W) or (N, H, W, 1); the result is a float32 tensor of shape (N,). In a graph, NaN or
Inf in the maps fail with an InvalidArgumentError instead of the eager ValueError.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import tensorflow as tf

from harmonization._validation import as_maps, check_finite, check_same_shape

#: Mean Spearman correlation between two human ClickMe maps of the same image: the best a model can
#: be expected to reach, used to normalise the alignment score (arXiv 2211.04533).
HUMAN_CEILING = 0.65753

#: Added to the Dice and IoU denominators, as published (serre-lab/Harmonization,
#: harmonization/evaluation/metrics.py: `EPSILON = 1e-9`); two empty masks score 0 / 1e-9 = 0.
EPSILON = 1e-9


def _as_map_pair(a, b) -> tuple[tf.Tensor, tf.Tensor]:
    """Validate two map batches and return them flattened to (N, H*W)."""
    a, b = tf.convert_to_tensor(a), tf.convert_to_tensor(b)
    # Integers are ranked exactly in float64; float32 would merge distinct values above 2**24.
    a = as_maps(a, "a", tf.float64 if not a.dtype.is_floating else None)
    b = as_maps(b, "b", tf.float64 if not b.dtype.is_floating else None)
    check_same_shape(a, b, "a", "b")
    if a.shape[1:].num_elements() == 0:
        raise ValueError(f"`a` and `b` must have at least one pixel per map; got shape {tuple(a.shape)}.")
    a = check_finite(a, "a")
    b = check_finite(b, "b")
    n = tf.shape(a)[0]
    return tf.reshape(a, [n, -1]), tf.reshape(b, [n, -1])


def average_ranks(values) -> tf.Tensor:
    """Rank each row of `values` (N, P) from 1 to P; tied values share the mean of their positions.

    The batched equivalent of `scipy.stats.rankdata(row, method="average")`. Why not a plain argsort:
    human maps are mostly zeros, and their ties must share one rank for Spearman to be right.

    Returns:
        The *doubled* ranks, an int64 tensor (N, P): average ranks are half-integers, and doubling keeps
        them exact for any map size (`tf.cast(r, tf.float64) / 2` gives the ranks).
    """
    values = tf.convert_to_tensor(values)
    if values.shape.rank != 2:
        raise ValueError(f"`values` must have shape (N, P); got {tuple(values.shape)}.")
    n, p = tf.shape(values)[0], tf.shape(values)[1]
    # One descending sort per row gives the sorted values and the pixel each came from.
    sorted_values, order = tf.math.top_k(values, k=p, sorted=True)
    # Runs of equal values; ids are unique across rows (row * p + run within the row) and < n * p, so
    # every shape below is static: this also compiles with XLA.
    is_start = tf.concat(
        [tf.ones([n, 1], tf.bool), tf.not_equal(sorted_values[:, 1:], sorted_values[:, :-1])], axis=1
    )
    row_offset = tf.range(n)[:, None] * p
    run = tf.cumsum(tf.cast(is_start, tf.int32), axis=1) - 1 + row_offset
    position = tf.broadcast_to(tf.range(p)[None, :], [n, p])
    first = tf.math.unsorted_segment_min(position, run, n * p)
    count = tf.math.unsorted_segment_sum(tf.ones_like(position), run, n * p)
    # Descending positions first .. first+count-1 are ascending ranks p-first .. p-first-count+1;
    # twice their mean is an integer.
    doubled_run_rank = tf.cast(2 * (p - first) - count + 1, tf.int64)
    doubled_sorted = tf.gather(doubled_run_rank, run)
    # Back to pixel order: the value at sorted position j of row i came from pixel order[i, j].
    pixel = tf.reshape(order + row_offset, [-1, 1])
    doubled = tf.scatter_nd(pixel, tf.reshape(doubled_sorted, [-1]), tf.reshape(n * p, [1]))
    return tf.reshape(doubled, [n, p])


def spearman(a, b, *, dtype=tf.float32) -> tf.Tensor:
    """Per-map Spearman rank correlation between two batches of maps, ties ranked by their average.

    Equal to `scipy.stats.spearmanr(a[i].ravel(), b[i].ravel())` for each i, except for a constant map:
    it ranks nothing, so it gets 0.0 (no agreement) where scipy returns NaN, and one blank map cannot
    turn a dataset's mean into NaN. The correlation is computed in float64, exact for 224x224 maps.

    Args:
        a: (N, H, W) or (N, H, W, 1) maps, e.g. model saliency.
        b: maps of the same shape, e.g. human feature importance.
        dtype: float dtype of the result. Defaults to float32; float64 returns the computation as is.

    Returns:
        A tensor (N,) in [-1, 1].
    """
    a, b = _as_map_pair(a, b)
    n = tf.shape(a)[0]
    if a.dtype != b.dtype:
        # Widening is exact and keeps the order (and the ties) of each map.
        a, b = tf.cast(a, tf.float64), tf.cast(b, tf.float64)
    # One sort for both batches.
    doubled = average_ranks(tf.concat([a, b], axis=0))
    p = tf.cast(tf.shape(a)[1], tf.int64)
    # Twice the rank minus twice the mean rank: integers, so the float64 sums below are exact
    # (as long as P**3 < 2**53, i.e. up to ~450x450 maps).
    centred = tf.cast(doubled - (p + 1), tf.float64)
    ca, cb = centred[:n], centred[n:]
    covariance = tf.reduce_sum(ca * cb, axis=1)
    scale = tf.sqrt(tf.reduce_sum(ca * ca, axis=1) * tf.reduce_sum(cb * cb, axis=1))
    safe_scale = tf.where(scale > 0, scale, tf.ones_like(scale))
    rho = tf.where(scale > 0, covariance / safe_scale, tf.zeros_like(scale))
    return tf.cast(tf.clip_by_value(rho, -1.0, 1.0), dtype)


def _check_ceiling(ceiling) -> float:
    """Return `ceiling` as a float, or raise a ValueError unless it is a finite number > 0."""
    if (
        isinstance(ceiling, (bool, np.bool_))
        or not isinstance(ceiling, numbers.Real)
        or not math.isfinite(float(ceiling))
        or ceiling <= 0
    ):
        raise ValueError(f"`ceiling` must be a finite number > 0; got {ceiling!r}.")
    return float(ceiling)


def _check_percentile(percentile) -> float:
    """Return `percentile` as a float, or raise a ValueError unless 0 < percentile < 100."""
    if (
        isinstance(percentile, (bool, np.bool_))
        or not isinstance(percentile, numbers.Real)
        or not math.isfinite(float(percentile))
        or not 0 < float(percentile) < 100
    ):
        raise ValueError(
            f"`percentile` must be a number strictly between 0 and 100 (the share of pixels kept, "
            f"in %); got {percentile!r}."
        )
    return float(percentile)


def _top_percentile_masks(maps: tf.Tensor, percentile: float) -> tf.Tensor:
    """Per row of `maps` (N, P): `row > np.percentile(row, 100 - percentile)`, as a boolean tensor.

    Reproduces numpy's default ("linear") interpolation step by step, in the maps' dtype, so that
    the threshold, and hence the mask, is the one numpy computes for a Python-number percentile.
    """
    p = tf.shape(maps)[1]
    quantile = (100.0 - percentile) / 100.0
    virtual_index = tf.cast(p - 1, tf.float64) * quantile
    below = tf.minimum(tf.floor(virtual_index), tf.cast(p - 1, tf.float64))
    gamma = virtual_index - below
    below = tf.cast(below, tf.int32)
    above = tf.minimum(below + 1, p - 1)
    # Only the top p - below values are needed; top_k is descending, so ascending index i is p-1-i.
    top = tf.math.top_k(maps, k=p - below, sorted=True).values
    low_value = top[:, p - 1 - below]
    high_value = top[:, p - 1 - above]
    diff = high_value - low_value
    # numpy's _lerp: a + (b - a) * t, or b - (b - a) * (1 - t) when t >= 0.5.
    threshold = tf.where(
        gamma >= 0.5,
        high_value - diff * tf.cast(1.0 - gamma, maps.dtype),
        low_value + diff * tf.cast(gamma, maps.dtype),
    )
    return maps > threshold[:, None]


def _overlaps(a, b, percentile) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Return |A & B|, |A| + |B| and |A | B| (float32, (N,)) of the top-`percentile` % masks."""
    percentile = _check_percentile(percentile)
    a, b = _as_map_pair(a, b)
    mask_a = _top_percentile_masks(a, percentile)
    mask_b = _top_percentile_masks(b, percentile)

    def count(mask):
        return tf.reduce_sum(tf.cast(mask, tf.float32), axis=1)

    intersection = count(tf.logical_and(mask_a, mask_b))
    return intersection, count(mask_a) + count(mask_b), count(tf.logical_or(mask_a, mask_b))


def _published_ratio(numerator: tf.Tensor, denominator: tf.Tensor, dtype=tf.float32) -> tf.Tensor:
    """numerator / (denominator + EPSILON), the published Dice and IoU formula, cast to `dtype`.

    Computed in float64 like the published IoU (numpy counts are int64); the pixel counts are exact.
    """
    numerator, denominator = tf.cast(numerator, tf.float64), tf.cast(denominator, tf.float64)
    return tf.cast(numerator / (denominator + EPSILON), dtype)


def dice(a, b, percentile: float = 10, *, dtype=tf.float32) -> tf.Tensor:
    """Per-map Dice coefficient 2|A & B| / (|A| + |B|) of the top `percentile` % pixels of each map.

    Each map is binarised as published: `m > np.percentile(m, 100 - percentile)` (linear
    interpolation), so ties at the threshold are left out and a mostly-zero human map keeps only its
    non-zero pixels. The denominator gets the published `EPSILON` (1e-9), so two empty masks (e.g. two
    constant maps) score 0.0.

    Args:
        a: (N, H, W) or (N, H, W, 1) maps.
        b: maps of the same shape.
        percentile: share of pixels kept per map, in %, strictly between 0 and 100.
        dtype: float dtype of the result (computed in float64). Defaults to float32.

    Returns:
        A tensor (N,) in [0, 1].
    """
    intersection, sizes, _ = _overlaps(a, b, percentile)
    return _published_ratio(2.0 * intersection, sizes, dtype)


def iou(a, b, percentile: float = 10, *, dtype=tf.float32) -> tf.Tensor:
    """Per-map intersection over union |A & B| / |A | B| of the top `percentile` % pixels of each map.

    Binarised like `dice`; the denominator gets the published `EPSILON`, so two empty masks score 0.0.
    `dtype` is the result's float dtype (computed in float64; default float32).

    Returns:
        A tensor (N,) in [0, 1].
    """
    intersection, _, union = _overlaps(a, b, percentile)
    return _published_ratio(intersection, union, dtype)


def alignment_score(spearmans, ceiling: float = HUMAN_CEILING) -> float:
    """Human alignment: the mean per-image Spearman correlation divided by the human ceiling.

    1.0 means the model agrees with a person as well as two people agree with each other.

    Args:
        spearmans: per-image Spearman correlations, shape (N,) with N >= 1 (e.g. from `spearman`).
        ceiling: the human inter-rater Spearman correlation; defaults to ClickMe's, `HUMAN_CEILING`.

    Returns:
        A Python float.
    """
    ceiling = _check_ceiling(ceiling)
    values = np.asarray(spearmans.numpy() if isinstance(spearmans, tf.Tensor) else spearmans)
    if values.ndim != 1 or values.size == 0 or not np.issubdtype(values.dtype, np.number):
        raise ValueError(
            "`spearmans` must be a non-empty 1-D array of per-image correlations; "
            f"got shape {values.shape} and dtype {values.dtype}."
        )
    values = values.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError(
            f"`spearmans` contains {int(np.sum(~np.isfinite(values)))} NaN or Inf value(s)."
        )
    return float(np.mean(values) / ceiling)
