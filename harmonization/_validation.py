"""Argument checks shared by the public functions: errors that name the argument, what was expected and what came.

Checks of values run eagerly as ValueErrors and, inside a `tf.function`, as one assertion per argument
(an InvalidArgumentError when the graph runs). XLA (`jit_compile=True`) drops assertions.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

# The number checks live apart, free of TensorFlow, for NumPy-only modules (`harmonization.synthetic`); they are
# part of this module's interface.
from harmonization._numbers import INT64_MAX, check_int, check_number, is_int, is_number  # noqa: F401

# The checks of concrete values live apart, free of TensorFlow, for the JAX and PyTorch steps; they are part of
# this module's interface too.
from harmonization._host_checks import label_layout, label_problem, shape_text, token_problem  # noqa: F401


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
            f"with shape {_shape(maps.shape)}."
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


# ----------------------------------------------------------------------------- labels and tokens
def _shape(shape) -> str:
    """A static shape for a message, also when its rank is unknown (a relaxed tf.function trace)."""
    return shape_text(tf.TensorShape(shape) if not isinstance(shape, tf.TensorShape) else shape)


def _assert_in_graph(ok: tf.Tensor, message: str, details: list, value: tf.Tensor) -> tf.Tensor:
    """`value` behind one tf.debugging.Assert (an InvalidArgumentError carrying `message` when run)."""
    assertion = tf.debugging.Assert(ok, [message, *details], summarize=8)
    with tf.control_dependencies([assertion]):
        return tf.identity(value)


def check_class_labels(labels, num_classes: int | None, name: str = "label") -> tf.Tensor:
    """Return `labels` as a tensor after checking them against `num_classes` (see `label_problem`).

    Eagerly a ValueError; inside a tf.function one assertion, run before anything that depends on
    the returned tensor (an InvalidArgumentError naming `name`). Values are returned unchanged.
    """
    labels = tf.convert_to_tensor(labels)
    layout = label_layout(labels.shape, num_classes, name)
    if tf.executing_eagerly():
        problem = label_problem(labels.numpy(), num_classes, layout)
        if problem is not None:
            raise ValueError(f"`{name}` {problem}")
        return labels
    if not (labels.dtype.is_integer or labels.dtype.is_floating or labels.dtype == tf.bool):
        raise ValueError(f"`{name}` must be numeric; got dtype {labels.dtype.name}.")
    if layout == "soft":
        rows = labels if labels.dtype.is_floating else tf.cast(labels, tf.float32)
        ok = tf.reduce_all(tf.math.is_finite(rows) & (rows >= 0), axis=1) & (tf.reduce_sum(rows, axis=1) > 0)
        message = f"`{name}`: one-hot/soft rows must be finite, >= 0 and not all zero; offending rows:"
        return _assert_in_graph(tf.reduce_all(ok), message, [tf.boolean_mask(rows, ~ok)], labels)
    ids = tf.reshape(labels, [-1])
    if ids.dtype.is_floating:
        ok = tf.math.is_finite(ids) & tf.equal(ids, tf.round(ids)) & (ids >= 0)
    else:
        ids = tf.cast(ids, tf.int64)  # bool and unsigned too: a uint64 beyond int64 turns negative (refused)
        ok = ids >= 0
    if num_classes is not None:
        ok &= ids < tf.cast(num_classes, ids.dtype)
    allowed = "[0, num_classes)" if num_classes is None else f"[0, {num_classes}) (num_classes = {num_classes})"
    message = f"`{name}` must hold whole-number class ids in {allowed}; offending values:"
    return _assert_in_graph(tf.reduce_all(ok), message, [tf.boolean_mask(ids, ~ok)], labels)


def as_tokens(tokens, batch_size, dtype, name: str = "tokens", check_values: bool = False) -> tf.Tensor:
    """Return per-example weights of shape (N,), broadcasting a scalar and flattening (N, 1).

    With `check_values`, also require one token per example, finite and in [0, 1] (a ValueError
    eagerly, one assertion in a graph), as for training tokens; without, any weights are accepted.
    """
    if tokens is None:
        return tf.ones([batch_size], dtype)
    tokens = tf.convert_to_tensor(tokens)
    if tokens.shape.rank == 0:
        tokens = tf.fill([batch_size], tokens)
    elif tokens.shape.rank == 2 and tokens.shape[-1] == 1:
        tokens = tokens[:, 0]
    elif tokens.shape.rank is None and check_values and not tf.executing_eagerly():
        tokens = tf.reshape(tokens, [-1])  # a relaxed trace: the assertion below checks one per example
    if tokens.shape.rank != 1:
        raise ValueError(
            f"`{name}` must have shape (N,) or (N, 1) (one weight per example); got shape {_shape(tokens.shape)}."
        )
    if not check_values:
        return tf.cast(tokens, dtype)
    known = tf.get_static_value(batch_size)
    if known is not None and tokens.shape[0] is not None and tokens.shape[0] != known:
        raise ValueError(
            f"`{name}` must have one value per example, shape ({known},) or ({known}, 1); "
            f"got shape {_shape(tokens.shape)}."
        )
    if tf.executing_eagerly():
        problem = token_problem(tokens.numpy())
        if problem is not None:
            raise ValueError(f"`{name}` {problem}")
        return tf.cast(tokens, dtype)
    if not (tokens.dtype.is_integer or tokens.dtype.is_floating or tokens.dtype == tf.bool):
        raise ValueError(f"`{name}` must be numeric; got dtype {tokens.dtype.name}.")
    tokens = tf.cast(tokens, dtype)
    ok = tf.math.is_finite(tokens) & (tokens >= 0) & (tokens <= 1)
    one_each = tf.equal(tf.size(tokens), tf.cast(batch_size, tf.int32))
    message = (
        f"`{name}` must hold one finite value in [0, 1] per example, shape (N,) or (N, 1); "
        "batch size, token shape and offending values:"
    )
    details = [tf.cast(batch_size, tf.int32), tf.shape(tokens), tf.boolean_mask(tokens, ~ok)]
    return _assert_in_graph(one_each & tf.reduce_all(ok), message, details, tokens)
