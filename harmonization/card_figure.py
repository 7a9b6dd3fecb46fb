"""The saliency figure of a published model card: what the model looks at, on a few generated images.

Why: a card shows how to explain the model, and a picture of its saliency maps shows it at a glance. The images
are made by `harmonization.synthetic` (shapes on clutter, from a seed), so the figure needs no dataset and no
download, and it is the same every time. It must be byte-for-byte the same for the same weights: a release that
is built again uploads nothing when nothing changed. So the images, their order and the layout are fixed, the
maps are quantised to 8 bits before drawing, matplotlib's own style is used (not the user's), and the PNG carries
no software version or date. (Same bytes on the same library versions and CPU kernels: another machine's float
rounding could still move a map value across an 8-bit step.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from harmonization import synthetic
from harmonization.presets import FIGURE_FILE  # the figure's file name in a preset folder, linked from the card

__all__ = ["FIGURE_FILE", "draw_saliency_figure", "figure_images"]
_SPLIT = "test"  # the mark in a corner is random there, as it would be for any image
_MAX_LABEL = 22  # characters of a class name shown under a map


def figure_images(height: int, width: int, *, count: int = 3, seed: int = 0) -> np.ndarray:
    """`count` generated images (`harmonization.synthetic`, one per shape class), RGB in [0, 255], float32,
    resized to (height, width): the figure's inputs."""
    # Imported here: Pillow is needed only to resize, and only when a figure is drawn.
    from PIL import Image

    side = max(synthetic.MIN_IMAGE_SIZE, min(height, width))
    images = []
    for index in range(count):
        image = synthetic.generate_example(seed, _SPLIT, index, image_size=side).image
        if image.shape[:2] != (height, width):
            image = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
        images.append(image)
    return np.stack(images).astype("float32")


def _label(index: int, class_names: Sequence[str] | None) -> str:
    name = class_names[index] if class_names is not None and index < len(class_names) else f"class {index}"
    return name if len(name) <= _MAX_LABEL else name[: _MAX_LABEL - 1] + "…"


def draw_saliency_figure(model, path: str | os.PathLike, *, class_names: Sequence[str] | None = None,
                         count: int = 3, seed: int = 0, dpi: int = 80) -> Path:
    """Draw `count` generated images and `model`'s saliency map of its top class on each; save a PNG at `path`.

    Args:
        model: a Keras classifier taking RGB in [0, 255] (preprocessing inside, as the zoo's) and returning logits.
        path: the PNG to write (a preset's is `FIGURE_FILE`).
        class_names: the names of the model's outputs, for the labels; None shows class indices.
        count: how many images. seed: which generated images.
        dpi: resolution (the figure is 2.2 x 2.3 inches per image).

    Returns:
        The path written. The same weights give the same bytes (see the module's docstring).
    """
    # Imported here: the saliency code and matplotlib are needed only when a figure is drawn.
    import keras
    from matplotlib import style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from harmonization.saliency import saliency_map  # the evaluation map: max over channels of |gradient|

    shape = tuple(model.input_shape[1:3])
    if len(shape) != 2 or any(d is None for d in shape):
        raise ValueError(f"draw_saliency_figure: the model's input shape {model.input_shape} has no fixed size.")
    images = figure_images(*shape, count=count, seed=seed)
    logits = keras.ops.convert_to_numpy(model(images, training=False))
    top = np.argmax(logits, axis=-1)
    maps = np.asarray(keras.ops.convert_to_numpy(saliency_map(model, images, top)), dtype="float64")
    peaks = maps.reshape(len(maps), -1).max(axis=1).reshape(-1, 1, 1)
    maps8 = np.round(255 * maps / np.where(peaks > 0, peaks, 1)).astype("uint8")  # 8 bits: float noise stays out

    with style.context("default"):
        figure = Figure(figsize=(2.2 * count, 4.6))
        FigureCanvasAgg(figure)
        axes = figure.subplots(2, count, squeeze=False)
        for column in range(count):
            axes[0, column].imshow(images[column].astype("uint8"), interpolation="nearest")
            axes[0, column].set_title(f"generated image {column + 1}", fontsize=8)
            axes[1, column].imshow(maps8[column], cmap="magma", vmin=0, vmax=255, interpolation="nearest")
            axes[1, column].set_title(f"saliency of top class:\n{_label(int(top[column]), class_names)}", fontsize=8)
            for axis in axes[:, column]:
                axis.set_xticks([])
                axis.set_yticks([])
        figure.tight_layout()
        path = Path(path)
        figure.savefig(path, format="png", dpi=dpi, metadata={"Software": None})
    return path
