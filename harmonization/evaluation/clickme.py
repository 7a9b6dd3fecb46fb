"""The published ClickMe benchmark (serre-lab/Harmonization 0.0.9, `harmonization/evaluation/clickme.py`).

`evaluate_clickme` keeps the published arguments and result: a dict of per-image lists `spearman`, `dice`,
`iou` and the paper's `alignment_score` (mean Spearman / `HUMAN_SPEARMAN_CEILING`). Without an explainer it
uses our gradient saliency, `harmonization.saliency.saliency_map` (max over channels of |d logit / d input|,
what the published default, xplique's `Saliency`, computes), so xplique is not needed. For new code,
`harmonization.evaluate_alignment` does the same with a progress target, accuracy and any batch format.

Importable without TensorFlow (`harmonization.evaluation` holds `evaluate_alignment` too, which runs on every
backend); `evaluate_clickme` and `load_clickme_val` read `tf.data` pipelines, so they need TensorFlow installed,
and say so in one sentence. The model may run on any Keras backend.
"""

from __future__ import annotations

import keras
import numpy as np

from harmonization import _backend, metrics
from harmonization.evaluation.metrics import to_numpy, dice, intersection_over_union, spearman_correlation
from harmonization.saliency import saliency_map

__all__ = ["HUMAN_SPEARMAN_CEILING", "evaluate_clickme", "load_clickme_val"]

#: Published: the mean Spearman correlation between two people's ClickMe maps of the same image.
HUMAN_SPEARMAN_CEILING = metrics.HUMAN_CEILING
#: What needs TensorFlow here (harmonization._backend.require_tensorflow).
NEEDS_TENSORFLOW = "The published 0.0.9 ClickMe benchmark (evaluate_clickme, load_clickme_val: tf.data pipelines)"


def load_clickme_val(batch_size=64):
    """The published ClickMe validation shards as batches `(images, heatmaps, labels)`: the published loader,
    `harmonization.common.load_clickme_val`, which needs TensorFlow (one clear error without it)."""
    _backend.require_tensorflow(NEEDS_TENSORFLOW)
    # Here, not at the top: harmonization.common is tf.data code, and this module must import without TensorFlow.
    from harmonization.common import load_clickme_val as published_loader

    return published_loader(batch_size)


def _gradient_explainer(model):
    """The published default explainer: (images, labels) -> max over channels of |d sum(logits * labels) / dx|.

    The gradient is taken after the preprocessing layers at the model's front, if any (none in the bare
    networks of `harmonization.models`, so there it is the model's input, as published). A softmax output is
    explained as published (xplique did not refuse it). On TensorFlow it is traced once as a `tf.function`, as
    before; on JAX and PyTorch it runs eagerly on the batch as NumPy arrays (the batches come from tf.data).
    """
    if _backend.name() != "tensorflow":
        return lambda images, labels: saliency_map(
            model, to_numpy(images), to_numpy(labels), allow_softmax=True
        )
    import tensorflow as tf  # here: only the TensorFlow backend traces the explainer

    @tf.function(reduce_retracing=True)
    def explain(images, labels):
        return saliency_map(model, images, labels, allow_softmax=True)

    return explain


def _channel_mean(maps):
    """(N, H, W, C) maps averaged over channels, as published (`tf.reduce_mean(maps, -1)` on TensorFlow)."""
    if _backend.name() == "tensorflow":
        import tensorflow as tf  # here: the published reduction, kept bit for bit on its own backend

        return tf.reduce_mean(maps, -1)
    return np.mean(to_numpy(maps), axis=-1)


def evaluate_clickme(model, explainer=None, clickme_val_dataset=None, preprocess_inputs=None):
    """Evaluate a model's human alignment on the ClickMe validation set, as published.

    Args:
        model: keras.Model. The model to evaluate.
        explainer: callable or None. `f(images, labels) -> saliency maps` (N, H, W) or (N, H, W, C); defaults to
            the gradient saliency (max over channels of |gradient|).
        clickme_val_dataset: tf.data.Dataset or None. Batches `(images, heatmaps, labels)`; defaults to
            `load_clickme_val()` (downloads the published validation shards once).
        preprocess_inputs: callable or None. Applied to the images before the model (e.g.
            `harmonization.models.preprocess_input`); defaults to the identity.

    Returns:
        A dict: `spearman`, `dice`, `iou` (lists, one value per image) and `alignment_score` (float).

    Raises:
        MissingBackendError: TensorFlow is not installed (the dataset is a tf.data pipeline).
    """
    _backend.require_tensorflow(NEEDS_TENSORFLOW)
    import tensorflow as tf  # here: the dataset is tf.data, whatever backend the model runs on

    if clickme_val_dataset is None:
        clickme_val_dataset = load_clickme_val()
    if preprocess_inputs is None:
        preprocess_inputs = lambda images: images  # noqa: E731  (the published default)
    dataset = clickme_val_dataset.map(
        lambda images, heatmaps, labels: (preprocess_inputs(images), heatmaps, labels),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    if explainer is None:
        explainer = _gradient_explainer(model)

    scores = {"spearman": [], "dice": [], "iou": []}
    progress = keras.utils.Progbar(None, unit_name="batch")
    batches = 0
    for images, heatmaps, labels in dataset:
        batches += 1
        saliency_maps = explainer(images, labels)
        if len(saliency_maps.shape) == 4:
            saliency_maps = _channel_mean(saliency_maps)
        if len(heatmaps.shape) == 4:
            heatmaps = _channel_mean(heatmaps)
        scores["spearman"] += list(spearman_correlation(saliency_maps, heatmaps))
        scores["dice"] += list(dice(saliency_maps, heatmaps))
        scores["iou"] += list(intersection_over_union(saliency_maps, heatmaps))
        progress.update(batches)
    progress.update(batches, finalize=True)
    scores["alignment_score"] = np.mean(scores["spearman"]) / HUMAN_SPEARMAN_CEILING
    return scores
