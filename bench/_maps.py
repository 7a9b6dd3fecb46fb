"""The maps the Spearman benchmarks score, with NumPy only (bench/gpu/run.py runs where TensorFlow is absent)."""

from __future__ import annotations

import numpy as np


def make_maps(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return (saliency-like, human-like) float32 maps of shape (n, size, size).

    Saliency-like: continuous and non-negative (|gradient|-like); human-like: a ClickMe map, mostly exact zeros
    (ties) with one or two blobs of clicks.
    """
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size].astype(np.float32)
    human = np.zeros((n, size, size), np.float32)
    for i in range(n):
        for _ in range(rng.integers(1, 3)):
            r, c = rng.uniform(0.2, 0.8, 2) * size
            sigma = rng.uniform(0.04, 0.1) * size
            blob = np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * sigma**2))
            human[i] += np.where(blob > 0.05, blob, 0.0)
    saliency = np.abs(rng.normal(size=(n, size, size))).astype(np.float32) + 0.5 * human
    return saliency, human
