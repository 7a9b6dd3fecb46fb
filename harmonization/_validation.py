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
    shape = tf.TensorShape(shape)
    return "of unknown rank" if shape.rank is None else str(tuple(shape))


def _preview(values: np.ndarray, limit: int = 8) -> str:
    """The first `limit` values of an array for an error message, and how many there are."""
    values = np.asarray(values).reshape(-1)
    shown = np.array2string(values[:limit], separator=", ", threshold=limit + 1)
    return shown if values.size <= limit else f"{shown[:-1]}, ...] ({values.size} in all)"


def label_layout(shape, num_classes: int | None, name: str = "label") -> str:
    """"ids" for class ids (N,) or (N, 1), "soft" for one-hot/soft labels (N, C); a ValueError otherwise.

    The same reading as `harmonization.saliency.one_hot_labels`. Without `num_classes` (an explainer
    whose class count is unknown), any (N, C > 1) is read as one-hot.
    """
    shape = tf.TensorShape(shape)
    width = shape[-1] if shape.rank == 2 else None
    if shape.rank == 2 and width is not None and width > 1 and num_classes in (None, width):
        return "soft"
    if shape.rank == 1 or (shape.rank == 2 and width == 1):
        return "ids"
    classes = "C" if num_classes is None else str(num_classes)
    raise ValueError(
        f"`{name}` must be class ids of shape (N,) or (N, 1), or one-hot/soft labels of shape (N, {classes})"
        f"{'' if num_classes is None else ' (the number of logits)'}; got shape {_shape(shape)}."
    )


def label_problem(labels: np.ndarray, num_classes: int | None, layout: str) -> str | None:
    """What is wrong with NumPy `labels` (completing "`label` ..."), or None when they are valid.

    Class ids must be whole numbers in [0, num_classes) (tf.one_hot turns any other id into an all-zero
    row, which trains and scores nothing, silently); float ids are not rounded. One-hot/soft rows must
    be finite, >= 0 and not all zero. Without `num_classes` only the lower bound is checked.
    """
    if not (np.issubdtype(labels.dtype, np.number) or labels.dtype == np.bool_):
        return f"must be numeric; got dtype {labels.dtype}."
    if layout == "soft":
        rows = labels.astype(np.float64)
        bad = ~(np.all(np.isfinite(rows) & (rows >= 0), axis=1) & (np.sum(rows, axis=1) > 0))
        if not bad.any():
            return None
        return (
            "one-hot/soft rows must be finite, >= 0 and not all zero (an all-zero row trains and scores "
            f"nothing); got {int(bad.sum())} such row(s), at index {_preview(np.flatnonzero(bad))}: "
            f"{_preview(rows[bad][:2])}."
        )
    ids = labels.reshape(-1)
    allowed = "[0, num_classes)" if num_classes is None else f"[0, {num_classes}) (num_classes = {num_classes})"
    if np.issubdtype(ids.dtype, np.floating):
        ids = ids.astype(np.float64)
        whole = np.isfinite(ids) & (ids == np.round(ids))
    else:
        ids = ids.astype(np.int64) if ids.dtype != np.uint64 else ids.astype(np.float64)
        whole = np.ones(ids.shape, bool)
    inside = whole & (ids >= 0) & (True if num_classes is None else ids < num_classes)
    if inside.all():
        return None
    problems = []
    if not whole.all():
        problems.append(f"value(s) that are not whole numbers (float labels are not rounded): {_preview(ids[~whole])}")
    outside = whole & ~inside
    if outside.any():
        problems.append(f"out-of-range value(s) {_preview(ids[outside])}")
    return (
        f"must hold class ids in {allowed}; got " + " and ".join(problems)
        + f", at index {_preview(np.flatnonzero(~inside))}."
    )


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


def token_problem(tokens: np.ndarray) -> str | None:
    """What is wrong with NumPy (N,) `tokens` (completing "`token` ..."), or None when they are valid.

    A token weights an example's harmonization term: outside [0, 1] (e.g. -1) it would reverse or
    inflate it silently.
    """
    if not (np.issubdtype(tokens.dtype, np.number) or tokens.dtype == np.bool_):
        return f"must be numeric; got dtype {tokens.dtype}."
    values = tokens.astype(np.float64)
    bad = ~(np.isfinite(values) & (values >= 0) & (values <= 1))
    if not bad.any():
        return None
    return (
        "must be finite and in [0, 1] (1 = the example has a human map, 0 = none); got "
        f"{_preview(values[bad])} at index {_preview(np.flatnonzero(bad))}."
    )


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
