"""The published alignment metrics (serre-lab/Harmonization 0.0.9, `harmonization/evaluation/metrics.py`).

Same names, arguments and results as published: NumPy float64 arrays of per-map scores, maps cast to float32
first (so values that float32 cannot tell apart tie, as published). The work is done by the batched native
metrics in `harmonization.metrics`, which reproduce scipy's average-rank Spearman and numpy's linear-
interpolation percentile exactly; only the published answer for a constant map is kept here: scipy gives NaN
(the native `harmonization.metrics.spearman` gives 0.0, so that one blank map cannot turn a mean into NaN).

Backend-neutral (NumPy in, NumPy out), so that `harmonization.evaluation` imports without TensorFlow.
"""

from __future__ import annotations

import numpy as np

from harmonization import metrics

__all__ = ["EPSILON", "dice", "intersection_over_union", "spearman_correlation"]

#: Added to the Dice and IoU denominators, as published.
EPSILON = metrics.EPSILON


def _as_float32(heatmaps) -> np.ndarray:
    """The published `tf.cast(heatmaps, tf.float32).numpy()`, for NumPy arrays and any backend's tensors."""
    return to_numpy(heatmaps).astype(np.float32)


def to_numpy(values) -> np.ndarray:
    """`values` (a NumPy array, a list, or a TensorFlow, JAX or PyTorch tensor on any device) as a NumPy array."""
    if hasattr(values, "detach"):  # a PyTorch tensor: np.asarray refuses one on a GPU or that requires grad
        return values.detach().cpu().numpy()
    return np.asarray(values)


def spearman_correlation(heatmaps_a, heatmaps_b) -> np.ndarray:
    """Per-map Spearman rank correlation between two sets of heatmaps of shape (N, W, H).

    Returns:
        A float64 array (N,); NaN for a map that is constant (scipy's `spearmanr`, as published).
    """
    heatmaps_a, heatmaps_b = _as_float32(heatmaps_a), _as_float32(heatmaps_b)
    scores = to_numpy(metrics.spearman(heatmaps_a, heatmaps_b, dtype="float64")).copy()  # NaNs are set below
    flat_a = heatmaps_a.reshape(len(heatmaps_a), -1)
    flat_b = heatmaps_b.reshape(len(heatmaps_b), -1)
    constant = (np.ptp(flat_a, axis=1) == 0) | (np.ptp(flat_b, axis=1) == 0)
    scores[constant] = np.nan
    return scores


def intersection_over_union(heatmaps_a, heatmaps_b, percentile=10) -> np.ndarray:
    """Per-map IoU of the pixels above each map's `100 - percentile` percentile; a float64 array (N,)."""
    return to_numpy(metrics.iou(_as_float32(heatmaps_a), _as_float32(heatmaps_b), percentile, dtype="float64"))


def dice(heatmaps_a, heatmaps_b, percentile=10) -> np.ndarray:
    """Per-map Sorensen-Dice score of the pixels above each map's `100 - percentile` percentile; float64 (N,)."""
    return to_numpy(metrics.dice(_as_float32(heatmaps_a), _as_float32(heatmaps_b), percentile, dtype="float64"))
