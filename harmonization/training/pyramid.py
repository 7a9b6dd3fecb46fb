"""The published Gaussian pyramid (serre-lab/Harmonization 0.0.9, `harmonization/training/pyramid.py`)."""

from __future__ import annotations

import tensorflow as tf

from harmonization import losses

__all__ = ["pyramidal_representation"]


def channels_as_maps(images):
    """(N, H, W, C) -> ((N * C, H, W) maps, `back`): the native map functions see one map per channel, and
    `back` turns their (N * C, h, w[, 1]) results into (N, h, w, C)."""
    shape = tf.shape(images)
    maps = tf.reshape(tf.transpose(images, [0, 3, 1, 2]), [-1, shape[1], shape[2]])

    def back(result):
        result = tf.reshape(result, [shape[0], shape[3], tf.shape(result)[1], tf.shape(result)[2]])
        return tf.transpose(result, [0, 2, 3, 1])

    return maps, back


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
    maps, back = channels_as_maps(image)
    return [back(level) for level in losses.gaussian_pyramid(maps, num_levels)]
