"""The published harmonization loss (serre-lab/Harmonization 0.0.9, `harmonization/training/loss.py`).

Same names, arguments and results, computed by the native code: `harmonization.losses` (the standardize-cut
and pyramidal MSE), `harmonization.saliency` (the input gradient) and `harmonization.harmonized_model` (the
weight decay). Two things differ from 0.0.9 only where 0.0.9 could not run or was inexact on Keras 3:
variables are matched to the weight-decay exclusions by their Keras 3 path (`dense/kernel`; Keras 2's names
carried the layer too), and normalisation layers are differentiated twice exactly
(`harmonization.second_order`).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from harmonization import losses, second_order
from harmonization.harmonized_model import weight_decay
from harmonization.saliency import channel_mean, class_logit_gradient, one_hot_labels
from harmonization.training.pyramid import channels_as_maps

__all__ = ["Cross_entropy", "harmonizer_loss", "pyramidal_mse_with_tokens", "standardize_cut"]

#: The published cross-entropy: from logits, per example, label smoothing 0.1.
Cross_entropy = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None, label_smoothing=0.1)


def standardize_cut(heatmaps, axes=(1, 2), epsilon=1e-5):
    """Standardise each heatmap over `axes` (zero mean, unit population std + `epsilon`) and apply ReLU.

    Args:
        heatmaps: (N, H, W) or (N, H, W, C) tensor.
        axes: the spatial axes, (1, 2) as published (the only value supported).
        epsilon: added to the standard deviation.

    Returns:
        A tensor of the input's shape, >= 0.
    """
    if tuple(axes) != (1, 2):
        raise ValueError(f"`axes` must be (1, 2) (the heatmaps' spatial axes); got {axes!r}.")
    heatmaps = tf.convert_to_tensor(heatmaps)
    if heatmaps.shape.rank == 4 and heatmaps.shape[-1] != 1:
        # One map per channel, standardised on its own, as reduce_mean over axes (1, 2) does.
        maps, back = channels_as_maps(heatmaps)
        return back(losses.standardize_cut(maps, epsilon))
    return losses.standardize_cut(heatmaps, epsilon)


def pyramidal_mse_with_tokens(true_heatmaps, predicted_heatmaps, tokens, nb_levels=5):
    """Mean over the first `nb_levels` levels of the Gaussian pyramid of mean((a - b)^2 * token).

    Args:
        true_heatmaps, predicted_heatmaps: (N, H, W) maps.
        tokens: (N,) per-example weights.
        nb_levels: pyramid levels compared.

    Returns:
        A scalar tensor.
    """
    maps = _shape_of(true_heatmaps)
    _check_tokens(tokens, maps[0] if maps.rank else None, "true_heatmaps")
    return losses.pyramidal_mse(true_heatmaps, predicted_heatmaps, tokens, levels=nb_levels)


def _check_weight(value, name: str) -> None:
    """A loss weight is a finite real scalar (a number, or a scalar numeric tensor or variable, e.g. a schedule)."""
    tensor = None
    if not isinstance(value, (bool, np.bool_, str, bytes)) and value is not None:
        try:
            tensor = tf.convert_to_tensor(value)
        except (TypeError, ValueError):
            pass
    if tensor is None or not (tensor.dtype.is_floating or tensor.dtype.is_integer) or tensor.shape.rank != 0:
        raise ValueError(f"`{name}` must be a finite real number (a scalar); got {value!r:.100}.")
    known = tf.get_static_value(tensor)
    if known is not None and not np.isfinite(known):
        raise ValueError(f"`{name}` must be a finite real number (a scalar); got {value!r:.100}.")


def _shape_of(value) -> tf.TensorShape:
    """The static shape of a tensor, variable, array or nested list, without converting it."""
    return tf.TensorShape(value.shape if hasattr(value, "shape") else np.shape(value))


def _check_tokens(tokens, count: int | None, batch: str) -> None:
    """`tokens` weigh the examples of `batch` (`count` of them): a scalar, or one weight each."""
    shape = _shape_of(tokens)
    if not shape.rank:  # a scalar weighs every example alike; an unknown rank is checked when it runs
        return
    if shape.rank > 2 or (shape.rank == 2 and shape[1] not in (1, None)) or not (
        tf.TensorShape([count]).is_compatible_with(shape[:1])
    ):
        n = "N" if count is None else str(count)
        raise ValueError(
            f"`tokens` must hold one weight per example, shape ({n},) or ({n}, 1) (`{batch}` holds {n}); "
            f"got shape {tuple(shape)}."
        )


def _check_batch(images, tokens, labels, true_heatmaps) -> None:
    """One token, one label row and one human map per image, the maps of the images' size: a sentence naming the
    argument, the shape expected and the shape given, instead of a broadcasting error deep in the step."""
    images_shape = _shape_of(images)
    if images_shape.rank != 4:
        raise ValueError(f"`images` must have shape (N, H, W, C); got shape {tuple(images_shape)}.")
    count, height, width = images_shape[0], images_shape[1], images_shape[2]
    _check_tokens(tokens, count, "images")
    n = "N" if count is None else str(count)
    shape = _shape_of(labels)
    if shape.rank and not tf.TensorShape([count]).is_compatible_with(shape[:1]):
        raise ValueError(
            f"`labels` must hold one row per image, shape ({n}, num_classes) (`images` holds {n}); got shape "
            f"{tuple(shape)}."
        )
    shape = _shape_of(true_heatmaps)
    if shape.rank is not None:
        maps = shape[:3] if shape.rank == 4 and shape[3] in (1, None) else shape
        if shape.rank not in (3, 4) or not tf.TensorShape([count, height, width]).is_compatible_with(maps):
            size = ", ".join("?" if d is None else str(d) for d in (count, height, width))
            raise ValueError(
                f"`true_heatmaps` must hold one map of the images' size per image, shape ({size}) or ({size}, 1); "
                f"got shape {tuple(shape)}."
            )


def harmonizer_loss(model, images, tokens, labels, true_heatmaps, cross_entropy=Cross_entropy,
                    lambda_weights=1e-5, lambda_harmonization=1.0):
    """The gradients of one harmonized training step: cross-entropy + weight decay + harmonization term.

    The saliency is the channel mean of d sum(logits * labels) / d x (x: the model's input, or the output of
    the preprocessing layers at its front), compared with `true_heatmaps` after the standardize-cut, the human
    map rescaled to the saliency's peak, over a 5-level Gaussian pyramid, weighted by `tokens`.

    Args:
        model: keras.Model returning logits.
        images: (N, H, W, C) batch.
        tokens: (N,) weights of the harmonization term (1 = the image has a human map).
        labels: (N, num_classes) one-hot (or soft) labels.
        true_heatmaps: (N, H, W) human maps (e.g. ClickMe).
        cross_entropy: loss `f(labels, logits)` per example. Defaults to the published `Cross_entropy`.
        lambda_weights: weight of sum(||w||^2 / 2) over the non-normalisation, non-embedding weights.
        lambda_harmonization: weight of the harmonization term.

    Returns:
        The list of gradients, one per `model.trainable_variables`.

    Raises:
        ValueError: an argument of the wrong shape or type, named with what was expected and what came.
    """
    if not callable(cross_entropy):
        raise ValueError(f"`cross_entropy` must be a loss function f(labels, logits); got {cross_entropy!r:.100}.")
    _check_weight(lambda_weights, "lambda_weights")
    _check_weight(lambda_harmonization, "lambda_harmonization")
    _check_batch(images, tokens, labels, true_heatmaps)
    with tf.GradientTape() as tape:
        with second_order.exact_moments():
            logits, gradients = class_logit_gradient(model, images, labels, training=True, allow_softmax=True)
        saliency = channel_mean(tf.cast(gradients, tf.float32))  # published: tf.reduce_mean(gradients, -1)
        harmonization = losses.harmonization_loss(saliency, true_heatmaps, tokens)
        onehot = one_hot_labels(labels, logits.shape[-1], logits.dtype)
        cce = tf.reduce_mean(cross_entropy(onehot, logits))
        loss = (
            tf.cast(cce, tf.float32)
            + tf.cast(weight_decay(model) * lambda_weights, tf.float32)
            + tf.cast(harmonization * lambda_harmonization, tf.float32)
        )
    return tape.gradient(loss, model.trainable_variables)
