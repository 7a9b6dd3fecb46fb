"""The published ClickMe benchmark (serre-lab/Harmonization 0.0.9, `harmonization/evaluation/clickme.py`).

`evaluate_clickme` keeps the published arguments and result: a dict of per-image lists `spearman`, `dice`,
`iou` and the paper's `alignment_score` (mean Spearman / `HUMAN_SPEARMAN_CEILING`). Without an explainer it
uses our gradient saliency, `harmonization.saliency.saliency_map` (max over channels of |d logit / d input|,
what the published default, xplique's `Saliency`, computes), so xplique is not needed. For new code,
`harmonization.evaluate_alignment` does the same with a progress target, accuracy and any batch format.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from harmonization import metrics
from harmonization.common import load_clickme_val
from harmonization.evaluation.metrics import dice, intersection_over_union, spearman_correlation
from harmonization.saliency import saliency_map

__all__ = ["HUMAN_SPEARMAN_CEILING", "evaluate_clickme", "load_clickme_val"]

#: Published: the mean Spearman correlation between two people's ClickMe maps of the same image.
HUMAN_SPEARMAN_CEILING = metrics.HUMAN_CEILING
AUTO = tf.data.AUTOTUNE


def _gradient_explainer(model):
    """The published default explainer: (images, labels) -> max over channels of |d sum(logits * labels) / dx|.

    The gradient is taken after the preprocessing layers at the model's front, if any (none in the bare
    networks of `harmonization.models`, so there it is the model's input, as published). A softmax output is
    explained as published (xplique did not refuse it).
    """

    @tf.function(reduce_retracing=True)
    def explain(images, labels):
        return saliency_map(model, images, labels, allow_softmax=True)

    return explain


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
    """
    if clickme_val_dataset is None:
        clickme_val_dataset = load_clickme_val()
    if preprocess_inputs is None:
        preprocess_inputs = lambda images: images  # noqa: E731  (the published default)
    dataset = clickme_val_dataset.map(
        lambda images, heatmaps, labels: (preprocess_inputs(images), heatmaps, labels), num_parallel_calls=AUTO
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
            saliency_maps = tf.reduce_mean(saliency_maps, -1)
        if len(heatmaps.shape) == 4:
            heatmaps = tf.reduce_mean(heatmaps, -1)
        scores["spearman"] += list(spearman_correlation(saliency_maps, heatmaps))
        scores["dice"] += list(dice(saliency_maps, heatmaps))
        scores["iou"] += list(intersection_over_union(saliency_maps, heatmaps))
        progress.update(batches)
    progress.update(batches, finalize=True)
    scores["alignment_score"] = np.mean(scores["spearman"]) / HUMAN_SPEARMAN_CEILING
    return scores
