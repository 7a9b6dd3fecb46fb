"""The published Gaussian pyramid (serre-lab/Harmonization 0.0.9, `harmonization/training/pyramid.py`)."""

from __future__ import annotations

import tensorflow as tf

from harmonization import losses

__all__ = ["pyramidal_representation"]


def pyramidal_representation(image, num_levels):
    """`num_levels + 1` levels of a (N, H, W, C) batch, each channel blurred with the 5x5 binomial kernel and
    halved (SAME padding) from the previous level; the input first. Computed by
    `harmonization.losses.gaussian_pyramid`, one channel at a time, as the published diagonal kernel does.
    """
    image = tf.convert_to_tensor(image)
    if image.shape.rank != 4:
        raise ValueError(f"`image` must have shape (N, H, W, C); got {tuple(image.shape)}.")
    if image.shape[-1] == 1:
        return losses.gaussian_pyramid(image, num_levels)
    # (N, H, W, C) -> (N * C, H, W): one map per channel, then back.
    shape = tf.shape(image)
    maps = tf.reshape(tf.transpose(image, [0, 3, 1, 2]), [-1, shape[1], shape[2]])
    levels = []
    for level in losses.gaussian_pyramid(maps, num_levels):
        height, width = tf.shape(level)[1], tf.shape(level)[2]
        level = tf.reshape(level, [shape[0], shape[3], height, width])
        levels.append(tf.transpose(level, [0, 2, 3, 1]))
    return levels
