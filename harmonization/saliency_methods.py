"""Saliency methods as named, pluggable objects: `method(model, images, labels) -> maps (N, H, W)`.

A saliency method says where a classifier looks. `HarmonizedModel(saliency=...)` trains with one,
`evaluate_alignment(saliency=...)` scores one against human maps, and `harmonization explain --method` /
`harmonization evaluate --method` draw and score one. They are registered by name:

=======================  ==============================================================  ===========
name                     map                                                             trains
=======================  ==============================================================  ===========
"gradient_mean"          channel mean of the signed input gradient: the published        yes
                         *training* map (serre-lab/Harmonization `training/loss.py`)
"gradient_max_abs"       channel max of |input gradient|: the published *evaluation*     yes
                         map (Simonyan et al. 2014; xplique `Saliency` in the published
                         `evaluate_clickme`)
"smoothgrad"             `SmoothGrad()`: the input gradient averaged over noisy copies   no
                         (Smilkov et al. 2017), reduced like the evaluation map
"integrated_gradients"   `IntegratedGradients()`: the gradient integrated along the      no
                         path from a baseline (Sundararajan et al. 2017)
=======================  ==============================================================  ===========

Every method differentiates the same function at the same input: the true class's logit w.r.t. the
*preprocessed* images (`harmonization.saliency.saliency_view`, as published), so SmoothGrad's noise and
Integrated Gradients' path live in that space too (the normalised pixels the network sees).

Add one with `register_saliency_method(method)`: a `GradientSaliency` (a channel reduction of the input
gradient; it can train), a subclass of `SaliencyMethod`, or any function wrapped by
`get_saliency_method(fn)`. `harmonization.evaluate_command.SALIENCY_METHODS` lists the built-in names
for the console's `--help` without importing TensorFlow; a test keeps it equal to this registry.

Every method is written in `keras.ops` and runs on the TensorFlow, JAX and PyTorch backends with the same
numbers: the gradient comes from `harmonization.saliency` (each backend's own autodiff), and SmoothGrad's noise
is TensorFlow's `stateless_normal` stream on every backend (reproduced with NumPy where TensorFlow is absent), so
a seed gives the same maps whichever backend computes them. On TensorFlow the passes over noisy copies or path
points run in a `tf.while_loop`, so that a traced graph holds the model a few times, not once per point.
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
from typing import Any, Callable, Sequence

import keras
import numpy as np
from keras import ops

from harmonization import _backend
from harmonization._numbers import check_int, check_number
from harmonization.saliency import (
    channel_max_abs,
    channel_mean,
    class_logit_gradient,
    class_logit_gradient_at,
    logits_at,
    saliency_view,
)

__all__ = [
    "GRADIENT_MAX_ABS",
    "GRADIENT_MEAN",
    "FunctionSaliency",
    "GradientSaliency",
    "IntegratedGradients",
    "SaliencyMethod",
    "SmoothGrad",
    "abs_channel_sum",
    "channel_max_abs",
    "channel_mean",
    "get_saliency_method",
    "list_saliency_methods",
    "register_saliency_method",
    "training_saliency_method",
]

#: A backend tensor (TensorFlow, JAX or PyTorch).
Tensor = Any
ChannelReduction = Callable[[Tensor], Tensor]


def abs_channel_sum(attributions: Tensor) -> Tensor:
    """(N, H, W, C) -> (N, H, W): |sum over channels|, the reduction of additive attributions.

    Integrated Gradients' attributions add up to f(x) - f(baseline) (completeness, Sundararajan et al.
    2017), so a pixel's share is the sum of its channels' shares; its magnitude ranks its importance,
    which is what a human map records (the sign says only whether it raised or lowered the logit).
    """
    return ops.abs(ops.sum(attributions, axis=-1))


class SaliencyMethod(abc.ABC):
    """A saliency method: `method(model, images, labels) -> maps (N, H, W)`.

    Subclasses implement `logits_and_maps` with `keras.ops` (so that they run on every backend); on
    TensorFlow `evaluate_alignment` runs them inside `tf.function`, so they must be traceable (no NumPy on
    tensors, Python loops of static length).

    Attributes:
        name: the name it is registered under (and saved under in a `HarmonizedModel`'s config).
        twice_differentiable: whether the maps are cheap and exact to differentiate w.r.t. the weights,
            which training needs (the harmonization loss differentiates the map). Only
            `GradientSaliency` methods with this flag can train a `HarmonizedModel`.
        description: one line saying what the map is, for reports (`harmonization evaluate`'s
            results.json).
    """

    name: str
    twice_differentiable: bool = False
    description: str = ""

    @abc.abstractmethod
    def logits_and_maps(
        self, model, images, labels, *, training: bool = False, **saliency_options
    ) -> tuple[Tensor, Tensor]:
        """(logits (N, num_classes) of the clean images, maps (N, H, W)).

        Args:
            model: a Keras classifier that returns logits.
            images: (N, H, W, C) images in the model's input range.
            labels: class ids (N,) or one-hot/soft labels (N, num_classes): whose logit is explained.
            training: passed to the model.
            **saliency_options: `saliency_input`, `preprocessing`, `output`, `allow_softmax`; see
                `harmonization.saliency.class_logit_gradient`.
        """

    def __call__(self, model, images, labels, *, training: bool = False, **saliency_options) -> Tensor:
        """The maps (N, H, W) alone."""
        return self.logits_and_maps(model, images, labels, training=training, **saliency_options)[1]


@dataclasses.dataclass(frozen=True)
class GradientSaliency(SaliencyMethod):
    """A channel reduction of the class logit's input gradient (one forward and one backward pass).

    The training step takes the gradient once and reduces it twice: with `reduce` for the loss and with
    `channel_max_abs` for the Spearman it reports (`HarmonizedModel.test_step`), which is why training
    accepts these methods only.

    Attributes:
        name: registry name.
        reduce: (N, H, W, C) gradient -> (N, H, W) map.
        description: what the map is, in words.
        twice_differentiable: whether `reduce` keeps the map differentiable w.r.t. the weights (True for
            means, sums, max, abs: exact almost everywhere).
    """

    name: str
    reduce: ChannelReduction
    description: str = ""
    twice_differentiable: bool = True

    def logits_and_maps(self, model, images, labels, *, training: bool = False, **saliency_options):
        logits, grads = class_logit_gradient(model, images, labels, training, **saliency_options)
        return logits, self.reduce(grads)


def _check_batch_size(batch_size) -> int:
    return check_int(batch_size, "batch_size", minimum=1, why=" (most points differentiated in one pass)")


def _points_per_pass(batch_size: int, num_images: int | None, num_points: int) -> int:
    """How many points per image one pass differentiates: `batch_size` images at most (at least one point)."""
    if num_images is None or num_images == 0:
        return 1  # unknown until run time (a relaxed trace): one point per image per pass
    return max(1, min(num_points, batch_size // num_images))


def _repeat(values: Tensor, times: int) -> Tensor:
    """`values` stacked `times` times along the batch axis: point-major, image-minor."""
    return values if times == 1 else ops.concatenate([values] * times, axis=0)


def _gradient_sum(
    view,
    x: Tensor,
    labels: Tensor,
    training: bool,
    num_points: int,
    per_pass: int,
    points: Callable[[Tensor], Tensor],
    weights: Sequence[float] | None = None,
) -> Tensor:
    """sum_j w_j * d logit_y / d x at `points(j)`, j < num_points, per image: (N, H, W, C), in at least float32.

    `points(indices)` returns the points of the images for each of the (static-length) `indices`, point-major:
    (len(indices) * N, H, W, C). Each pass differentiates `per_pass` of them. On TensorFlow the full passes run
    in a `tf.while_loop`, so a traced graph holds the model twice (a full pass and the remainder), not once per
    point; JAX and PyTorch run eagerly here, with a Python loop.
    """
    dtype = "float32" if keras.backend.standardize_dtype(x.dtype) in ("float16", "bfloat16") else x.dtype
    weights = None if weights is None else ops.convert_to_tensor(weights, dtype)

    def pass_sum(start, count: int) -> Tensor:
        indices = start + ops.arange(count, dtype="int32")
        _, grads = class_logit_gradient_at(view, points(indices), _repeat(labels, count), training=training)
        grads = ops.reshape(grads, (count, *ops.shape(x)))
        if weights is not None:
            grads = grads * ops.reshape(ops.take(weights, indices), (count, 1, 1, 1, 1))
        return ops.sum(grads, axis=0)

    full, remainder = divmod(num_points, per_pass)
    if full == 1:
        total = pass_sum(0, per_pass)
    elif _backend.is_tensorflow():
        import tensorflow as tf  # the loop primitive that keeps a traced graph small (see above)

        _, total = tf.while_loop(
            lambda i, _: i < full,
            lambda i, total: (i + 1, total + pass_sum(i * per_pass, per_pass)),
            (tf.constant(0), tf.zeros_like(x, dtype)),
            parallel_iterations=1,
        )
    else:
        total = pass_sum(0, per_pass)
        for i in range(1, full):
            total = total + pass_sum(i * per_pass, per_pass)
    if remainder:
        total = total + pass_sum(full * per_pass, remainder)
    return total


# ----------------------------------------------------------------------------- SmoothGrad's noise
# TensorFlow's `tf.random.stateless_normal` on CPU and GPU is Philox4x32-10 (Salmon et al., SC 2011) turned into
# normals by Box-Muller; reproducing it with NumPy gives the other backends the very noise TensorFlow draws, so that
# SmoothGrad's maps agree across backends (to one float32 ulp of the noise: NumPy's and the C library's sin, cos and
# log may round differently).
_PHILOX_MULTIPLIERS = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
_PHILOX_KEY_STEPS = (np.uint32(0x9E3779B9), np.uint32(0xBB67AE85))
#: The key TensorFlow scrambles a stateless seed with (its seed -> key/counter derivation).
_SEED_SCRAMBLE_KEY = (np.uint32(0x3EC8F720), np.uint32(0x02461E29))
_LOW_32 = np.uint64(0xFFFFFFFF)


def _philox(counter: Sequence[np.ndarray], key: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
    """Philox4x32-10 of 4 uint32 counter words (arrays, one block per element) under a 2-word key."""
    c0, c1, c2, c3 = (np.asarray(word, np.uint32) for word in counter)
    k0, k1 = (np.asarray(word, np.uint32) for word in key)
    for round_ in range(10):
        product0 = _PHILOX_MULTIPLIERS[0] * c0.astype(np.uint64)
        product1 = _PHILOX_MULTIPLIERS[1] * c2.astype(np.uint64)
        high0, low0 = (product0 >> np.uint64(32)).astype(np.uint32), (product0 & _LOW_32).astype(np.uint32)
        high1, low1 = (product1 >> np.uint64(32)).astype(np.uint32), (product1 & _LOW_32).astype(np.uint32)
        c0, c1, c2, c3 = high1 ^ c1 ^ k0, low1, high0 ^ c3 ^ k1, low0
        if round_ < 9:
            with np.errstate(over="ignore"):  # the key words wrap around modulo 2**32, by design
                k0, k1 = k0 + _PHILOX_KEY_STEPS[0], k1 + _PHILOX_KEY_STEPS[1]
    return c0, c1, c2, c3


def _unit_float(bits: np.ndarray) -> np.ndarray:
    """uint32 -> float32 in [0, 1): 23 random mantissa bits under the exponent of 1.0, minus 1."""
    return (np.uint32(127 << 23) | (bits & np.uint32(0x7FFFFF))).view(np.float32) - np.float32(1.0)


def _stateless_normal_numpy(shape: Sequence[int], seed: int, sample: int) -> np.ndarray:
    """`tf.random.stateless_normal(shape, seed=[seed, sample])` (float32) computed with NumPy.

    The seed pair is scrambled into a Philox key and counter by one Philox block; block g of the stream gives
    normals 4g .. 4g+3, two per pair of uint32 words by Box-Muller (sin and cos of one angle), rounded as float32
    arithmetic rounds them.
    """
    size = int(np.prod(shape))
    words = [np.uint64(value % 2**64) for value in (seed, sample)]
    seed_counter = [np.uint32(words[0] & _LOW_32), np.uint32(words[0] >> np.uint64(32)),
                    np.uint32(words[1] & _LOW_32), np.uint32(words[1] >> np.uint64(32))]
    mix = _philox(seed_counter, _SEED_SCRAMBLE_KEY)
    block = np.arange((size + 3) // 4, dtype=np.uint64)  # the counter's low 64 bits start at 0
    counter = [(block & _LOW_32).astype(np.uint32), (block >> np.uint64(32)).astype(np.uint32),
               np.full(block.shape, mix[2]), np.full(block.shape, mix[3])]
    bits = _philox(counter, mix[:2])
    normals = np.empty((len(block), 4), np.float32)
    for first in (0, 2):
        radius_uniform = np.maximum(_unit_float(bits[first]), np.float32(1e-7))
        # float32(2 pi (in double) * u); float32 log, sin and cos as the correctly rounded double results.
        angle = (2.0 * np.pi * _unit_float(bits[first + 1]).astype(np.float64)).astype(np.float32)
        radius = np.sqrt(np.float32(-2.0) * np.log(radius_uniform.astype(np.float64)).astype(np.float32))
        normals[:, first] = np.sin(angle.astype(np.float64)).astype(np.float32) * radius
        normals[:, first + 1] = np.cos(angle.astype(np.float64)).astype(np.float32) * radius
    return normals.reshape(-1)[:size].reshape(tuple(shape))


def _noise_like(x: Tensor, seed, sample) -> Tensor:
    """Standard normal noise of x's shape for SmoothGrad sample `sample`: TensorFlow's stateless stream.

    On TensorFlow `tf.random.stateless_normal(tf.shape(x), seed=[seed, sample], dtype=x.dtype)` itself (traceable;
    `seed` and `sample` may be tensors); elsewhere the same float32 numbers from NumPy, cast to x's dtype.
    """
    if _backend.is_tensorflow():
        import tensorflow as tf  # its own generator: inside a traced graph the noise is drawn by the graph

        seed = tf.stack([tf.cast(seed, tf.int64), tf.cast(sample, tf.int64)])
        return tf.random.stateless_normal(tf.shape(x), seed=seed, dtype=x.dtype)
    return ops.convert_to_tensor(_stateless_normal_numpy(tuple(x.shape), int(seed), int(sample)), x.dtype)


def _fresh_seed() -> Any:
    """A seed for `SmoothGrad(seed=None)`: new noise at every call (from TensorFlow's or NumPy's global generator,
    both set by `keras.utils.set_random_seed`)."""
    if _backend.is_tensorflow():
        import tensorflow as tf  # a traced graph draws a new seed each time it runs

        return tf.random.uniform([], 0, np.iinfo(np.int32).max, dtype=tf.int64)
    return int(np.random.randint(0, np.iinfo(np.int32).max))


class _AttributionSaliency(SaliencyMethod):
    """A method that attributes the class logit to each input value, then reduces the channels (`reduce`).

    Subclasses implement `attributions_at(view, x, labels, training)` on the preprocessed images `x`.
    """

    reduce: ChannelReduction

    @abc.abstractmethod
    def attributions_at(self, view, x, labels, training: bool = False) -> Tensor:
        """The per-channel attributions (N, H, W, C) of `x`, a batch of preprocessed images."""

    def attributions(self, model, images, labels, *, training: bool = False, **saliency_options) -> Tensor:
        """The per-channel attributions (N, H, W, C) of `images`, before the channel reduction."""
        view, images = saliency_view(model, images, **saliency_options)
        return self.attributions_at(view, view.split(images, training=training), labels, training)

    def logits_and_maps(self, model, images, labels, *, training: bool = False, **saliency_options):
        view, images = saliency_view(model, images, **saliency_options)
        x = view.split(images, training=training)
        return logits_at(view, x, training), self.reduce(self.attributions_at(view, x, labels, training))


@dataclasses.dataclass(frozen=True)
class SmoothGrad(_AttributionSaliency):
    """SmoothGrad (Smilkov et al. 2017, arXiv 1706.03825): the input gradient averaged over noisy copies.

        attributions = 1/n sum_s  d logit_y / d x (x + noise_s),   noise_s ~ N(0, sigma^2),
        sigma = noise_level * (max(x) - min(x))  per image,

    then `reduce` over channels (default `channel_max_abs`, the evaluation map's reduction, so that
    "smoothgrad" differs from "gradient_max_abs" only by the smoothing). `x` is the preprocessed image:
    the noise is added where the gradient is taken. sigma as a share of the input's range is the
    paper's parametrisation (10-20% worked best there; xplique's `noise` is sigma itself, and it returns
    the per-channel mean gradient, which the published `evaluate_clickme` would reduce with a signed
    channel mean).

    The noise of sample s is `sigma * tf.random.stateless_normal(tf.shape(x), seed=[seed, s])` (sigma
    per image), so a seed gives the same maps whatever `batch_size` (an image's noise depends on the seed,
    the sample and its row in the batch) and whatever the backend (JAX and PyTorch draw the same float32
    numbers with NumPy; for float64 inputs TensorFlow draws float64 noise, the others float32 noise cast to
    float64); `seed=None` draws fresh noise at every call. Each pass
    differentiates up to `batch_size` points: (batch_size // N) noisy copies of the N images (at least one).

    Not for training (`twice_differentiable` is False): n backward passes per step, differentiated again.
    """

    name: str = "smoothgrad"
    samples: int = 50
    noise_level: float = 0.15
    seed: int | None = 0
    batch_size: int = 64
    reduce: ChannelReduction = channel_max_abs
    description: str = (
        "SmoothGrad (Smilkov et al. 2017): max over colour channels of |mean over noisy copies of "
        "d logit[label] / d x|, x the preprocessed input plus N(0, (noise_level * (max x - min x))^2) noise"
    )

    def __post_init__(self):
        check_int(self.samples, "samples", minimum=1)
        check_number(self.noise_level, "noise_level", minimum=0, strict=False)
        if self.seed is not None:
            check_int(self.seed, "seed", expected="an integer or None")
        _check_batch_size(self.batch_size)

    def attributions_at(self, view, x, labels, training: bool = False) -> Tensor:
        """The mean gradient (N, H, W, C) over the noisy copies of `x`, a batch of preprocessed images."""
        x = ops.convert_to_tensor(x)
        labels = ops.convert_to_tensor(labels)
        # sigma as a share of each image's range, the paper's parametrisation (Smilkov et al. 2017, section 3).
        spread = ops.max(x, axis=(1, 2, 3)) - ops.min(x, axis=(1, 2, 3))
        sigma = ops.reshape(ops.cast(self.noise_level, x.dtype) * spread, (-1, 1, 1, 1))
        seed = _fresh_seed() if self.seed is None else self.seed
        per_pass = _points_per_pass(self.batch_size, x.shape[0], self.samples)

        def noisy(samples: Tensor) -> Tensor:
            copies = [x + sigma * _noise_like(x, seed, samples[k]) for k in range(samples.shape[0])]
            return copies[0] if len(copies) == 1 else ops.concatenate(copies, axis=0)

        total = _gradient_sum(view, x, labels, training, self.samples, per_pass, noisy)
        return total / ops.cast(self.samples, total.dtype)


#: The quadrature rules of `IntegratedGradients`: steps -> (path positions alpha, weights summing to 1).
_RULES: dict[str, Callable[[int], tuple[list[float], list[float]]]] = {
    # Sundararajan et al. 2017, Eq. 3: the right Riemann sum.
    "right": lambda m: ([(k + 1) / m for k in range(m)], [1 / m] * m),
    # The midpoint Riemann sum: the same cost, second-order accurate (error O(1/m^2)).
    "midpoint": lambda m: ([(k + 0.5) / m for k in range(m)], [1 / m] * m),
    # The trapezoidal rule over m points including both ends (xplique's IntegratedGradients).
    "trapezoid": lambda m: (
        [k / (m - 1) for k in range(m)],
        [(0.5 if k in (0, m - 1) else 1.0) / (m - 1) for k in range(m)],
    ),
}


@dataclasses.dataclass(frozen=True)
class IntegratedGradients(_AttributionSaliency):
    """Integrated Gradients (Sundararajan et al. 2017, arXiv 1703.01365).

        attributions = (x - baseline) * integral_0^1 d logit_y / d x (baseline + a (x - baseline)) da,

    the integral by a quadrature over `steps` points of the straight path (`rule`: "midpoint", the
    default, a Riemann sum at the middle of each of `steps` intervals, exact to O(1/steps^2); "right",
    the paper's Eq. 3; "trapezoid", xplique's), then `reduce` over channels (default `abs_channel_sum`:
    the attributions are additive, so a pixel's is the sum of its channels'). `x` is the preprocessed
    image and `baseline` a point of that space (default 0: a black image for 0-centred inputs), a scalar
    or an array broadcastable to x. The attributions sum to logit(x) - logit(baseline) over pixels and
    channels, up to the quadrature's error (completeness).

    Each pass differentiates up to `batch_size` points: (batch_size // N) path points of the N images
    (at least one). Not for training (`twice_differentiable` is False).
    """

    name: str = "integrated_gradients"
    steps: int = 50
    baseline: Any = 0.0
    rule: str = "midpoint"
    batch_size: int = 64
    reduce: ChannelReduction = abs_channel_sum
    description: str = (
        "Integrated Gradients (Sundararajan et al. 2017): |sum over colour channels of (x - baseline) * "
        "mean of d logit[label] / d x along the straight path|, x the preprocessed input, baseline 0"
    )

    def __post_init__(self):
        if self.rule not in _RULES:
            raise ValueError(f"`rule` must be one of {sorted(_RULES)}; got {self.rule!r}.")
        check_int(self.steps, "steps", minimum=2 if self.rule == "trapezoid" else 1)
        _check_batch_size(self.batch_size)

    def attributions_at(self, view, x, labels, training: bool = False) -> Tensor:
        """The per-channel attributions (N, H, W, C) of `x`, a batch of preprocessed images."""
        x = ops.convert_to_tensor(x)
        labels = ops.convert_to_tensor(labels)
        baseline = ops.broadcast_to(ops.cast(self.baseline, x.dtype), ops.shape(x))
        delta = x - baseline
        alphas, weights = _RULES[self.rule](self.steps)
        per_pass = _points_per_pass(self.batch_size, x.shape[0], self.steps)
        positions = ops.convert_to_tensor(alphas, x.dtype)

        def on_path(steps: Tensor) -> Tensor:
            alpha = ops.reshape(ops.take(positions, steps), (-1, 1, 1, 1, 1))
            return ops.reshape(baseline[None] + alpha * delta[None], (-1, *ops.shape(x)[1:]))

        total = _gradient_sum(view, x, labels, training, self.steps, per_pass, on_path, weights)
        return ops.cast(delta, total.dtype) * total


@dataclasses.dataclass(frozen=True)
class FunctionSaliency(SaliencyMethod):
    """A plain function `fn(model, images, labels) -> maps (N, H, W)` as a saliency method.

    For evaluation only: `evaluate_alignment` calls it eagerly (it may use NumPy) with the batch's images
    and labels as tensors, and takes the logits for the accuracy from a separate forward pass. Its maps
    may have any size; they are resized to the human maps'.
    """

    fn: Callable[..., Any]
    name: str = ""

    def __post_init__(self):
        if not self.name:
            object.__setattr__(self, "name", getattr(self.fn, "__name__", type(self.fn).__name__))

    def logits_and_maps(self, model, images, labels, *, training: bool = False, **saliency_options):
        view, images = saliency_view(model, images, **saliency_options)
        logits = logits_at(view, view.split(images, training=training), training)
        return logits, self.fn(model, images, labels)


GRADIENT_MEAN = GradientSaliency(
    "gradient_mean",
    channel_mean,
    "mean over colour channels of d logit[label] / d x, x the preprocessed input (the published training map, "
    "serre-lab/Harmonization training/loss.py)",
)
GRADIENT_MAX_ABS = GradientSaliency(
    "gradient_max_abs",
    channel_max_abs,
    "max over colour channels of |d logit[label] / d x|, x the preprocessed input "
    "(harmonization.evaluate_alignment; xplique Saliency in the published code)",
)

_REGISTRY: dict[str, SaliencyMethod] = {}


def register_saliency_method(method: SaliencyMethod, *, replace: bool = False) -> SaliencyMethod:
    """Make `method` available by its name (to `HarmonizedModel`, `evaluate_alignment`, saved configs).

    A `HarmonizedModel` saves its method by name: register a custom one before loading the model.

    Args:
        method: a `SaliencyMethod` (e.g. `GradientSaliency("grad_l2", my_reduction)`, or
            `SmoothGrad(name="smoothgrad_10", samples=10)`).
        replace: replace a method already registered under that name (otherwise an error).

    Returns:
        `method`.
    """
    if not isinstance(method, SaliencyMethod):
        raise TypeError(
            f"`method` must be a SaliencyMethod (wrap a function with get_saliency_method(fn)); "
            f"got {type(method).__name__}."
        )
    if not isinstance(method.name, str) or not method.name:
        raise ValueError(f"A saliency method needs a non-empty name; got {method.name!r}.")
    if method.name in _REGISTRY and not replace and _REGISTRY[method.name] is not method:
        raise ValueError(
            f"A saliency method is already registered as {method.name!r}; pass replace=True to replace it."
        )
    _REGISTRY[method.name] = method
    return method


def list_saliency_methods(*, trainable: bool | None = None) -> list[str]:
    """The registered names, built-in ones first; `trainable=True` keeps those `HarmonizedModel` accepts."""
    if trainable is None:
        return list(_REGISTRY)
    return [name for name, method in _REGISTRY.items() if _trains(method) == trainable]


def get_saliency_method(method: str | SaliencyMethod | Callable) -> SaliencyMethod:
    """A registered name, a `SaliencyMethod`, or a function `fn(model, images, labels) -> maps` as a method.

    An unknown name raises a ValueError that lists the registered names and the closest one.
    """
    if isinstance(method, SaliencyMethod):
        return method
    if isinstance(method, str):
        if method in _REGISTRY:
            return _REGISTRY[method]
        close = difflib.get_close_matches(method.lower(), list(_REGISTRY), n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"Unknown saliency method {method!r}.{hint} Registered: {', '.join(map(repr, _REGISTRY))} "
            "(or pass a SaliencyMethod, or a function (model, images, labels) -> maps)."
        )
    if callable(method):
        return FunctionSaliency(method)
    raise TypeError(
        "A saliency method is a registered name, a SaliencyMethod or a function (model, images, labels) -> maps; "
        f"got {type(method).__name__}."
    )


def _trains(method: SaliencyMethod) -> bool:
    return isinstance(method, GradientSaliency) and method.twice_differentiable


def training_saliency_method(method: str | SaliencyMethod | Callable) -> GradientSaliency:
    """`get_saliency_method(method)`, refused with a ValueError unless it can train a `HarmonizedModel`.

    The harmonization loss is differentiated w.r.t. the weights through the saliency map, so the map must
    be exact and cheap to differentiate again: a `GradientSaliency` whose `twice_differentiable` is True.
    """
    resolved = get_saliency_method(method)
    if not _trains(resolved):
        allowed = ", ".join(map(repr, list_saliency_methods(trainable=True)))
        raise ValueError(
            f"`saliency`={resolved.name!r} cannot train a HarmonizedModel: the harmonization loss is "
            "differentiated through the saliency map, which needs a channel reduction of the input gradient "
            f"that is differentiable twice (a GradientSaliency with twice_differentiable=True). "
            f"Methods allowed for training: {allowed}. Use {resolved.name!r} to evaluate instead: "
            f"evaluate_alignment(model, dataset, saliency={resolved.name!r})."
        )
    return resolved


for _method in (GRADIENT_MEAN, GRADIENT_MAX_ABS, SmoothGrad(), IntegratedGradients()):
    register_saliency_method(_method)
del _method
