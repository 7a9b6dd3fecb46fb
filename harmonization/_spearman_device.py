"""Spearman's rank correlation computed where the maps already are: a JAX accelerator or a PyTorch CUDA device.

`harmonization.metrics.spearman` on the JAX and PyTorch backends ranks with NumPy on the host, which is the faster
way on a CPU. When the maps already live on a GPU (or a TPU), copying them to the host and sorting them there on
one core costs more than the whole computation on the device: this module ranks them there, without a host copy,
and brings back only per-map integer sums. `metrics.spearman` validates the maps (with the host path's errors)
and decides which path runs; this module only computes.

The method, per map (a row of an (n, P) chunk): sort the row; a value v's doubled average rank is
`count(x < v) + count(x <= v) + 1`, two batched binary searches into the sorted row (`torch.searchsorted` takes
batches; JAX maps `jnp.searchsorted` over rows with `jax.vmap`). Ties share the mean of their positions, as in
`scipy.stats.rankdata(method="average")`. Doubled ranks are integers, so the sums of Pearson's formula are exact
integers, and the result equals the NumPy and TensorFlow paths' bit for bit:

- PyTorch: the sums are int64 on the device (CUDA has int64).
- JAX: without `jax_enable_x64` there is no int64, and a sum of products of ranks overflows int32 from 2**31
  (a 224x224 map's reach 5e14). Each doubled rank (< 2P) is split into 7-bit limbs; a product of two limbs is
  below 2**14, so a sum of 2**16 of them fits int32 exactly. The device returns those int32 sums per limb pair
  (and per block of 2**16 pixels), and the host recombines them with Python integers: exact for any map size.

Neither backend is imported here until a tensor of it is seen, so the module imports where only one is installed.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

#: Bits per limb of a doubled rank on JAX: a product of two limbs is < 2**(2 * 7) = 2**14.
_LIMB_BITS = 7
#: Pixels per int32 partial sum on JAX: 2**16 products below 2**14 sum below 2**30, well inside int32.
_BLOCK_PIXELS = 1 << 16


def library(x: Any) -> str | None:
    """"jax" or "torch" for an array or tensor of that library, else None (NumPy, lists, TensorFlow ...).

    Read from the type's module, so that neither library is imported to answer.
    """
    module = type(x).__module__
    if module.startswith("torch"):
        return "torch"
    if module.startswith(("jax", "jaxlib")):
        return "jax"
    return None


def on_accelerator(x: Any) -> bool:
    """Whether `x` is a concrete JAX array on a non-CPU device, or a PyTorch tensor on a CUDA (or ROCm) device.

    Those are the maps ranked where they are; anything else (NumPy, CPU tensors, a JAX tracer inside a compiled
    function, other PyTorch devices such as MPS, whose int64 and sort support varies) goes to the host path.
    """
    kind = library(x)
    if kind == "torch":
        return bool(getattr(x, "is_cuda", False))
    if kind == "jax":
        import jax  # a JAX array exists, so JAX is installed

        if isinstance(x, getattr(jax.core, "Tracer", ())):  # traced inside a compiled function: no values yet
            return False
        try:
            return any(device.platform != "cpu" for device in x.devices())
        except (AttributeError, RuntimeError):  # not a concrete, placed array
            return False
    return False


def dtype_name(x: Any) -> str:
    """The dtype of a JAX array or PyTorch tensor as Keras names it ("float32", "bfloat16", "int64", "bool" ...)."""
    import keras  # on use: importing keras picks the backend, which importing this module must not do

    return keras.backend.standardize_dtype(x.dtype)


def to_library(x: Any, kind: str, like: Any | None) -> Any:
    """`x` (a NumPy array, or a tensor of `kind`) as a tensor of `kind`, on the device of `like` when given.

    With no `like`, the library's default device (what `keras.ops.convert_to_tensor` would use on that backend).
    """
    if kind == "torch":
        import torch

        if library(x) == "torch":
            x = x.detach()
            return x if like is None else x.to(like.device)
        if like is not None:
            device = like.device
        else:
            import keras

            device = keras.ops.convert_to_tensor(np.zeros((), np.float32)).device
        return torch.as_tensor(_torch_ready(np.asarray(x)), device=device)
    import jax

    if library(x) != "jax":
        x = np.asarray(x)
    if like is None:
        return jax.numpy.asarray(x)
    return jax.device_put(x, next(iter(like.devices())))


def _torch_ready(x: np.ndarray) -> np.ndarray:
    """A NumPy array PyTorch can take: it has no bfloat16 from NumPy (ml_dtypes), so that becomes float32 (exact)."""
    return x.astype(np.float32) if x.dtype.name == "bfloat16" else x


def all_finite(x: Any) -> bool:
    """Whether a JAX array or PyTorch tensor holds no NaN and no Inf, computed on its device (one bool comes back)."""
    if not dtype_name(x).startswith(("float", "bfloat")):
        return True
    if library(x) == "torch":
        import torch

        return bool(torch.isfinite(x).all())
    import jax.numpy as jnp

    return bool(jnp.isfinite(x).all())


def spearman_rows(a: Any, b: Any, chunk_maps: int) -> np.ndarray:
    """Spearman's rho of each row of two (N, P) tensors of one library on one device, float64 (N,), unclipped.

    `a` and `b` are valid maps (finite numbers, same shape, P >= 1); `chunk_maps` rows are ranked at a time, so the
    device's working memory stays a small multiple of one chunk. A constant row gets 0.0.
    """
    n, p = (int(d) for d in a.shape)
    step = max(1, int(chunk_maps))
    if library(a) == "torch":
        sums = [_torch_sums(a[i : i + step], b[i : i + step]) for i in range(0, n, step)]
        covariance, var_a, var_b = (np.concatenate(part).astype(np.float64) for part in zip(*sums))
    else:
        parts = [_jax_limb_sums(a[i : i + step], b[i : i + step]) for i in range(0, n, step)]
        covariance, var_a, var_b = _combine_limb_sums([np.asarray(part) for part in parts], p)
    return rho_from_sums(covariance, var_a, var_b)


def rho_from_sums(covariance: np.ndarray, var_a: np.ndarray, var_b: np.ndarray) -> np.ndarray:
    """Pearson's r from exact sums of centred doubled ranks (float64), 0.0 where a map is constant.

    The same float64 operations as `metrics._spearman_numpy` on the same exact sums: the same results.
    """
    scale = np.sqrt(var_a * var_b)
    rho = np.zeros(covariance.shape, np.float64)
    np.divide(covariance, scale, out=rho, where=scale > 0)
    return rho


# ----------------------------------------------------------------------------- PyTorch
def _torch_rankable(x):
    """`x` in a dtype to sort: float16/bfloat16 become float32 and booleans int64 (exact, same order and ties)."""
    import torch

    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    if x.dtype == torch.bool:
        return x.long()
    return x


def _torch_centred_ranks(x):
    """Twice each value's average rank in its row, minus (P + 1): int64 (n, P), on x's device."""
    import torch

    x = _torch_rankable(x).contiguous()
    ordered = torch.sort(x, dim=1).values
    below = torch.searchsorted(ordered, x, right=False)  # count(row < v)
    up_to = torch.searchsorted(ordered, x, right=True)  # count(row <= v)
    # Doubled average rank below + up_to + 1, centred by the doubled mean rank P + 1.
    return below + up_to - x.shape[1]


def _torch_sums(a, b) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sum ca*cb, sum ca^2, sum cb^2) per row of the centred doubled ranks, int64, exact, as NumPy."""
    import torch

    with torch.no_grad():
        centred_a, centred_b = _torch_centred_ranks(a), _torch_centred_ranks(b)
        sums = torch.stack(
            [(centred_a * centred_b).sum(1), (centred_a * centred_a).sum(1), (centred_b * centred_b).sum(1)]
        )
    return tuple(sums.cpu().numpy())


# ----------------------------------------------------------------------------- JAX
def _jax_rankable(x):
    """`x` in a dtype to sort: float16/bfloat16 become float32 and booleans int32 (exact, same order and ties)."""
    import jax.numpy as jnp

    if x.dtype in (jnp.float16, jnp.bfloat16):
        return x.astype(jnp.float32)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.int32)
    return x


@functools.cache
def _jax_limb_sums_function():
    """The compiled chunk function (built once: JAX is imported only when a JAX array is seen)."""
    import jax
    import jax.numpy as jnp

    def doubled_ranks(x):
        ordered = jnp.sort(x, axis=1)
        below = jax.vmap(functools.partial(jnp.searchsorted, side="left"))(ordered, x)
        up_to = jax.vmap(functools.partial(jnp.searchsorted, side="right"))(ordered, x)
        return (below + up_to + 1).astype(jnp.int32)  # in [1, 2P - 1]

    def limbs(ranks, count, blocks):
        """(n, blocks, count, _BLOCK_PIXELS) int32 limbs of the ranks, zero-padded to whole blocks."""
        n, p = ranks.shape
        padded = jnp.pad(ranks, ((0, 0), (0, blocks * _BLOCK_PIXELS - p))) if blocks > 1 else ranks
        shifts = jnp.arange(count, dtype=jnp.int32) * _LIMB_BITS
        mask = (1 << _LIMB_BITS) - 1
        return (padded.reshape(n, blocks, 1, -1) >> shifts[None, None, :, None]) & mask

    @jax.jit
    def limb_sums(a, b):
        """int32 (n, blocks, 3, count, count): sum over a block of limb i of one ranking times limb j of another,
        for the pairs (a, b), (a, a) and (b, b)."""
        p = a.shape[1]
        count = -(-(2 * p - 1).bit_length() // _LIMB_BITS)
        blocks = -(-p // _BLOCK_PIXELS)
        la = limbs(doubled_ranks(_jax_rankable(a)), count, blocks)
        lb = limbs(doubled_ranks(_jax_rankable(b)), count, blocks)

        def gram(x, y):
            return jnp.sum(x[:, :, :, None, :] * y[:, :, None, :, :], axis=-1, dtype=jnp.int32)

        return jnp.stack([gram(la, lb), gram(la, la), gram(lb, lb)], axis=2)

    return limb_sums


def _jax_limb_sums(a, b):
    """The chunk's int32 limb sums (a device array; read on the host by `_combine_limb_sums`)."""
    return _jax_limb_sums_function()(a, b)


def _combine_limb_sums(parts: list[np.ndarray], p: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sum ca*cb, sum ca^2, sum cb^2) per row, float64, from the chunks' int32 limb sums, recombined exactly.

    sum ra*rb = sum over limb pairs (i, j) of S_ij * 2**(7 (i + j)), with Python integers (no overflow). For
    centred doubled ranks c = r - (P + 1), and since a row's doubled ranks sum to P (P + 1):
    sum ca*cb = sum ra*rb - P (P + 1)**2 (the same for ca^2 and cb^2).
    """
    sums = np.concatenate(parts).astype(np.int64).sum(axis=1)  # (N, 3, count, count): over pixel blocks
    count = sums.shape[-1]
    weights = np.array([[1 << (_LIMB_BITS * (i + j)) for j in range(count)] for i in range(count)], dtype=object)
    raw = (sums.astype(object) * weights).sum(axis=(2, 3))  # (N, 3) Python integers
    centred = raw - p * (p + 1) ** 2
    return tuple(np.array([float(v) for v in centred[:, k]], np.float64) for k in range(3))
