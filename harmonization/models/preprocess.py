"""The published input preprocessing (serre-lab/Harmonization 0.0.9, `harmonization/models/preprocess.py`)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from harmonization.architectures.base import IMAGENET_MEAN as _MEAN
from harmonization.architectures.base import IMAGENET_STD as _STD

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "preprocess_input"]

# The constants the zoo models' in-model `ImageNetNormalization` uses: one definition for both.
IMAGENET_MEAN = np.array(_MEAN)
IMAGENET_STD = np.array(_STD)


def preprocess_input(images):
    """RGB images in [0, 255] (N, W, H, C) -> `(images / 255 - IMAGENET_MEAN) / IMAGENET_STD`, as published.

    A NumPy array comes back as a NumPy array (float64 for integer or float64 input), a float tensor as a
    tensor of its dtype; integer tensors are converted to float32 first (0.0.9 raised a dtype error).
    """
    if isinstance(images, (tf.Tensor, tf.Variable)) and not images.dtype.is_floating:
        images = tf.cast(images, tf.float32)
    images = images / 255.0
    images = images - IMAGENET_MEAN
    images = images / IMAGENET_STD
    return images
