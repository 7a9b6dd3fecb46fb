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

from typing import Callable

import keras
import tensorflow as tf

from harmonization.saliency_input import SaliencyInput, resolve_saliency_input


def one_hot_labels(labels, num_classes: int, dtype=tf.float32) -> tf.Tensor:
    """Integer ids of shape (N,) or (N, 1), or one-hot/soft labels (N, C) -> float (N, C)."""
    labels = tf.convert_to_tensor(labels)
    if labels.shape.rank == 2 and labels.shape[-1] == num_classes and num_classes != 1:
        return tf.cast(labels, dtype)
    if labels.shape.rank == 2 and labels.shape[-1] == 1:
        labels = labels[:, 0]
    if labels.shape.rank != 1:
        raise ValueError(
            f"`labels` must be integer class ids of shape (N,) or one-hot of shape (N, {num_classes}); "
            f"got shape {tuple(labels.shape)}."
        )
    if labels.dtype.is_floating:
        labels = tf.cast(tf.round(labels), tf.int32)
    return tf.one_hot(tf.cast(labels, tf.int32), num_classes, dtype=dtype)


def channel_mean(grads: tf.Tensor) -> tf.Tensor:
    """(N, H, W, C) -> (N, H, W): the mean over channels, signed (the published training map's reduction,
    serre-lab/Harmonization `training/loss.py`: `tf.reduce_mean(gradients, -1)`)."""
    return tf.reduce_mean(grads, axis=-1)


def channel_max_abs(grads: tf.Tensor) -> tf.Tensor:
    """(N, H, W, C) -> (N, H, W): the max over channels of the absolute value (Simonyan et al. 2014; xplique
    `Saliency`, which the published `evaluate_clickme` uses: the evaluation map's reduction)."""
    return tf.reduce_max(tf.abs(grads), axis=-1)


def saliency_view(
    model,
    images,
    *,
    saliency_input: str | None = "auto",
    preprocessing: Callable | None = None,
    output: int | str | None = None,
    allow_softmax: bool = True,
) -> tuple[SaliencyInput, tf.Tensor]:
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
    images = tf.convert_to_tensor(images)
    if images.shape.rank != 4:
        raise ValueError(f"`images` must have shape (N, H, W, C); got {tuple(images.shape)}.")
    if not images.dtype.is_floating:
        images = tf.cast(images, tf.float32)
    return view, images


def _at_least_float32(values: tf.Tensor) -> tf.Tensor:
    """Saliency is computed in at least float32, also under mixed precision."""
    return tf.cast(values, tf.float32) if values.dtype in (tf.float16, tf.bfloat16) else values


def logits_at(view: SaliencyInput, x, training: bool = False) -> tf.Tensor:
    """The logits of `view.network` at `x` (a point of the differentiated space), in at least float32."""
    return _at_least_float32(view.network(x, training=training))


def class_logit_gradient_at(view: SaliencyInput, x, labels, training: bool = False):
    """Return (logits, d sum(logits * onehot(labels)) / d x) at `x`, a batch of points of the space that
    `view` differentiates (e.g. the preprocessed images, or noisy copies of them), from one forward pass.

    Called inside an outer `tf.GradientTape`, the gradient stays differentiable w.r.t. the weights.
    """
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = logits_at(view, x, training=training)
        onehot = one_hot_labels(labels, logits.shape[-1], logits.dtype)
        class_score = tf.reduce_sum(logits * onehot, axis=-1)
    grads = tape.gradient(class_score, x)
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
    Logits come back in at least float32; the gradient has x's shape (N, H, W, C). Called inside an
    outer `tf.GradientTape`, the gradient stays differentiable w.r.t. the weights.
    """
    view, images = saliency_view(
        model, images, saliency_input=saliency_input, preprocessing=preprocessing, output=output,
        allow_softmax=allow_softmax,
    )
    x = view.split(images, training=training)
    return class_logit_gradient_at(view, x, labels, training=training)


def input_gradients(model, images, labels, training: bool = False, **saliency_options) -> tf.Tensor:
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


def saliency_map(model, images, labels, training: bool = False, **saliency_options) -> tf.Tensor:
    """Evaluation-time saliency: max over channels of |d logit_y / d preprocessed input| (Simonyan et al.
    2014; xplique `Saliency`, as the published `evaluate_clickme` uses it).

    The saliency method "gradient_max_abs" of `harmonization.saliency_methods`. Same arguments as
    `input_gradients`; returns a non-negative float tensor (N, H, W).
    """
    _, grads = class_logit_gradient(model, images, labels, training, **saliency_options)
    return channel_max_abs(grads)
