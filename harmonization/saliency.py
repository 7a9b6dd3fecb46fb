"""Saliency maps: where a classifier looks, as the gradient of its class logit w.r.t. the pixels.

Two flavours, as in the published method (arXiv 2211.04533): the *training* map averages the signed
input gradient over channels (smooth, differentiable, what the harmonization loss compares), and the
*evaluation* map takes the max of its absolute value over channels (the classic Simonyan et al. map
that the alignment scores are reported on). Both are taken w.r.t. the preprocessed input, as published
(`harmonization.saliency_input`).

The pieces are public so that other methods can be built from them (`harmonization.saliency_methods`:
SmoothGrad, Integrated Gradients, your own): `saliency_view` splits a model at the differentiated
tensor, `class_logit_gradient_at` differentiates the class logit at any point of that space, and
`channel_mean` / `channel_max_abs` are the two published channel reductions.
"""

from __future__ import annotations

from typing import Any, Callable

import keras
from keras import ops

from harmonization.autodiff import input_gradient
from harmonization.saliency_input import SaliencyInput, resolve_saliency_input


def _is_floating(x) -> bool:
    return "float" in keras.backend.standardize_dtype(x.dtype)


def one_hot_labels(labels, num_classes: int, dtype="float32"):
    """Integer ids of shape (N,) or (N, 1), or one-hot/soft labels (N, C) -> float (N, C)."""
    labels = ops.convert_to_tensor(labels)
    rank = len(labels.shape)
    if rank == 2 and labels.shape[-1] == num_classes and num_classes != 1:
        return ops.cast(labels, dtype)
    if rank == 2 and labels.shape[-1] == 1:
        labels = labels[:, 0]
        rank = 1
    if rank != 1:
        raise ValueError(
            f"`labels` must be integer class ids of shape (N,) or one-hot of shape (N, {num_classes}); "
            f"got shape {tuple(labels.shape)}."
        )
    if _is_floating(labels):
        labels = ops.round(labels)
    return ops.one_hot(ops.cast(labels, "int32"), num_classes, dtype=dtype)


def channel_mean(grads):
    """(N, H, W, C) -> (N, H, W): the mean over channels, signed (the published training map's reduction,
    serre-lab/Harmonization `training/loss.py`: `tf.reduce_mean(gradients, -1)`)."""
    return ops.mean(grads, axis=-1)


def channel_max_abs(grads):
    """(N, H, W, C) -> (N, H, W): the max over channels of the absolute value (Simonyan et al. 2014; xplique
    `Saliency`, which the published `evaluate_clickme` uses: the evaluation map's reduction)."""
    return ops.max(ops.abs(grads), axis=-1)


def saliency_view(
    model,
    images,
    *,
    saliency_input: str | None = "auto",
    preprocessing: Callable | None = None,
    output: int | str | None = None,
    allow_softmax: bool = True,
) -> tuple[SaliencyInput, Any]:
    """(the model split at the differentiated tensor, `images` as a float tensor (N, H, W, C)).

    `view.split(images)` is the tensor the published method differentiates (the preprocessed images) and
    `view.network` maps it to logits; see `harmonization.saliency_input.resolve_saliency_input` for the
    options. Every saliency method starts here, so they all explain the same function of the same input.
    """
    if isinstance(model, keras.Sequential) and not model.built and getattr(images, "shape", None) is not None:
        model.build((None, *tuple(images.shape)[1:]))  # its layers (and preprocessing) appear when built
    view = resolve_saliency_input(
        model, saliency_input=saliency_input, preprocessing=preprocessing, output=output, allow_softmax=allow_softmax
    )
    images = ops.convert_to_tensor(images)
    if len(images.shape) != 4:
        raise ValueError(f"`images` must have shape (N, H, W, C); got {tuple(images.shape)}.")
    if not _is_floating(images):
        images = ops.cast(images, "float32")
    return view, images


def _at_least_float32(values):
    """Saliency is computed in at least float32, also under mixed precision."""
    dtype = keras.backend.standardize_dtype(values.dtype)
    return ops.cast(values, "float32") if dtype in ("float16", "bfloat16") else values


def logits_at(view: SaliencyInput, x, training: bool = False):
    """The logits of `view.network` at `x` (a point of the differentiated space), in at least float32."""
    return _at_least_float32(view.network(x, training=training))


def class_logit_gradient_at(view: SaliencyInput, x, labels, training: bool = False):
    """Return (logits, d sum(logits * onehot(labels)) / d x) at `x`, a batch of points of the space that
    `view` differentiates (e.g. the preprocessed images, or noisy copies of them), from one forward pass.

    Differentiable w.r.t. the weights (inside an outer `tf.GradientTape`, a differentiated JAX function, or
    PyTorch autograd; `harmonization.autodiff`).
    """

    def class_score(point):
        logits = logits_at(view, point, training=training)
        onehot = one_hot_labels(labels, logits.shape[-1], logits.dtype)
        return ops.sum(logits * onehot), logits

    grads, logits = input_gradient(class_score, x)
    if grads is None:
        raise ValueError(
            "The model's output does not depend on `images` (no gradient). "
            "Is the model's first layer reachable from its input?"
        )
    return logits, _at_least_float32(grads)


def class_logit_gradient(
    model,
    images,
    labels,
    training: bool = False,
    *,
    saliency_input: str | None = "auto",
    preprocessing: Callable | None = None,
    output: int | str | None = None,
    allow_softmax: bool = True,
):
    """Return (logits, d sum(logits * onehot(labels)) / d x) from one forward pass.

    `x` is the tensor the published method differentiates: the *preprocessed* images. For a model with
    its preprocessing inside (every zoo model, or a `Rescaling`/`Normalization` layer at the front) it
    is that layer's output; see `harmonization.saliency_input.resolve_saliency_input` for the options.
    Logits come back in at least float32; the gradient has x's shape (N, H, W, C), differentiable w.r.t. the
    weights on every backend (see `class_logit_gradient_at`).
    """
    view, images = saliency_view(
        model, images, saliency_input=saliency_input, preprocessing=preprocessing, output=output,
        allow_softmax=allow_softmax,
    )
    x = view.split(images, training=training)
    return class_logit_gradient_at(view, x, labels, training=training)


def input_gradients(model, images, labels, training: bool = False, **saliency_options):
    """Training-time saliency: the gradient of the true-class logit w.r.t. the preprocessed input,
    averaged over channels (serre-lab/Harmonization `training/loss.py`: `tf.reduce_mean(gradients, -1)`).

    The saliency method "gradient_mean" of `harmonization.saliency_methods`.

    Args:
        model: a Keras model (or any differentiable callable) mapping images to logits.
        images: float tensor (N, H, W, C) in the model's input range.
        labels: integer class ids (N,) or one-hot labels (N, num_classes).
        training: passed to the model (True inside the harmonized training step).
        **saliency_options: `saliency_input`, `preprocessing`, `output`, `allow_softmax`; see
            `class_logit_gradient`.

    Returns:
        A float tensor (N, H, W).
    """
    _, grads = class_logit_gradient(model, images, labels, training, **saliency_options)
    return channel_mean(grads)


def saliency_map(model, images, labels, training: bool = False, **saliency_options):
    """Evaluation-time saliency: max over channels of |d logit_y / d preprocessed input| (Simonyan et al.
    2014; xplique `Saliency`, as the published `evaluate_clickme` uses it).

    The saliency method "gradient_max_abs" of `harmonization.saliency_methods`. Same arguments as
    `input_gradients`; returns a non-negative float tensor (N, H, W).
    """
    _, grads = class_logit_gradient(model, images, labels, training, **saliency_options)
    return channel_max_abs(grads)
