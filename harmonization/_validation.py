"""Argument checks shared by the public functions: errors that name the argument and both shapes."""

from __future__ import annotations

import tensorflow as tf


def as_maps(maps, name: str, dtype=None) -> tf.Tensor:
    """Return `maps` as a (N, H, W) tensor, accepting (N, H, W) or (N, H, W, 1).

    Raises a ValueError naming `name` when the rank or the channel count is wrong.
    """
    maps = tf.convert_to_tensor(maps)
    if dtype is not None:
        maps = tf.cast(maps, dtype)
    elif not maps.dtype.is_floating:
        maps = tf.cast(maps, tf.float32)
    rank = maps.shape.rank
    if rank == 4:
        if maps.shape[-1] is not None and maps.shape[-1] != 1:
            raise ValueError(
                f"`{name}` must have shape (N, H, W) or (N, H, W, 1); "
                f"got shape {tuple(maps.shape)} with {maps.shape[-1]} channels. "
                "Reduce the channels first (e.g. mean over the last axis)."
            )
        maps = maps[..., 0]
    elif rank != 3:
        raise ValueError(
            f"`{name}` must have shape (N, H, W) or (N, H, W, 1); got rank {rank} "
            f"with shape {tuple(maps.shape)}."
        )
    return maps


def check_same_shape(a: tf.Tensor, b: tf.Tensor, name_a: str, name_b: str) -> None:
    """Raise a ValueError when two map batches have statically different shapes."""
    if not a.shape.is_compatible_with(b.shape):
        raise ValueError(
            f"`{name_a}` and `{name_b}` must have the same shape (N, H, W); "
            f"got {tuple(a.shape)} and {tuple(b.shape)}. Resize the human maps to the "
            "image size (harmonization.data does this for ClickMe)."
        )
    # Dynamic shapes (unknown at trace time) are checked when the graph runs.
    if not (a.shape.is_fully_defined() and b.shape.is_fully_defined()):
        tf.debugging.assert_equal(
            tf.shape(a), tf.shape(b),
            message=f"`{name_a}` and `{name_b}` must have the same shape (N, H, W)",
        )


def check_finite(x: tf.Tensor, name: str) -> tf.Tensor:
    """Fail with a message naming `name` when `x` holds NaN or Inf (eagerly or in the graph)."""
    if tf.executing_eagerly():
        if not bool(tf.reduce_all(tf.math.is_finite(x))):
            raise ValueError(f"`{name}` contains NaN or Inf values.")
        return x
    return tf.debugging.assert_all_finite(x, f"`{name}` contains NaN or Inf values.")


def as_tokens(tokens, batch_size, dtype) -> tf.Tensor:
    """Return per-example weights of shape (N,), broadcasting a scalar."""
    if tokens is None:
        return tf.ones([batch_size], dtype)
    tokens = tf.cast(tf.convert_to_tensor(tokens), dtype)
    if tokens.shape.rank == 0:
        return tf.fill([batch_size], tokens)
    if tokens.shape.rank == 2 and tokens.shape[-1] == 1:
        tokens = tokens[:, 0]
    if tokens.shape.rank != 1:
        raise ValueError(
            f"`tokens` must have shape (N,) (one weight per example); got {tuple(tokens.shape)}."
        )
    return tokens
