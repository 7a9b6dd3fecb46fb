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
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
from typing import Any, Callable, Sequence

import numpy as np
import tensorflow as tf

from harmonization._validation import check_int, check_number
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

ChannelReduction = Callable[[tf.Tensor], tf.Tensor]


def abs_channel_sum(attributions: tf.Tensor) -> tf.Tensor:
    """(N, H, W, C) -> (N, H, W): |sum over channels|, the reduction of additive attributions.

    Integrated Gradients' attributions add up to f(x) - f(baseline) (completeness, Sundararajan et al.
    2017), so a pixel's share is the sum of its channels' shares; its magnitude ranks its importance,
    which is what a human map records (the sign says only whether it raised or lowered the logit).
    """
    return tf.abs(tf.reduce_sum(attributions, axis=-1))


class SaliencyMethod(abc.ABC):
    """A saliency method: `method(model, images, labels) -> maps (N, H, W)`.

    Subclasses implement `logits_and_maps`; they are run inside `tf.function` by `evaluate_alignment`,
    so they must be traceable (TensorFlow ops, Python loops of static length).

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
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """(logits (N, num_classes) of the clean images, maps (N, H, W)).

        Args:
            model: a Keras classifier that returns logits.
            images: (N, H, W, C) images in the model's input range.
            labels: class ids (N,) or one-hot/soft labels (N, num_classes): whose logit is explained.
            training: passed to the model.
            **saliency_options: `saliency_input`, `preprocessing`, `output`, `allow_softmax`; see
                `harmonization.saliency.class_logit_gradient`.
        """

    def __call__(self, model, images, labels, *, training: bool = False, **saliency_options) -> tf.Tensor:
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


def _repeat(values: tf.Tensor, times: int) -> tf.Tensor:
    """`values` stacked `times` times along the batch axis: point-major, image-minor."""
    return values if times == 1 else tf.concat([values] * times, axis=0)


def _gradient_sum(
    view,
    x: tf.Tensor,
    labels: tf.Tensor,
    training: bool,
    num_points: int,
    per_pass: int,
    points: Callable[[tf.Tensor], tf.Tensor],
    weights: Sequence[float] | None = None,
) -> tf.Tensor:
    """sum_j w_j * d logit_y / d x at `points(j)`, j < num_points, per image: (N, H, W, C), in at least float32.

    `points(indices)` returns the points of the images for each of the (static-length) `indices`, point-major:
    (len(indices) * N, H, W, C). Each pass differentiates `per_pass` of them; the full passes run in a
    `tf.while_loop`, so a traced graph holds the model twice (a full pass and the remainder), not once per point.
    """
    dtype = tf.float32 if x.dtype in (tf.float16, tf.bfloat16) else x.dtype
    weights = None if weights is None else tf.constant(weights, dtype)

    def pass_sum(start, count: int) -> tf.Tensor:
        indices = start + tf.range(count)
        _, grads = class_logit_gradient_at(view, points(indices), _repeat(labels, count), training=training)
        grads = tf.reshape(grads, tf.concat([[count], tf.shape(x)], axis=0))
        if weights is not None:
            grads = grads * tf.reshape(tf.gather(weights, indices), [count, 1, 1, 1, 1])
        return tf.reduce_sum(grads, axis=0)

    full, remainder = divmod(num_points, per_pass)
    if full == 1:
        total = pass_sum(tf.constant(0), per_pass)
    else:
        _, total = tf.while_loop(
            lambda i, _: i < full,
            lambda i, total: (i + 1, total + pass_sum(i * per_pass, per_pass)),
            (tf.constant(0), tf.zeros_like(x, dtype)),
            parallel_iterations=1,
        )
    if remainder:
        total += pass_sum(tf.constant(full * per_pass), remainder)
    return total


class _AttributionSaliency(SaliencyMethod):
    """A method that attributes the class logit to each input value, then reduces the channels (`reduce`).

    Subclasses implement `attributions_at(view, x, labels, training)` on the preprocessed images `x`.
    """

    reduce: ChannelReduction

    @abc.abstractmethod
    def attributions_at(self, view, x, labels, training: bool = False) -> tf.Tensor:
        """The per-channel attributions (N, H, W, C) of `x`, a batch of preprocessed images."""

    def attributions(self, model, images, labels, *, training: bool = False, **saliency_options) -> tf.Tensor:
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
    the sample and its row in the batch); `seed=None` draws fresh noise at every call. Each pass
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

    def attributions_at(self, view, x, labels, training: bool = False) -> tf.Tensor:
        """The mean gradient (N, H, W, C) over the noisy copies of `x`, a batch of preprocessed images."""
        x = tf.convert_to_tensor(x)
        labels = tf.convert_to_tensor(labels)
        # sigma as a share of each image's range, the paper's parametrisation (Smilkov et al. 2017, section 3).
        spread = tf.reduce_max(x, axis=[1, 2, 3]) - tf.reduce_min(x, axis=[1, 2, 3])
        sigma = tf.reshape(tf.cast(self.noise_level, x.dtype) * spread, [-1, 1, 1, 1])
        if self.seed is None:
            seed = tf.random.uniform([], 0, np.iinfo(np.int32).max, dtype=tf.int64)
        else:
            seed = tf.constant(self.seed, tf.int64)
        per_pass = _points_per_pass(self.batch_size, x.shape[0], self.samples)

        def noisy(samples: tf.Tensor) -> tf.Tensor:
            seeds = [tf.stack([seed, tf.cast(samples[k], tf.int64)]) for k in range(samples.shape[0])]
            copies = [x + sigma * tf.random.stateless_normal(tf.shape(x), seed=s, dtype=x.dtype) for s in seeds]
            return copies[0] if len(copies) == 1 else tf.concat(copies, axis=0)

        total = _gradient_sum(view, x, labels, training, self.samples, per_pass, noisy)
        return total / tf.cast(self.samples, total.dtype)


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

    def attributions_at(self, view, x, labels, training: bool = False) -> tf.Tensor:
        """The per-channel attributions (N, H, W, C) of `x`, a batch of preprocessed images."""
        x = tf.convert_to_tensor(x)
        labels = tf.convert_to_tensor(labels)
        baseline = tf.broadcast_to(tf.cast(self.baseline, x.dtype), tf.shape(x))
        delta = x - baseline
        alphas, weights = _RULES[self.rule](self.steps)
        per_pass = _points_per_pass(self.batch_size, x.shape[0], self.steps)
        positions = tf.constant(alphas, x.dtype)

        def on_path(steps: tf.Tensor) -> tf.Tensor:
            alpha = tf.reshape(tf.gather(positions, steps), [-1, 1, 1, 1, 1])
            return tf.reshape(baseline[None] + alpha * delta[None], tf.concat([[-1], tf.shape(x)[1:]], axis=0))

        total = _gradient_sum(view, x, labels, training, self.steps, per_pass, on_path, weights)
        return tf.cast(delta, total.dtype) * total


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
