"""The harmonization batch: one contract for training (`HarmonizedModel`), evaluation and the input pipelines.

Why a module of its own: the keys, the tuple forms, the meaning of a missing token and the heatmap's
shape rule used to be copied into each consumer, and the copies had started to differ (one accepted
Keras's `(dict,)` wrapping, the other a `Mapping`). Here they are written once, for tensors and NumPy
arrays alike. The parts are those of the published code (serre-lab/Harmonization): ClickMe's features
`image`, `heatmap`, `label` (`harmonization/common/clickme_dataset.py`) and the `tokens` that
`harmonizer_loss(model, images, tokens, labels, true_heatmaps)` weights each example's term with
(`harmonization/training/loss.py`).

    {"image": (N, H, W, C), "heatmap": (N, H, W) or (N, H, W, 1), "label": (N,) or (N, C)[, "token": (N,)]}
    (image, heatmap, label[, token])

`unpack` only picks the parts and checks the form: the values are validated where they are used
(`HarmonizedModel` checks labels and tokens once per step, `evaluate_alignment` once per batch).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

from harmonization._host_checks import shape_text, static_rank

IMAGE = "image"
HEATMAP = "heatmap"
LABEL = "label"
TOKEN = "token"
#: The keys every dict batch has; `TOKEN` is optional.
REQUIRED_KEYS = (IMAGE, HEATMAP, LABEL)
KEYS = (*REQUIRED_KEYS, TOKEN)

#: What a missing token means: the example has a human map (ClickMe examples get token 1, as in the
#: published training; examples mixed in without a map get 0, see `harmonization.data.mix_datasets`).
DEFAULT_TOKEN = 1.0

#: The accepted forms, for error messages.
FORMS = "a dict {'image', 'heatmap', 'label'[, 'token']} or a tuple (image, heatmap, label[, token])"


class Batch(NamedTuple):
    """The parts of one batch, as given (tensors or arrays); `token` is None when the batch has none."""

    image: Any
    heatmap: Any
    label: Any
    token: Any = None


def _unwrap(data):
    """The dict inside Keras's `(dict,)`, `(dict, None)` or `(dict, None, None)`; `data` otherwise.

    `fit(x=dict)` and `train_on_batch(dict)` reach `train_step` packed as (x, y, sample_weight)
    (keras.utils.unpack_x_y_sample_weight), with y and sample_weight None.
    """
    if isinstance(data, (tuple, list)) and 1 <= len(data) <= 3 and isinstance(data[0], Mapping):
        if all(item is None for item in data[1:]):
            return data[0]
    return data


def unpack(data, *, where: str = "") -> Batch:
    """The (image, heatmap, label, token-or-None) of a dict or a 3/4-tuple batch, tensors or arrays alike.

    Args:
        data: a dict (any Mapping) with `REQUIRED_KEYS` and optionally `TOKEN`; a tuple or list
            (image, heatmap, label[, token]); or a dict in Keras's `(dict,)`/`(dict, None[, None])` wrapping.
        where: names the batch in error messages, e.g. "batch 3 of `dataset`"; "the batch" by default.

    Raises:
        ValueError: naming the missing keys and the keys found, or the form found and the forms accepted.
    """
    subject = where[:1].upper() + where[1:] if where else "The batch"
    data = _unwrap(data)
    if isinstance(data, Mapping):
        missing = [key for key in REQUIRED_KEYS if key not in data]
        if missing:
            raise ValueError(
                f"{subject} lacks the key(s) {missing}: a harmonization batch needs the keys "
                f"{list(REQUIRED_KEYS)} (and optionally '{TOKEN}'); got keys {sorted(map(str, data))}."
            )
        return Batch(data[IMAGE], data[HEATMAP], data[LABEL], data.get(TOKEN))
    if isinstance(data, (tuple, list)) and len(data) in (3, 4):
        return Batch(*data)
    kind = type(data).__name__
    if isinstance(data, (tuple, list)):
        kind = f"{kind} of {len(data)} elements"
    raise ValueError(f"{subject} is a {kind}; a harmonization batch must be {FORMS}.")


def heatmap_maps(heatmap, name: str = "`heatmap`"):
    """`heatmap` as (N, H, W), from (N, H, W) or (N, H, W, 1); a tensor stays a tensor, an array an array.

    Raises a ValueError naming `name` for any other shape (e.g. 3 channels: reduce them first).
    """
    shape = heatmap.shape
    rank = static_rank(shape)
    if rank == 4 and shape[-1] == 1:
        return heatmap[..., 0]
    if rank != 3:
        raise ValueError(f"{name} must have shape (N, H, W) or (N, H, W, 1); got {shape_text(shape)}.")
    return heatmap


def check_heatmap_size(image, heatmap) -> None:
    """Refuse a heatmap whose (static) spatial size differs from the image's.

    The harmonization loss compares the saliency (at the image's size) with the human map pixel by
    pixel; the published pipeline resizes ClickMe maps to the image size first. (Evaluation does not
    need this: `evaluate_alignment` resizes the saliency to the human map instead.)
    """
    if static_rank(image.shape) is None or static_rank(heatmap.shape) is None:
        return  # unknown until the graph runs (a relaxed tf.function trace): the loss's shape check fails there
    image_hw, heat_hw = tuple(image.shape)[1:3], tuple(heatmap.shape)[1:3]
    if any(a is not None and b is not None and a != b for a, b in zip(image_hw, heat_hw)):
        raise ValueError(
            f"`heatmap` spatial size {tuple(heat_hw)} does not match `image` spatial size {tuple(image_hw)}. "
            "Resize the human maps to the image size in the input pipeline (harmonization.data.load_clickme "
            "does this), e.g. tf.image.resize(heatmap, image.shape[1:3])."
        )
