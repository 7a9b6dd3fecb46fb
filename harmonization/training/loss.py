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
    return losses.pyramidal_mse(true_heatmaps, predicted_heatmaps, tokens, levels=nb_levels)


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
    """
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
