"""Checks of concrete batch values (labels, tokens, human maps) in NumPy: the same rules on every backend.

TensorFlow checks a batch inside its graph (`harmonization._validation`, one assertion per argument). JAX runs the
step compiled, where a value cannot raise, and PyTorch runs it eagerly: both check the batch here, on the host,
before the step starts, so a bad batch is refused with the same sentence and changes nothing. Free of TensorFlow.
"""

from __future__ import annotations

import numpy as np


def static_rank(shape) -> int | None:
    """The rank of a static shape (a tuple, a TensorShape, a torch.Size), None when unknown."""
    if shape is None:
        return None
    try:
        return len(shape)
    except (TypeError, ValueError):  # a TensorShape of unknown rank (a relaxed tf.function trace)
        return None


def shape_text(shape) -> str:
    """A static shape for a message, also when its rank is unknown (a relaxed tf.function trace)."""
    return "of unknown rank" if static_rank(shape) is None else str(tuple(shape))


def check_same_map_shape(shape_a, shape_b, name_a: str, name_b: str) -> None:
    """Raise a ValueError naming both unless two static shapes are the same (N, H, W) (e.g. saliency and human maps).

    For backends whose shapes are known when the step is built (JAX, PyTorch); TensorFlow's graph checks dynamic
    shapes too (`harmonization._validation.check_same_shape`).
    """
    if static_rank(shape_a) != 3 or tuple(shape_a) != tuple(shape_b):
        raise ValueError(
            f"`{name_a}` and `{name_b}` must have the same shape (N, H, W); got {shape_text(shape_a)} and "
            f"{shape_text(shape_b)}. Resize the human maps to the image size (harmonization.data does this for "
            "ClickMe)."
        )


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
    rank = static_rank(shape)
    width = shape[-1] if rank == 2 else None
    if rank == 2 and width is not None and width > 1 and num_classes in (None, width):
        return "soft"
    if rank == 1 or (rank == 2 and width == 1):
        return "ids"
    classes = "C" if num_classes is None else str(num_classes)
    raise ValueError(
        f"`{name}` must be class ids of shape (N,) or (N, 1), or one-hot/soft labels of shape (N, {classes})"
        f"{'' if num_classes is None else ' (the number of logits)'}; got shape {shape_text(shape)}."
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


def host_array(value) -> np.ndarray:
    """A backend tensor (TensorFlow, JAX, PyTorch, also on a device) or array-like as a NumPy array."""
    if hasattr(value, "detach"):  # a torch tensor, maybe on a GPU or needing grad
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # NumPy has no bfloat16: widen, exactly
            value = value.float()
    return np.asarray(value)


def check_labels_on_host(labels, num_classes: int | None, name: str = "label") -> None:
    """Raise a ValueError naming `name` unless `labels` are valid class ids or one-hot/soft rows (`label_problem`)."""
    values = host_array(labels)
    problem = label_problem(values, num_classes, label_layout(values.shape, num_classes, name))
    if problem is not None:
        raise ValueError(f"`{name}` {problem}")


def check_tokens_on_host(tokens, batch_size: int, name: str = "token") -> np.ndarray:
    """(N,) float32 tokens: a missing one is 1 per example, a scalar is broadcast, (N, 1) is flattened.

    Raises a ValueError naming `name` unless there is one finite token in [0, 1] per example.
    """
    if tokens is None:
        return np.ones([batch_size], np.float32)
    values = host_array(tokens)
    if values.ndim == 0:
        values = np.full([batch_size], values)
    elif values.ndim == 2 and values.shape[-1] == 1:
        values = values[:, 0]
    if values.ndim != 1 or values.shape[0] != batch_size:
        raise ValueError(
            f"`{name}` must have one value per example, shape ({batch_size},) or ({batch_size}, 1); "
            f"got shape {values.shape}."
        )
    problem = token_problem(values)
    if problem is not None:
        raise ValueError(f"`{name}` {problem}")
    return values.astype(np.float32)


def check_finite_on_host(values, name: str) -> None:
    """Raise a ValueError naming `name` when `values` hold NaN or Inf."""
    array = host_array(values)
    if array.dtype.kind == "f" and array.size and not (np.isfinite(array.min()) and np.isfinite(array.max())):
        raise ValueError(f"`{name}` contains NaN or Inf values.")
