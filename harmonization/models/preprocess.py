"""The published input preprocessing (serre-lab/Harmonization 0.0.9, `harmonization/models/preprocess.py`).

Backend-neutral: NumPy arrays and the tensors of any Keras backend, so that the 0.0.9 model API
(`harmonization.models`) works without TensorFlow too.
"""

from __future__ import annotations

import sys

import numpy as np

from harmonization.architectures.base import IMAGENET_MEAN as _MEAN
from harmonization.architectures.base import IMAGENET_STD as _STD

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "preprocess_input"]

# The constants the zoo models' in-model `ImageNetNormalization` uses: one definition for both.
IMAGENET_MEAN = np.array(_MEAN)
IMAGENET_STD = np.array(_STD)


def preprocess_input(images):
    """RGB images in [0, 255] (N, W, H, C) -> `(images / 255 - IMAGENET_MEAN) / IMAGENET_STD`, as published.

    A NumPy array comes back as a NumPy array (float64 for integer or float64 input), a float tensor (TensorFlow's
    or the Keras backend's) as a tensor of its dtype; integer tensors are converted to float32 first (0.0.9
    raised a dtype error).
    """
    tf = sys.modules.get("tensorflow")  # a TensorFlow tensor exists only once TensorFlow is imported
    if tf is not None and isinstance(images, (tf.Tensor, tf.Variable)):
        # The published arithmetic; also a tf.data map's symbolic tensor under JAX or PyTorch.
        if not images.dtype.is_floating:
            images = tf.cast(images, tf.float32)
    elif not isinstance(images, np.ndarray) and _is_backend_tensor(images):
        return _backend_preprocess(images)
    images = images / 255.0
    images = images - IMAGENET_MEAN
    images = images / IMAGENET_STD
    return images


def _is_backend_tensor(images) -> bool:
    """Whether `images` is a tensor of the Keras backend (JAX or PyTorch; TensorFlow's are handled before)."""
    import keras  # here: only for a tensor, so that importing this module stays light

    return keras.ops.is_tensor(images)


def _backend_preprocess(images):
    """`preprocess_input` in the tensor's own dtype with Keras ops: NumPy's float64 constants would promote a
    PyTorch float32 tensor to float64."""
    import keras  # here: only for a tensor, so that importing this module stays light

    dtype = keras.backend.standardize_dtype(images.dtype)
    if "float" not in dtype:
        images, dtype = keras.ops.cast(images, "float32"), "float32"
    mean = keras.ops.convert_to_tensor(IMAGENET_MEAN, dtype=dtype)
    std = keras.ops.convert_to_tensor(IMAGENET_STD, dtype=dtype)
    return (images / keras.ops.convert_to_tensor(255.0, dtype=dtype) - mean) / std
