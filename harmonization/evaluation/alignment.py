"""Score a model's human alignment on a dataset of human feature-importance maps (e.g. ClickMe).

`evaluate_alignment` runs a model (or any saliency explainer, so PyTorch and JAX models can be scored
too) over a dataset of `image`, `heatmap`, `label` (and optional `token`) batches and reports, per
image, the Spearman correlation, Dice and IoU between its saliency map and the human map
(`harmonization.metrics`), their means, and the alignment score of the neural harmonizer paper
(arXiv 2211.04533): mean Spearman / human inter-rater ceiling. Both ends are seams: `saliency=` picks
the saliency method (`harmonization.saliency_methods`; the published evaluation map by default) and
`metrics=` the per-image metrics (`harmonization.metrics.DEFAULT_METRICS` by default).

It runs on every Keras backend. On TensorFlow a Keras model's saliency is traced once (`tf.function`) and the
maps stay tensors on their device; on JAX and PyTorch the saliency runs eagerly and the maps are scored on the
host (`harmonization.metrics` is NumPy there). The data may be NumPy arrays, any iterable of batches, or a
`tf.data.Dataset` (on any backend where TensorFlow is installed: its batches are read as NumPy arrays).
"""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Any, Callable, Iterable, Mapping

import keras
import numpy as np

from harmonization import _backend
from harmonization import metrics as _metrics  # `metrics` is evaluate_alignment's argument
from harmonization._host_checks import host_array, label_layout, label_problem, token_problem
from harmonization._numbers import check_int
from harmonization.batch import HEATMAP, IMAGE, KEYS, LABEL, TOKEN, heatmap_maps, unpack
from harmonization.saliency_input import AUTO, RAW_INPUT, resolve_saliency_input
from harmonization.saliency_methods import GRADIENT_MAX_ABS, FunctionSaliency, SaliencyMethod, get_saliency_method

#: Whether Keras runs on TensorFlow: then the saliency is traced and the maps stay tensors (see the docstring).
_ON_TENSORFLOW = _backend.is_tensorflow()
if _ON_TENSORFLOW:
    # Only the TensorFlow backend needs TensorFlow here: on JAX and PyTorch it may not be installed.
    import tensorflow as tf

    # The tensor check of the maps, TensorFlow code as the path that uses it.
    from harmonization._validation import as_maps


def _to_numpy(value, what: str) -> np.ndarray:
    """`value` (a NumPy array, or a tensor of any backend on any device) as a NumPy array, or a TypeError naming
    `what`."""
    try:
        return host_array(value)
    except Exception as error:  # e.g. an object NumPy cannot read
        raise TypeError(
            f"{what} must be a NumPy array or a tensor convertible with np.asarray; got "
            f"{type(value).__name__} ({error}). Detach it and move it to the CPU first."
        ) from error


def _tf_dataset_type() -> type | None:
    """`tf.data.Dataset` when TensorFlow has been imported, else None (no dataset can exist then): recognising one
    costs no TensorFlow import on JAX or PyTorch."""
    tensorflow = sys.modules.get("tensorflow")
    return getattr(getattr(tensorflow, "data", None), "Dataset", None)


def _batch_arrays(batch, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Return (images, heatmaps, labels, tokens or None) of one batch as NumPy arrays, checked once, here."""
    parts = unpack(batch, where=f"batch {index} of `dataset`")
    images, heatmaps, labels, tokens = (
        None if part is None else _to_numpy(part, f"`{name}` of batch {index}")
        for part, name in zip(parts, KEYS)
    )

    if images.ndim != 4:
        raise ValueError(
            f"`image` of batch {index} must have shape (N, H, W, C); got {images.shape}. "
            "Batch the dataset first (e.g. `dataset.batch(32)`)."
        )
    n = images.shape[0]
    heatmaps = heatmap_maps(heatmaps, f"`heatmap` of batch {index}")
    if not np.all(np.isfinite(heatmaps)):
        raise ValueError(f"`heatmap` of batch {index} contains NaN or Inf values.")
    if labels.ndim == 0 or labels.ndim > 2:
        raise ValueError(
            f"`label` of batch {index} must be class ids (N,) or one-hot labels (N, C); got {labels.shape}."
        )
    # The upper bound needs the model's class count: `_check_label_range` once the logits are known.
    problem = label_problem(labels, None, label_layout(labels.shape, None))
    if problem is not None:
        raise ValueError(f"`label` of batch {index} {problem}")
    if tokens is not None:
        if tokens.ndim == 2 and tokens.shape[1] == 1:
            tokens = tokens[:, 0]
        elif tokens.ndim == 0:
            tokens = np.full([n], tokens)
        if tokens.ndim != 1:
            raise ValueError(
                f"`token` of batch {index} must have shape (N,) or (N, 1), one per example; got {tokens.shape}."
            )
        problem = token_problem(tokens)
        if problem is not None:
            raise ValueError(f"`token` of batch {index} {problem}")
    sizes = {IMAGE: n, HEATMAP: heatmaps.shape[0], LABEL: labels.shape[0]}
    if tokens is not None:
        sizes[TOKEN] = tokens.shape[0]
    if len(set(sizes.values())) != 1:
        raise ValueError(f"The parts of batch {index} have different batch sizes: {sizes}.")
    return images, heatmaps, labels, tokens


def _check_label_range(labels: np.ndarray, num_classes: int, index: int) -> None:
    """Refuse class ids >= the model's number of logits: tf.one_hot would score them as an all-zero map."""
    problem = label_problem(labels, num_classes, label_layout(labels.shape, None))
    if problem is not None:
        raise ValueError(f"`label` of batch {index} {problem} The model has {num_classes} logits.")


def _class_ids(labels: np.ndarray) -> np.ndarray:
    """Integer ids (N,) from ids (N,), (N, 1) or one-hot/soft labels (N, C)."""
    if labels.ndim == 2 and labels.shape[1] > 1:
        return np.argmax(labels, axis=1)
    return np.rint(labels.reshape(-1)).astype(np.int64)


def _keras_saliency(model: keras.layers.Layer, method: SaliencyMethod, options: Mapping[str, Any]) -> Callable:
    """(images, labels) -> (logits, saliency) of `method`; a gradient method runs the model once for both."""
    resolve_saliency_input(model, **options)  # a softmax or an ambiguous output fails here, before any batch

    def logits_and_saliency(images, labels):
        return method.logits_and_maps(model, images, labels, training=False, **options)

    if isinstance(method, FunctionSaliency) or not _ON_TENSORFLOW:
        return logits_and_saliency  # a plain function may use NumPy; JAX and PyTorch run it eagerly
    return tf.function(logits_and_saliency, reduce_retracing=True)


def _metric_functions(chosen: Mapping[str, Callable] | None, percentile: float) -> dict[str, Callable]:
    """name -> fn(saliency_maps, human_maps) -> (N,); a metric with a `percentile` parameter gets `percentile`."""
    chosen = _metrics.DEFAULT_METRICS if chosen is None else chosen
    if not isinstance(chosen, Mapping) or not chosen:
        raise ValueError(
            "`metrics` must be a non-empty mapping {name: fn(saliency_maps, human_maps) -> per-image values}, "
            f"e.g. {{**harmonization.metrics.DEFAULT_METRICS, 'mine': fn}}; got {chosen!r}."
        )
    functions = {}
    for name, fn in chosen.items():
        if not isinstance(name, str) or not name or name in _RESERVED_KEYS or f"{name}_mean" in chosen:
            raise ValueError(
                f"`metrics` name {name!r} is not usable: names are non-empty strings other than "
                f"{sorted(_RESERVED_KEYS)}, and `<name>_mean` is where a metric's mean goes."
            )
        if not callable(fn):
            raise TypeError(f"`metrics[{name!r}]` must be a function (saliency_maps, human_maps); got {fn!r}.")
        try:
            takes_percentile = "percentile" in inspect.signature(fn).parameters
        except (TypeError, ValueError):  # no signature to read (some builtins)
            takes_percentile = False
        functions[name] = functools.partial(fn, percentile=percentile) if takes_percentile else fn
    return functions


def _per_image(values, num_images: int, name: str, index: int) -> np.ndarray:
    """A metric's per-image values for one batch, checked: one finite-or-not number per scored image."""
    values = _to_numpy(values, f"`metrics[{name!r}]`'s result for batch {index}")
    if values.shape != (num_images,) or not np.issubdtype(values.dtype, np.number):
        raise ValueError(
            f"`metrics[{name!r}]` returned {values.dtype} values of shape {values.shape} for batch {index}; "
            f"it must return one number per scored image, shape ({num_images},)."
        )
    return values


#: Keys of `evaluate_alignment`'s result that are not metrics.
_RESERVED_KEYS = frozenset(("alignment_score", "num_images", "accuracy"))


def _frozen(array: np.ndarray) -> np.ndarray:
    """A read-only copy of `array` that owns its memory: maps that cannot change, which `metrics.shared_overlaps`
    then binarises once for both Dice and IoU (on JAX and PyTorch, where the metrics take NumPy arrays)."""
    array = np.array(array, copy=True)
    array.setflags(write=False)
    return array


def _as_saliency(maps, num_images: int, size: tuple[int, int], index: int):
    """Validate an explainer's output and resize it (bilinear) to the human maps' size.

    On TensorFlow the maps become (or stay, on their device) a tensor; on JAX and PyTorch a read-only NumPy array.
    """
    if not (_ON_TENSORFLOW and isinstance(maps, tf.Tensor)):  # TensorFlow maps stay on their device
        maps = _to_numpy(maps, f"The explainer's output for batch {index}")
        if maps.dtype != np.float64:
            maps = maps.astype(np.float32)  # e.g. float16 or bfloat16 from PyTorch/JAX
    if not _ON_TENSORFLOW:
        maps = heatmap_maps(maps, "`model_or_explainer` output")
        _check_map_count(maps, num_images, index)
        if tuple(maps.shape[1:]) != tuple(size):
            # In float32: JAX has no float64 unless x64 is enabled (the scores only rank the resized values).
            resized = keras.ops.image.resize(maps[..., None].astype(np.float32), size, interpolation="bilinear")
            maps = keras.ops.convert_to_numpy(resized)[..., 0]
        if not np.all(np.isfinite(maps)):
            raise ValueError(f"The saliency maps of batch {index} contain NaN or Inf values.")
        return _frozen(maps)
    maps = as_maps(maps, "model_or_explainer output")
    _check_map_count(maps, num_images, index)
    if tuple(maps.shape[1:]) != tuple(size):
        maps = tf.image.resize(maps[..., None], size, method="bilinear")[..., 0]
    if not bool(tf.reduce_all(tf.math.is_finite(maps))):
        raise ValueError(f"The saliency maps of batch {index} contain NaN or Inf values.")
    return maps


def _check_map_count(maps, num_images: int, index: int) -> None:
    """Refuse an explainer that returned a number of maps other than the batch's scored images."""
    if maps.shape[0] != num_images:
        raise ValueError(
            f"`model_or_explainer` returned {maps.shape[0]} maps for batch {index}, which has "
            f"{num_images} scored images; it must return one (H, W) map per image."
        )


def _progress_target(dataset, max_batches: int | None) -> int | None:
    known = None
    dataset_type = _tf_dataset_type()
    if dataset_type is not None and isinstance(dataset, dataset_type):
        cardinality = int(dataset.cardinality())
        if cardinality == sys.modules["tensorflow"].data.INFINITE_CARDINALITY and max_batches is None:
            raise ValueError(
                "`dataset` is infinite (e.g. it ends with `.repeat()`); pass `max_batches` to bound it."
            )
        known = cardinality if cardinality >= 0 else None
    elif hasattr(dataset, "__len__"):
        known = len(dataset)
    if max_batches is None:
        return known
    return max_batches if known is None else min(known, max_batches)


def evaluate_alignment(
    model_or_explainer: keras.Model | Callable[[Any, Any], Any],
    dataset: Iterable,
    *,
    percentile: float = 10,
    ceiling: float = _metrics.HUMAN_CEILING,
    max_batches: int | None = None,
    verbose: int = 1,
    saliency_input: str | None = AUTO,
    preprocessing: Callable | None = None,
    output: int | str | None = None,
    allow_softmax: bool = False,
    saliency: str | SaliencyMethod | Callable | None = None,
    metrics: Mapping[str, Callable] | None = None,
) -> dict[str, Any]:
    """Score how well a model's saliency maps agree with human maps, image by image.

    Only the examples with `token > 0` are scored (all of them if the batches have no token): ClickMe
    marks the images without a human map with token 0. Saliency maps whose size differs from the human
    maps' are resized to it (bilinear) before scoring. Tokens must be in [0, 1], one per example; labels
    must be class ids in [0, number of logits) (whole numbers; floats are not rounded) or one-hot/soft
    rows, >= 0: anything else raises a ValueError naming the batch rather than scoring 0 silently.

    Args:
        model_or_explainer: a Keras model (or layer) returning logits, explained with `saliency`; or any
            callable `f(images, labels) -> maps` taking NumPy arrays and returning one map per image,
            (N, H, W) or (N, H, W, 1), as a NumPy array or a tensor: e.g. a PyTorch or JAX model's saliency.
        dataset: a `tf.data.Dataset` (any backend, TensorFlow installed) or any iterable of batches, each a dict
            `{"image": (N, H, W, C), "heatmap": (N, H, W[, 1]), "label": (N,) or (N, C)[, "token": (N,)]}`
            or a tuple `(image, heatmap, label[, token])`.
        percentile: share of pixels (in %) kept in each map for Dice and IoU; see `metrics.dice`.
        ceiling: human inter-rater Spearman correlation that normalises the alignment score.
        max_batches: stop after this many batches (all of them if None).
        verbose: 0 is silent, 1 shows a progress bar, 2 prints one line at the end.
        saliency_input: for a Keras model, where the saliency is taken: "auto" (after the preprocessing
            layers at the model's front, as published), "input" or a layer name; see
            `harmonization.saliency_input.resolve_saliency_input`.
        preprocessing: for a Keras model that expects preprocessed inputs: applied to the images first (the
            published `preprocess_inputs`); its output is differentiated.
        output: for a Keras model with several outputs: which one holds the logits.
        allow_softmax: accept a Keras model that ends in a softmax (refused by default: the saliency of
            probabilities saturates).
        saliency: for a Keras model, the saliency method (`harmonization.saliency_methods`): a registered
            name ("gradient_max_abs", "gradient_mean", "smoothgrad", "integrated_gradients", ...), a
            `SaliencyMethod` (e.g. `SmoothGrad(samples=20)`), or a function `fn(model, images, labels) ->
            maps` (called eagerly with tensors). None (default): "gradient_max_abs", max over channels of
            |d logit_label / d x|, x the preprocessed input, as the published `evaluate_clickme` with
            xplique `Saliency` (`harmonization.saliency.saliency_map`).
        metrics: the per-image metrics, `{name: fn(saliency_maps, human_maps) -> (N,) values}`; a function
            with a `percentile` parameter is given `percentile`. None (default):
            `harmonization.metrics.DEFAULT_METRICS`, Spearman, Dice and IoU. A mapping replaces the
            defaults; add to them with `{**harmonization.metrics.DEFAULT_METRICS, "mine": fn}`.

    Returns:
        A dict with, for each metric, the per-image array `name` and its mean `name + "_mean"` (by default
        the float32 arrays `"spearman"`, `"dice"` and `"iou"` and `"spearman_mean"`, `"dice_mean"`,
        `"iou_mean"`); `"alignment_score"` (spearman_mean / ceiling, when "spearman" is a metric),
        `"num_images"` (scored images) and, for a Keras model, `"accuracy"` (top-1 on the scored images).

    Example:

        scores = evaluate_alignment(model, clickme_test.batch(32), max_batches=10)
        print(scores["alignment_score"], scores["accuracy"])
        smooth = evaluate_alignment(model, clickme_test.batch(32), saliency="smoothgrad")
    """
    percentile = _metrics.check_percentile(percentile)
    ceiling = _metrics.check_ceiling(ceiling)
    metric_functions = _metric_functions(metrics, percentile)
    if max_batches is not None:
        check_int(max_batches, "max_batches", minimum=1, expected="None or an integer >= 1")
    if verbose not in (0, 1, 2):
        raise ValueError(f"`verbose` must be 0, 1 or 2; got {verbose!r}.")
    # Any Keras layer, e.g. a `keras.layers.TFSMLayer` wrapping a SavedModel, is explained by gradient.
    is_keras = isinstance(model_or_explainer, keras.layers.Layer)
    options = {
        "saliency_input": saliency_input,
        "preprocessing": preprocessing,
        "output": output,
        "allow_softmax": allow_softmax,
    }
    if is_keras:
        method = GRADIENT_MAX_ABS if saliency is None else get_saliency_method(saliency)
        explain = _keras_saliency(model_or_explainer, method, options)
    elif callable(model_or_explainer):
        if preprocessing is not None or saliency_input not in (AUTO, RAW_INPUT, None) or output is not None:
            raise ValueError(
                "`preprocessing`, `saliency_input` and `output` apply to Keras models; an explainer callable "
                "computes its own maps."
            )
        if saliency is not None:
            raise ValueError(
                "`saliency` applies to Keras models; an explainer callable computes its own maps (or pass the "
                "Keras model with saliency=...)."
            )
        explain = model_or_explainer
    else:
        raise TypeError(
            "`model_or_explainer` must be a Keras model or a callable f(images, labels) -> maps; "
            f"got {type(model_or_explainer).__name__}."
        )
    if not isinstance(dataset, Iterable):  # a tf.data.Dataset is one
        raise TypeError(
            f"`dataset` must be a tf.data.Dataset or an iterable of batches; got {type(dataset).__name__}."
        )

    scores: dict[str, list[np.ndarray]] = {name: [] for name in metric_functions}
    shown = "spearman" if "spearman" in scores else next(iter(scores))  # the running mean on the progress bar
    progress = keras.utils.Progbar(
        _progress_target(dataset, max_batches),
        verbose=verbose,
        unit_name="batch",
        stateful_metrics=[shown],
    )
    num_correct = num_batches = num_images = 0
    shown_sum = 0.0
    for index, batch in enumerate(dataset):
        if max_batches is not None and index >= max_batches:
            break
        num_batches += 1
        images, heatmaps, labels, tokens = _batch_arrays(batch, index)
        all_labels = labels
        if tokens is not None:
            keep = tokens > 0
            images, heatmaps, labels = images[keep], heatmaps[keep], labels[keep]
        if images.shape[0] > 0:
            if is_keras:
                logits, maps = explain(keras.ops.convert_to_tensor(images), keras.ops.convert_to_tensor(labels))
                _check_label_range(all_labels, logits.shape[-1], index)
                predicted = np.argmax(keras.ops.convert_to_numpy(logits), axis=-1)
                num_correct += int(np.sum(predicted == _class_ids(labels)))
            else:
                maps = explain(images, labels)
            maps = _as_saliency(maps, images.shape[0], heatmaps.shape[1:], index)
            heatmaps = as_maps(heatmaps, "heatmap") if _ON_TENSORFLOW else _frozen(heatmaps)
            with _metrics.shared_overlaps():  # Dice and IoU binarise the maps once
                for name, fn in metric_functions.items():
                    scores[name].append(_per_image(fn(maps, heatmaps), images.shape[0], name, index))
            shown_sum += float(np.sum(scores[shown][-1], dtype=np.float64))
            num_images += images.shape[0]
        running_mean = shown_sum / num_images if num_images else 0.0
        progress.update(num_batches, values=[(shown, running_mean)])

    if num_batches == 0:
        raise ValueError("`dataset` yielded no batches; there is nothing to evaluate.")
    if num_images == 0:
        raise ValueError(
            f"None of the {num_batches} batch(es) of `dataset` has an example with token > 0; "
            "there is nothing to score."
        )
    if progress.target is None or num_batches < progress.target:
        progress.update(num_batches, finalize=True)  # the bar did not reach its end by itself

    result: dict[str, Any] = {name: np.concatenate(values) for name, values in scores.items()}
    for name in scores:
        result[f"{name}_mean"] = float(np.mean(result[name], dtype=np.float64))
    if "spearman" in result:
        result["alignment_score"] = _metrics.alignment_score(result["spearman"], ceiling)
    result["num_images"] = num_images
    if is_keras:
        result["accuracy"] = num_correct / result["num_images"]
    return result
