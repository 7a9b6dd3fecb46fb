"""Human-alignment metrics: how much a model's saliency map agrees with a human feature-importance map.

The neural harmonizer (Fel et al., NeurIPS 2022, arXiv 2211.04533) reports alignment with ClickMe maps
as the per-image Spearman rank correlation between the saliency map and the human map, divided by the
human inter-rater ceiling (`alignment_score`). Dice and IoU of the top `percentile` % pixels of each map
(`top_percentile_masks`, compared by `top_percentile_overlap`) are reported alongside. `DEFAULT_METRICS`
names the per-image metrics `evaluate_alignment` reports: a metric is added there, in this file only.

On the TensorFlow backend, all three per-image metrics are batched TensorFlow (one sort per map, many
maps per op), so they run on a GPU, inside `tf.function` and under XLA (`jit_compile=True`): every shape
is static. Maps are (N, H, W) or (N, H, W, 1); the result is a float32 tensor of shape (N,). In a graph,
NaN or Inf in the maps fail with an InvalidArgumentError instead of the eager ValueError.

On the JAX and PyTorch backends (where TensorFlow may not be installed) the metrics are NumPy: maps may
be NumPy arrays or tensors of any backend, on any device (they are copied to the host), and the result
is a NumPy array (float32 by default). They return the same numbers as the TensorFlow path (the same
integer ranks and exact sums for Spearman, numpy's own percentile for the masks), and refuse the same
inputs with the same ValueErrors. Metrics are scored once per batch after the saliency is computed, so
the host copy is small next to the saliency's backward pass. Inside a compiled JAX function they need a host
callback (`jax.pure_callback`), as the JAX harmonized step's validation Spearman does. One exception:
`spearman` of maps that already live on an accelerator (a JAX array on a GPU or TPU, a PyTorch CUDA tensor)
ranks them there, with the backend's own ops (`harmonization._spearman_device`): sorting on the host is
then what costs, not the copy. Its result is still a NumPy array, and still the same numbers.

Large batches are scored `CHUNK_PIXELS` pixels (whole maps) at a time, so that memory stays a small
multiple of the maps themselves: eagerly with a Python loop, in a graph whose shapes are known with a
sequential `tf.while_loop` of static-shape steps (which XLA compiles too). Eagerly, valid NumPy maps
are read in place rather than converted to tensors (TensorFlow copies a large array once or twice).

On TensorFlow, executed eagerly on a machine with no GPU or TPU, `spearman` ranks with NumPy, a map or a few
at a time: TensorFlow's full CPU sort is several times slower than NumPy's. Both paths compute the same
integer ranks and the same exact sums, so they return identical results.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
from types import MappingProxyType
from typing import Callable, Iterator, Mapping, NamedTuple

import keras
import numpy as np

from harmonization import _backend, _spearman_device
from harmonization._host_checks import check_finite_on_host, host_array

#: Whether the metrics run as TensorFlow ops (the TensorFlow backend) or NumPy (JAX, PyTorch): Keras picks its
#: backend once per process, before this module is imported.
_ON_TENSORFLOW = _backend.is_tensorflow()
if _ON_TENSORFLOW:
    # Only the TensorFlow backend needs TensorFlow here: on JAX and PyTorch it may not be installed.
    import tensorflow as tf

    # The tensor checks are TensorFlow code, as the path that uses them.
    from harmonization._validation import as_maps, check_finite, check_same_shape

#: Mean Spearman correlation between two human ClickMe maps of the same image: the best a model can
#: be expected to reach, used to normalise the alignment score (arXiv 2211.04533).
HUMAN_CEILING = 0.65753

#: Added to the Dice and IoU denominators, as published (serre-lab/Harmonization,
#: harmonization/evaluation/metrics.py: `EPSILON = 1e-9`); two empty masks score 0 / 1e-9 = 0.
EPSILON = 1e-9


#: The most pixels (whole maps, at least one) that one step of a metric works on: a batch of maps larger
#: than this is scored in chunks, so that the metric's working memory stays ~0.5 GiB whatever the batch
#: (a sort of 1M pixels and its bookkeeping), next to a copy of the maps. 2**20 is 20 maps of 224x224.
CHUNK_PIXELS = 1 << 20

#: The NumPy Spearman path works on at most this many pixels at a time (one 224x224 map): its sorts and
#: gathers then stay in the CPU caches, which is faster than bigger chunks.
_NUMPY_BLOCK_PIXELS = 1 << 16


def _chunk_maps(pixels_per_map: int, chunk_pixels: int) -> int:
    """How many maps of `pixels_per_map` pixels fit in `chunk_pixels` (at least one)."""
    return max(1, int(chunk_pixels) // max(1, int(pixels_per_map)))


def _by_chunks(fn, a: tf.Tensor, b: tf.Tensor, out_dtypes) -> list[tf.Tensor]:
    """Apply `fn` to two (N, P) batches `CHUNK_PIXELS` at a time and concatenate its per-row results.

    `fn(a_rows, b_rows)` returns a tuple of (rows,) tensors of `out_dtypes`, each row depending only on
    that row of `a` and `b`. `a` and `b` are tensors, or (eagerly) NumPy arrays from `_map_pair`, whose
    chunks become the tensors `_as_map_pair` would have made.

    Eagerly: a Python loop over slices. In a graph whose N and P are known: a `tf.while_loop` over the
    full chunks, one at a time (`parallel_iterations=1`; every slice has a static shape, so XLA compiles
    it too), then one call for the remainder. With N or P unknown until run time: one call for the whole
    batch, unchunked.
    """
    if tf.executing_eagerly():
        n, p = a.shape
        step = _chunk_maps(p, CHUNK_PIXELS)
        parts = [
            fn(_as_tensor(a[i : i + step]), _as_tensor(b[i : i + step])) for i in range(0, max(n, 1), step)
        ]
        return [tf.concat(list(column), axis=0) if len(parts) > 1 else column[0] for column in zip(*parts)]

    n, p = a.shape[0], a.shape[1]
    if n is None or p is None:
        return list(fn(a, b))
    step = _chunk_maps(p, CHUNK_PIXELS)
    full = n // step
    if full <= 1:
        return list(fn(a, b))

    def body(i, *arrays):
        begin = [i * step, 0]
        results = fn(tf.slice(a, begin, [step, p]), tf.slice(b, begin, [step, p]))
        return (i + 1, *[array.write(i, result) for array, result in zip(arrays, results)])

    arrays = [tf.TensorArray(d, size=full, element_shape=[step]) for d in out_dtypes]
    _, *arrays = tf.while_loop(
        lambda i, *_: i < full, body, (tf.constant(0), *arrays), parallel_iterations=1
    )
    columns = [tf.reshape(array.stack(), [full * step]) for array in arrays]
    if full * step < n:
        tail = fn(a[full * step :], b[full * step :])
        columns = [tf.concat([column, last], axis=0) for column, last in zip(columns, tail)]
    return columns


def _as_map_pair(a, b) -> tuple[tf.Tensor, tf.Tensor]:
    """Validate two map batches and return them flattened to (N, H*W)."""
    a, b = tf.convert_to_tensor(a), tf.convert_to_tensor(b)
    # Integers are ranked exactly in float64; float32 would merge distinct values above 2**24.
    a = as_maps(a, "a", tf.float64 if not a.dtype.is_floating else None)
    b = as_maps(b, "b", tf.float64 if not b.dtype.is_floating else None)
    check_same_shape(a, b, "a", "b")
    if a.shape[1:].num_elements() == 0:
        raise ValueError(f"`a` and `b` must have at least one pixel per map; got shape {tuple(a.shape)}.")
    a = check_finite(a, "a")
    b = check_finite(b, "b")
    n = tf.shape(a)[0]
    return tf.reshape(a, [n, -1]), tf.reshape(b, [n, -1])


def _as_tensor(maps) -> tf.Tensor:
    """A chunk of `_map_pair`'s maps as a tensor, with `_as_map_pair`'s dtype (integers become float64)."""
    if isinstance(maps, np.ndarray) and maps.dtype.kind != "f":
        maps = maps.astype(np.float64)
    return tf.convert_to_tensor(maps)


def _numpy_map_pair(a, b) -> tuple[np.ndarray, np.ndarray] | None:
    """Two NumPy map batches as (N, P) views, if `_as_map_pair` would accept them; else None.

    Converting a large NumPy array to a tensor costs one or two copies of it; this takes none. On None
    (not NumPy, or anything `_as_map_pair` may reject), the caller validates with `_as_map_pair`, which
    raises its usual errors.
    """
    maps = []
    for x in (a, b):
        if not isinstance(x, np.ndarray) or x.dtype.kind not in "fiub" or x.dtype.itemsize > 8:
            return None
        if x.ndim == 4 and x.shape[-1] == 1:
            x = x[..., 0]
        if x.ndim != 3 or x.shape[1] * x.shape[2] == 0:
            return None
        # min and max are NaN if any value is, and +-Inf if any value is: no (N, H, W) mask needed.
        if x.dtype.kind == "f" and x.size and not (np.isfinite(x.min()) and np.isfinite(x.max())):
            return None
        maps.append(x)
    a, b = maps
    if a.shape != b.shape:
        return None
    n, height, width = a.shape
    return a.reshape(n, height * width), b.reshape(n, height * width)


def _map_pair(a, b):
    """`_as_map_pair`, except that executing eagerly, valid NumPy maps stay NumPy (no copy)."""
    if tf.executing_eagerly():
        pair = _numpy_map_pair(a, b)
        if pair is not None:
            return pair
    return _as_map_pair(a, b)


def average_ranks(values) -> tf.Tensor:
    """Rank each row of `values` (N, P) from 1 to P; tied values share the mean of their positions.

    The batched equivalent of `scipy.stats.rankdata(row, method="average")`. Why not a plain argsort:
    human maps are mostly zeros, and their ties must share one rank for Spearman to be right.

    Returns:
        The *doubled* ranks, an int64 tensor (N, P): average ranks are half-integers, and doubling keeps
        them exact for any map size (`tf.cast(r, tf.float64) / 2` gives the ranks).
    """
    values = tf.convert_to_tensor(values)
    if values.shape.rank != 2:
        raise ValueError(f"`values` must have shape (N, P); got {tuple(values.shape)}.")
    n, p = tf.shape(values)[0], tf.shape(values)[1]
    # One descending sort per row gives the sorted values and the pixel each came from.
    sorted_values, order = tf.math.top_k(values, k=p, sorted=True)
    # Runs of equal values; ids are unique across rows (row * p + run within the row) and < n * p, so
    # every shape below is static: this also compiles with XLA.
    is_start = tf.concat(
        [tf.ones([n, 1], tf.bool), tf.not_equal(sorted_values[:, 1:], sorted_values[:, :-1])], axis=1
    )
    row_offset = tf.range(n)[:, None] * p
    run = tf.cumsum(tf.cast(is_start, tf.int32), axis=1) - 1 + row_offset
    position = tf.broadcast_to(tf.range(p)[None, :], [n, p])
    first = tf.math.unsorted_segment_min(position, run, n * p)
    count = tf.math.unsorted_segment_sum(tf.ones_like(position), run, n * p)
    # Descending positions first .. first+count-1 are ascending ranks p-first .. p-first-count+1;
    # twice their mean is an integer.
    doubled_run_rank = tf.cast(2 * (p - first) - count + 1, tf.int64)
    doubled_sorted = tf.gather(doubled_run_rank, run)
    # Back to pixel order: the value at sorted position j of row i came from pixel order[i, j].
    pixel = tf.reshape(order + row_offset, [-1, 1])
    doubled = tf.scatter_nd(pixel, tf.reshape(doubled_sorted, [-1]), tf.reshape(n * p, [1]))
    return tf.reshape(doubled, [n, p])


def _spearman_rows(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """The TensorFlow path: per-row Spearman of two (n, P) batches, float64, unclipped."""
    if a.dtype != b.dtype:
        # Widening is exact and keeps the order (and the ties) of each map.
        a, b = tf.cast(a, tf.float64), tf.cast(b, tf.float64)
    n = tf.shape(a)[0]
    # One sort for both batches.
    doubled = average_ranks(tf.concat([a, b], axis=0))
    p = tf.cast(tf.shape(a)[1], tf.int64)
    # Twice the rank minus twice the mean rank: integers, so the float64 sums below are exact
    # (as long as P**3 < 2**53, i.e. up to ~450x450 maps).
    centred = tf.cast(doubled - (p + 1), tf.float64)
    ca, cb = centred[:n], centred[n:]
    covariance = tf.reduce_sum(ca * cb, axis=1)
    scale = tf.sqrt(tf.reduce_sum(ca * ca, axis=1) * tf.reduce_sum(cb * cb, axis=1))
    safe_scale = tf.where(scale > 0, scale, tf.ones_like(scale))
    return tf.where(scale > 0, covariance / safe_scale, tf.zeros_like(scale))


def _centred_sorted_ranks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NumPy: sort each row of `x` (c, P); return the sort order and the rows' centred doubled ranks.

    `centred[i, j]` is twice the average rank of `x[i, order[i, j]]` minus (P + 1), the integer that
    `_spearman_rows` computes for that pixel. Tied values are adjacent once sorted, whatever the sort
    (so it need not be stable), and share the average of their positions.
    """
    c, p = x.shape
    order = np.argsort(x, axis=1)
    ordered = np.take_along_axis(x, order, axis=1)
    starts = np.empty((c, p), bool)
    starts[:, 0] = True  # every row starts a run, so runs never cross rows
    np.not_equal(ordered[:, 1:], ordered[:, :-1], out=starts[:, 1:])
    first = np.flatnonzero(starts)  # flat position of each run's first element
    end = np.empty_like(first)  # ... and one past its last
    end[:-1], end[-1] = first[1:], c * p
    # A run at row positions s .. e-1 has ranks s+1 .. e: twice their mean is s + e + 1, centred s + e - p.
    # With flat positions (row r adds r * p to both), that is first + end - p - 2 r p.
    rank_dtype = np.int32 if 2 * c * p < 2**31 else np.int64
    centred = np.repeat((first + end - p).astype(rank_dtype), end - first).reshape(c, p)
    centred -= (2 * p * np.arange(c, dtype=rank_dtype))[:, None]
    return order, centred


def _rankable(x: np.ndarray) -> np.ndarray:
    """`x` in a dtype NumPy sorts fast, with the same order and ties as the TensorFlow path's.

    Integers and booleans become float64, as in `_as_map_pair`; float16 (or bfloat16) becomes float32.
    """
    if x.dtype in (np.float32, np.float64):
        return x
    return x.astype(np.float64 if x.dtype.kind in "iub" else np.float32)


def _spearman_numpy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The NumPy path: `_spearman_rows` for two (N, P) arrays, a few maps at a time (cache-sized)."""
    n, p = a.shape
    rho = np.zeros(n, np.float64)
    step = _chunk_maps(p, min(CHUNK_PIXELS, _NUMPY_BLOCK_PIXELS))
    for start in range(0, n, step):
        rows = slice(start, start + step)
        order_a, ranks_a = _centred_sorted_ranks(_rankable(a[rows]))
        order_b, ranks_b = _centred_sorted_ranks(_rankable(b[rows]))
        # a's ranks back in pixel order, then read at b's sorted pixels: pairs them with b's ranks.
        pixel_ranks_a = np.empty_like(ranks_a)
        np.put_along_axis(pixel_ranks_a, order_a, ranks_a, axis=1)
        paired_a = np.take_along_axis(pixel_ranks_a, order_b, axis=1).astype(np.float64)
        ranks_a, ranks_b = ranks_a.astype(np.float64), ranks_b.astype(np.float64)
        # Exact integer sums in float64, as in `_spearman_rows`: the same numbers, so the same result.
        covariance = np.einsum("ij,ij->i", paired_a, ranks_b)
        scale = np.sqrt(np.einsum("ij,ij->i", ranks_a, ranks_a) * np.einsum("ij,ij->i", ranks_b, ranks_b))
        np.divide(covariance, scale, out=rho[rows], where=scale > 0)
    return rho


def _numpy_path_applies(maps) -> bool:
    """Whether `spearman` ranks with NumPy: executing eagerly, on concrete maps, with no GPU or TPU."""
    return (
        tf.executing_eagerly()
        and not tf.is_symbolic_tensor(maps)
        and not tf.config.list_logical_devices("GPU")
        and not tf.config.list_logical_devices("TPU")
    )


# ----------------------------------------------------------------------------- the NumPy path (JAX, PyTorch)
def _numpy_dtype(dtype) -> np.dtype:
    """A result dtype given as a string, a NumPy or a backend dtype, as a NumPy dtype."""
    return np.dtype(keras.backend.standardize_dtype(dtype))


def _check_map_layout(dtype_kind: str, dtype, shape: tuple, name: str) -> None:
    """Raise the ValueErrors of `_validation.as_maps` unless maps of this dtype and static shape are numbers of
    shape (N, H, W) or (N, H, W, 1). Shared by the host path and the device path (`_device_maps`)."""
    if dtype_kind not in "fiub":
        raise ValueError(f"`{name}` must hold numbers; got dtype {dtype}.")
    if len(shape) == 4 and shape[-1] != 1:
        raise ValueError(
            f"`{name}` must have shape (N, H, W) or (N, H, W, 1); got shape {shape} with "
            f"{shape[-1]} channels. Reduce the channels first (e.g. mean over the last axis)."
        )
    if len(shape) not in (3, 4):
        raise ValueError(
            f"`{name}` must have shape (N, H, W) or (N, H, W, 1); got rank {len(shape)} with shape {shape}."
        )


def _check_same_maps(shape_a: tuple, shape_b: tuple) -> None:
    """Raise `_as_map_pair`'s ValueErrors unless two (N, H, W) shapes are equal with at least one pixel per map."""
    if shape_a != shape_b:
        raise ValueError(
            f"`a` and `b` must have the same shape (N, H, W); got {shape_a} and {shape_b}. Resize the human maps "
            "to the image size (harmonization.data does this for ClickMe)."
        )
    if shape_a[1] * shape_a[2] == 0:
        raise ValueError(f"`a` and `b` must have at least one pixel per map; got shape {shape_a}.")


def _host_maps(maps, name: str) -> np.ndarray:
    """`maps` as a NumPy (N, H, W) array, refused with the ValueErrors `_validation.as_maps` raises for a tensor.

    Integer and boolean maps keep their dtype (each chunk is widened to float64 where it is used, as the
    TensorFlow path widens them); bfloat16, which NumPy cannot sort, becomes float32 (exact).
    """
    maps = host_array(maps)
    if maps.dtype.name == "bfloat16":
        maps = maps.astype(np.float32)
    _check_map_layout(maps.dtype.kind, maps.dtype, maps.shape, name)
    if maps.ndim == 4:
        maps = maps[..., 0]
    check_finite_on_host(maps, name)
    return maps


def _host_map_pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    """The NumPy path's `_as_map_pair`: two validated map batches flattened to (N, H*W), with its errors."""
    a, b = _host_maps(a, "a"), _host_maps(b, "b")
    _check_same_maps(a.shape, b.shape)
    n, height, width = a.shape
    return a.reshape(n, height * width), b.reshape(n, height * width)


# ----------------------------------------------------------------------------- the device path (JAX, PyTorch)
def _device_maps(maps, name: str, kind: str, like=None):
    """`maps` as a (N, H, W) tensor of `kind` ("jax" or "torch") on the device of `like` (or the library's default),
    refused with `_host_maps`'s ValueErrors, checked on the device: only the answer of the NaN/Inf check comes back.

    A tensor of `kind` stays where it is; anything else (NumPy, lists, another library's tensor) is read as NumPy,
    checked, then moved.
    """
    if _spearman_device.library(maps) == kind:
        dtype = _spearman_device.dtype_name(maps)  # Keras's names: "float32", "bfloat16", "int64", "bool" ...
        dtype_kind = ("f" if "float" in dtype else "b" if dtype == "bool" else "u" if dtype.startswith("uint")
                      else "i" if dtype.startswith("int") else "c")
    else:
        maps = host_array(maps)
        dtype, dtype_kind = maps.dtype, "f" if maps.dtype.name == "bfloat16" else maps.dtype.kind
    shape = tuple(int(d) for d in maps.shape)
    _check_map_layout(dtype_kind, dtype, shape, name)
    maps = _spearman_device.to_library(maps, kind, like)
    if len(shape) == 4:
        maps = maps[..., 0]
    if not _spearman_device.all_finite(maps):
        raise ValueError(f"`{name}` contains NaN or Inf values.")
    return maps


def _spearman_off_tensorflow(a, b, *, on_device: bool) -> np.ndarray:
    """`spearman` on the JAX and PyTorch backends, float64 (N,), unclipped: ranked with NumPy on the host, or,
    with `on_device`, where the maps are (`harmonization._spearman_device`); the two return identical numbers.

    `spearman` chooses `on_device` when a map already lives on an accelerator; tests and bench/gpu force it.
    Either way `a` is checked before `b`, with the same errors.
    """
    if not on_device:
        return _spearman_numpy(*_host_map_pair(a, b))
    # The library of the tensor given (the first map's if both are tensors), else the Keras backend's; the other
    # map joins it on its device.
    kind = _spearman_device.library(a) or _spearman_device.library(b) or keras.backend.backend()
    home = a if _spearman_device.library(a) == kind else b if _spearman_device.library(b) == kind else None
    x = _device_maps(a, "a", kind, like=home)
    y = _device_maps(b, "b", kind, like=x)
    shape = tuple(int(d) for d in x.shape)
    _check_same_maps(shape, tuple(int(d) for d in y.shape))
    n, height, width = shape
    x, y = x.reshape(n, height * width), y.reshape(n, height * width)
    return _spearman_device.spearman_rows(x, y, _chunk_maps(height * width, CHUNK_PIXELS))


def _numpy_by_chunks(fn: Callable, *arrays: np.ndarray) -> list[np.ndarray]:
    """The NumPy path's `_by_chunks`: `fn` on `CHUNK_PIXELS` pixels (whole rows) of each (N, P) array at a time.

    `fn(*rows)` returns a tuple of per-row results; they are concatenated. Working memory (numpy's percentile
    partitions a copy of its input) then stays a small multiple of one chunk, whatever the batch.
    """
    n, p = arrays[0].shape
    step = _chunk_maps(p, CHUNK_PIXELS)
    parts = [fn(*(x[i : i + step] for x in arrays)) for i in range(0, max(n, 1), step)]
    return [np.concatenate(column) for column in zip(*parts)]


def _top_percentile_rows_numpy(maps: np.ndarray, percentile: float) -> np.ndarray:
    """The NumPy path's `_top_percentile_rows`: the published `row > np.percentile(row, 100 - percentile)`
    itself, for every row of `maps` (N, P) at once (integers and booleans compared in float64)."""
    if maps.dtype.kind in "iub":
        maps = maps.astype(np.float64)
    return maps > np.percentile(maps, 100.0 - percentile, axis=1, keepdims=True)


def spearman(a, b, *, dtype="float32"):
    """Per-map Spearman rank correlation between two batches of maps, ties ranked by their average.

    Equal to `scipy.stats.spearmanr(a[i].ravel(), b[i].ravel())` for each i, except for a constant map:
    it ranks nothing, so it gets 0.0 (no agreement) where scipy returns NaN, and one blank map cannot
    turn a dataset's mean into NaN. The correlation is computed in float64, exact for 224x224 maps.

    Maps are scored `CHUNK_PIXELS` pixels at a time, where they are computed fastest:

    - TensorFlow backend: executed eagerly on a machine without a GPU or TPU, ranked with NumPy (faster there
      than TensorFlow's sort); in a `tf.function`, or with an accelerator, with TensorFlow ops on the device.
    - JAX and PyTorch backends: when a map already lives on an accelerator (a JAX array on a GPU or TPU, a
      PyTorch tensor on CUDA), ranked there with the backend's own sort and searchsorted, with no host copy of
      the maps (`harmonization._spearman_device`); otherwise (NumPy, CPU tensors) with NumPy on the host.

    All give identical results: every path sums the same integer (doubled) ranks exactly.

    Args:
        a: (N, H, W) or (N, H, W, 1) maps, e.g. model saliency.
        b: maps of the same shape, e.g. human feature importance.
        dtype: float dtype of the result ("float32" by default; "float64" returns the computation as is).

    Returns:
        A tensor (N,) in [-1, 1]; a NumPy array on the JAX and PyTorch backends.
    """
    if not _ON_TENSORFLOW:
        on_device = _spearman_device.on_accelerator(a) or _spearman_device.on_accelerator(b)
        rho = _spearman_off_tensorflow(a, b, on_device=on_device)
        return np.clip(rho, -1.0, 1.0).astype(_numpy_dtype(dtype))
    a, b = _map_pair(a, b)
    if _numpy_path_applies(a):
        # np.asarray shares a tensor's memory (`.numpy()` would copy it).
        rho = tf.constant(_spearman_numpy(np.asarray(a), np.asarray(b)))
    else:
        (rho,) = _by_chunks(lambda x, y: (_spearman_rows(x, y),), a, b, [tf.float64])
    return tf.cast(tf.clip_by_value(rho, -1.0, 1.0), dtype)


def check_ceiling(ceiling) -> float:
    """Return `ceiling` as a float, or raise a ValueError unless it is a finite number > 0."""
    if (
        isinstance(ceiling, (bool, np.bool_))
        or not isinstance(ceiling, numbers.Real)
        or not math.isfinite(float(ceiling))
        or ceiling <= 0
    ):
        raise ValueError(f"`ceiling` must be a finite number > 0; got {ceiling!r}.")
    return float(ceiling)


def check_percentile(percentile) -> float:
    """Return `percentile` as a float, or raise a ValueError unless 0 < percentile < 100."""
    if (
        isinstance(percentile, (bool, np.bool_))
        or not isinstance(percentile, numbers.Real)
        or not math.isfinite(float(percentile))
        or not 0 < float(percentile) < 100
    ):
        raise ValueError(
            f"`percentile` must be a number strictly between 0 and 100 (the share of pixels kept, "
            f"in %); got {percentile!r}."
        )
    return float(percentile)


def _top_percentile_rows(maps: tf.Tensor, percentile: float) -> tf.Tensor:
    """Per row of `maps` (N, P): `row > np.percentile(row, 100 - percentile)`, as a boolean tensor.

    Reproduces numpy's default ("linear") interpolation step by step, in the maps' dtype, so that
    the threshold, and hence the mask, is the one numpy computes for a Python-number percentile.
    """
    p = tf.shape(maps)[1]
    quantile = (100.0 - percentile) / 100.0
    virtual_index = tf.cast(p - 1, tf.float64) * quantile
    below = tf.minimum(tf.floor(virtual_index), tf.cast(p - 1, tf.float64))
    gamma = virtual_index - below
    below = tf.cast(below, tf.int32)
    above = tf.minimum(below + 1, p - 1)
    # Only the top p - below values are needed; top_k is descending, so ascending index i is p-1-i.
    top = tf.math.top_k(maps, k=p - below, sorted=True).values
    low_value = top[:, p - 1 - below]
    high_value = top[:, p - 1 - above]
    diff = high_value - low_value
    # numpy's _lerp: a + (b - a) * t, or b - (b - a) * (1 - t) when t >= 0.5.
    threshold = tf.where(
        gamma >= 0.5,
        high_value - diff * tf.cast(1.0 - gamma, maps.dtype),
        low_value + diff * tf.cast(gamma, maps.dtype),
    )
    return maps > threshold[:, None]


def top_percentile_masks(maps, percentile: float = 10):
    """The published binarisation of each map: `m > np.percentile(m, 100 - percentile)`, a boolean (N, H, W).

    What Dice and IoU compare (and what a new overlap metric starts from): the top `percentile` % pixels
    of each map, ties at the threshold left out, the threshold interpolated linearly as numpy does.

    Args:
        maps: (N, H, W) or (N, H, W, 1) maps.
        percentile: share of pixels kept per map, in %, strictly between 0 and 100. Defaults to 10.

    Returns:
        A boolean tensor (N, H, W); a NumPy array on the JAX and PyTorch backends.
    """
    percentile = check_percentile(percentile)
    if not _ON_TENSORFLOW:
        maps = _host_maps(maps, "maps")
        n, height, width = maps.shape
        if height * width == 0:
            raise ValueError(f"`maps` must have at least one pixel per map; got shape {maps.shape}.")
        flat = maps.reshape(n, height * width)
        (masks,) = _numpy_by_chunks(lambda rows: (_top_percentile_rows_numpy(rows, percentile),), flat)
        return masks.reshape(maps.shape)
    maps = tf.convert_to_tensor(maps)
    maps = check_finite(as_maps(maps, "maps", tf.float64 if not maps.dtype.is_floating else None), "maps")
    flat = tf.reshape(maps, [tf.shape(maps)[0], -1])
    return tf.reshape(_top_percentile_rows(flat, percentile), tf.shape(maps))


class Overlap(NamedTuple):
    """Pixel counts of two maps' top-percentile masks A and B, float32 tensors (N,) (NumPy arrays on the JAX
    and PyTorch backends)."""

    intersection: tf.Tensor  # |A & B|
    sizes: tf.Tensor  # |A| + |B|
    union: tf.Tensor  # |A | B|


def _overlap_counts(a, b, percentile: float) -> tuple:
    """Return |A & B|, |A| + |B| and |A | B| (float32, (n,)) of the top-`percentile` % masks of (n, P).

    Tensors on the TensorFlow backend, NumPy arrays on the others: one formula for both paths.
    """
    if _ON_TENSORFLOW:
        mask_a, mask_b = _top_percentile_rows(a, percentile), _top_percentile_rows(b, percentile)

        def count(mask):
            return tf.reduce_sum(tf.cast(mask, tf.float32), axis=1)

    else:
        mask_a, mask_b = _top_percentile_rows_numpy(a, percentile), _top_percentile_rows_numpy(b, percentile)

        def count(mask):
            return np.count_nonzero(mask, axis=1).astype(np.float32)

    intersection = count(mask_a & mask_b)
    return intersection, count(mask_a) + count(mask_b), count(mask_a | mask_b)


# Overlaps computed inside `shared_overlaps()`: (id(a), id(b), percentile) -> (a, b, Overlap); None outside.
_SHARED_OVERLAPS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("shared_overlaps", default=None)


def _immutable(maps) -> bool:
    """Whether `maps` cannot change while a `shared_overlaps` block keeps it: a TensorFlow or JAX tensor, or a
    NumPy array that owns its memory and was made read-only (how `evaluate_alignment` hands its maps over on the
    JAX and PyTorch backends). PyTorch tensors and writeable arrays can change in place, so they are not shared."""
    if isinstance(maps, np.ndarray):
        return not maps.flags.writeable and maps.flags.owndata
    if _ON_TENSORFLOW:
        return isinstance(maps, tf.Tensor)
    return keras.backend.backend() == "jax" and keras.ops.is_tensor(maps)


@contextlib.contextmanager
def shared_overlaps() -> Iterator[None]:
    """Inside the block, `top_percentile_overlap` of the same two tensors and percentile is computed once.

    `evaluate_alignment` scores a batch with every metric inside one block, so that Dice and IoU binarise its
    maps once (half the cost of the two). Only maps that cannot change are shared (`_immutable`), and the block
    keeps a reference to each pair it saw, so an id is never reused for other values while the block lasts.
    """
    token = _SHARED_OVERLAPS.set({})
    try:
        yield
    finally:
        _SHARED_OVERLAPS.reset(token)


def top_percentile_overlap(a, b, percentile: float = 10) -> Overlap:
    """|A & B|, |A| + |B| and |A | B| of the maps' `top_percentile_masks`, per map; what Dice and IoU share.

    Maps are scored `CHUNK_PIXELS` pixels at a time; inside `shared_overlaps()`, once per pair of tensors.

    Args:
        a: (N, H, W) or (N, H, W, 1) maps.
        b: maps of the same shape.
        percentile: share of pixels kept per map, in %, strictly between 0 and 100.

    Returns:
        An `Overlap` of float32 tensors (N,) (NumPy arrays on the JAX and PyTorch backends).
    """
    percentile = check_percentile(percentile)
    shared = _SHARED_OVERLAPS.get()
    if shared is not None and not (_immutable(a) and _immutable(b)):
        shared = None  # arrays can change in place: only maps that cannot are shared
    key = (id(a), id(b), percentile)
    if shared is not None and key in shared:
        return shared[key][2]

    def counts(x, y):
        return _overlap_counts(x, y, percentile)

    if _ON_TENSORFLOW:
        overlap = Overlap(*_by_chunks(counts, *_map_pair(a, b), [tf.float32] * 3))
    else:
        overlap = Overlap(*_numpy_by_chunks(counts, *_host_map_pair(a, b)))
    if shared is not None:
        shared[key] = (a, b, overlap)
    return overlap


def _published_ratio(numerator, denominator, dtype="float32"):
    """numerator / (denominator + EPSILON), the published Dice and IoU formula, cast to `dtype`.

    Computed in float64 like the published IoU (numpy counts are int64); the pixel counts are exact.
    """
    if not _ON_TENSORFLOW:
        numerator, denominator = np.asarray(numerator, np.float64), np.asarray(denominator, np.float64)
        return (numerator / (denominator + EPSILON)).astype(_numpy_dtype(dtype))
    numerator, denominator = tf.cast(numerator, tf.float64), tf.cast(denominator, tf.float64)
    return tf.cast(numerator / (denominator + EPSILON), dtype)


def dice(a, b, percentile: float = 10, *, dtype="float32"):
    """Per-map Dice coefficient 2|A & B| / (|A| + |B|) of the top `percentile` % pixels of each map.

    Each map is binarised as published: `m > np.percentile(m, 100 - percentile)` (linear
    interpolation), so ties at the threshold are left out and a mostly-zero human map keeps only its
    non-zero pixels. The denominator gets the published `EPSILON` (1e-9), so two empty masks (e.g. two
    constant maps) score 0.0.

    Args:
        a: (N, H, W) or (N, H, W, 1) maps.
        b: maps of the same shape.
        percentile: share of pixels kept per map, in %, strictly between 0 and 100.
        dtype: float dtype of the result (computed in float64). Defaults to "float32".

    Returns:
        A tensor (N,) in [0, 1]; a NumPy array on the JAX and PyTorch backends.
    """
    overlap = top_percentile_overlap(a, b, percentile)
    return _published_ratio(2.0 * overlap.intersection, overlap.sizes, dtype)


def iou(a, b, percentile: float = 10, *, dtype="float32"):
    """Per-map intersection over union |A & B| / |A | B| of the top `percentile` % pixels of each map.

    Binarised like `dice`; the denominator gets the published `EPSILON`, so two empty masks score 0.0.
    `dtype` is the result's float dtype (computed in float64; default "float32").

    Returns:
        A tensor (N,) in [0, 1]; a NumPy array on the JAX and PyTorch backends.
    """
    overlap = top_percentile_overlap(a, b, percentile)
    return _published_ratio(overlap.intersection, overlap.union, dtype)


def alignment_score(spearmans, ceiling: float = HUMAN_CEILING) -> float:
    """Human alignment: the mean per-image Spearman correlation divided by the human ceiling.

    1.0 means the model agrees with a person as well as two people agree with each other.

    Args:
        spearmans: per-image Spearman correlations, shape (N,) with N >= 1 (e.g. from `spearman`): a NumPy
            array, a list, or a tensor of any backend.
        ceiling: the human inter-rater Spearman correlation; defaults to ClickMe's, `HUMAN_CEILING`.

    Returns:
        A Python float.
    """
    ceiling = check_ceiling(ceiling)
    values = host_array(spearmans)
    if values.ndim != 1 or values.size == 0 or not np.issubdtype(values.dtype, np.number):
        raise ValueError(
            "`spearmans` must be a non-empty 1-D array of per-image correlations; "
            f"got shape {values.shape} and dtype {values.dtype}."
        )
    values = values.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError(
            f"`spearmans` contains {int(np.sum(~np.isfinite(values)))} NaN or Inf value(s)."
        )
    return float(np.mean(values) / ceiling)


#: The per-image metrics `evaluate_alignment` reports by default, by name: each is
#: `fn(saliency_maps, human_maps[, percentile]) -> (N,)` (a metric with a `percentile` parameter gets
#: `evaluate_alignment`'s). A metric added here is computed, averaged and written by `evaluate_alignment`
#: and `harmonization evaluate` with nothing else to change. Read-only: pass
#: `metrics={**DEFAULT_METRICS, "mine": fn}` to `evaluate_alignment` to add one for a run.
DEFAULT_METRICS: Mapping[str, Callable] = MappingProxyType({"spearman": spearman, "dice": dice, "iou": iou})
