"""The published Gaussian blur of ClickMe maps (serre-lab/Harmonization 0.0.9, `harmonization/common/blur.py`).

The kernel and the convolution are `harmonization.data.gaussian_kernel` and `harmonization.data.blur_heatmaps`;
this module gives them the published names, shapes and dtypes.
"""

from __future__ import annotations

import tensorflow as tf

from harmonization import data

__all__ = ["BLUR_KERNEL_SIZE", "BLUR_SIGMA", "gaussian_blur", "gaussian_kernel"]

#: Published defaults: a 10x10 kernel with sigma 10 (pixels of the 64x64 map).
BLUR_KERNEL_SIZE = data.PUBLISHED_BLUR_SIZE
BLUR_SIGMA = 10


def gaussian_kernel(size=BLUR_KERNEL_SIZE, sigma=BLUR_SIGMA) -> tf.Tensor:
    """The normalised 2-D Gaussian kernel as published: a float32 tensor (size, size, 1, 1) summing to 1."""
    return tf.constant(data.gaussian_kernel(size, sigma)[:, :, None, None], tf.float32)


def gaussian_blur(heatmap, kernel) -> tf.Tensor:
    """Blur one heatmap (H, W, 1) with `kernel` (zero SAME padding); returns (H, W, 1)."""
    return data.blur_heatmaps(heatmap, kernel=kernel)
