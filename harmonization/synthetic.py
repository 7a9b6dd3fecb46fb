"""A synthetic, ClickMe-format dataset with a planted shortcut, generated from a seed.

Why it exists: the neural harmonizer (arXiv 2211.04533) claims that aligning a model's saliency with
human feature-importance maps makes it rely on the features people use. This module makes the claim
checkable offline in minutes. Each image holds one *diagnostic object* whose shape or texture
defines the class (every object is the same light grey), at a random position and scale on a
cluttered background; the "human" map is a blurred mask of the object's region, like a ClickMe map.
A *shortcut* is planted too: a black-and-white texture patch in one corner whose pattern names a
class. In the train split it names the label with probability `shortcut_agreement` (otherwise a
uniformly random other class); in the test split it is uniformly random, independent of the label.
A small CNN trained with cross-entropy alone picks the mark up early and loses accuracy on the
shortcut-free test split; a harmonized one is pushed to look at the object instead.

Every example is a pure function of `(seed, split, index)`: `generate_example` draws from numpy
generators seeded with exactly these values, so examples can be made one at a time, in any order.
`tfds_clickme/clickme_synthetic` wraps this module as the TFDS builder "clickme_synthetic".
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np
from scipy import ndimage

from harmonization._numbers import check_int, is_number

#: Class names, in label order. Each names the diagnostic object drawn for that class.
CLASS_NAMES = (
    "ring",
    "disk",
    "cross",
    "diagonal_cross",
    "checker",
    "stripes",
    "dots",
    "triangle",
    "frame",
    "diamond",
)
NUM_CLASSES = len(CLASS_NAMES)

#: The splits, each with a code mixed into the seed so that no two splits share a random stream.
SPLITS = {"train": 0, "test": 1}

#: Smallest image size at which the object, the clutter and the corner mark still fit.
MIN_IMAGE_SIZE = 32

#: Corners for the mark, in the order of `Layout.corner`.
CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")

# The corner mark's texture for each class, as a function of the pixel's (row, column) inside the
# mark. Achromatic on purpose: the training saliency averages the input gradient over RGB, and a
# colour cue can be read by colour-opponent filters whose channel-mean gradient is ~0, so the
# harmonization loss never sees it (measured: a colour mark gave no test-accuracy benefit).
MARK_PATTERNS: dict[str, Callable] = {
    "horizontal_lines": lambda i, j: i % 2 == 0,
    "vertical_lines": lambda i, j: j % 2 == 0,
    "fine_checker": lambda i, j: (i + j) % 2 == 0,
    "horizontal_bars": lambda i, j: (i // 2) % 2 == 0,
    "vertical_bars": lambda i, j: (j // 2) % 2 == 0,
    "coarse_checker": lambda i, j: (i // 2 + j // 2) % 2 == 0,
    "diagonal_stripes": lambda i, j: ((i + j) // 2) % 2 == 0,
    "antidiagonal_stripes": lambda i, j: ((i - j) // 2) % 2 == 0,
    "dot_grid": lambda i, j: (i % 3 == 0) & (j % 3 == 0),
    "grid_lines": lambda i, j: (i % 4 == 0) | (j % 4 == 0),
}
_MARK_PATTERN_LIST = tuple(MARK_PATTERNS.values())  # index = class id

# Geometry and contrast, sizes as fractions of the image size. Tuned so that, at 64x64, a 3-layer
# CNN trained with cross-entropy for ~400 steps learns the mark faster than the shapes (shortcut)
# while a harmonized one still learns the shapes; see the builder's README for the measurements.
_OBJECT_SIZE_RANGE = (0.30, 0.45)  # side of the object's square box
_OBJECT_GREY = (0.75, 1.0)  # brightness of the objects' shared light grey
_MARK_SIZE = 0.18  # side of the corner mark
_MARK_CONTRAST = 0.85  # black-to-white difference of the mark's texture
_MARK_MARGIN = 0.05  # free space kept between the mark and the object's box
_CLUTTER_COUNT = (5, 9)  # distractors per image, [low, high)
_CLUTTER_GREY_FRACTION = 0.3  # share of distractors painted in the objects' grey
_HEATMAP_SIGMA = 0.12  # blur of the human map, as a fraction of the object's size
_SUPERSAMPLING = 2  # object masks are drawn at 2x and averaged: anti-aliased edges


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where things go in one example; cheap to compute, so statistics can be checked on many.

    Attributes:
        label: class id, the diagnostic object drawn.
        shortcut: class id named by the corner mark's texture.
        center: (row, column) of the object's centre, in pixels.
        size: side of the object's square box, in pixels.
        corner: index into `CORNERS` of the mark's corner.
    """

    label: int
    shortcut: int
    center: tuple[float, float]
    size: float
    corner: int

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) pixel box holding the object; bottom and right exclusive."""
        half = self.size / 2
        row, col = self.center
        return (
            int(np.floor(row - half)),
            int(np.floor(col - half)),
            int(np.ceil(row + half)),
            int(np.ceil(col + half)),
        )


@dataclasses.dataclass(frozen=True)
class SyntheticExample:
    """One example in ClickMe's format, plus the layout it was drawn from (the ground truth)."""

    id: str
    image: np.ndarray  # (S, S, 3) uint8
    heatmap: np.ndarray  # (S, S, 1) uint8, 0..255, peak 255
    label: int
    layout: Layout


def example_id(split: str, index: int) -> str:
    """Stable, path-free id: the split and the index, e.g. "train_000042"."""
    return f"{split}_{index:06d}"


def _check_args(seed, split, index, image_size, shortcut_agreement) -> None:
    check_int(seed, "seed", minimum=0)
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {sorted(SPLITS)}; got {split!r}.")
    check_int(index, "index", minimum=0)
    check_int(image_size, "image_size", minimum=MIN_IMAGE_SIZE)
    if not (is_number(shortcut_agreement) and 0.0 <= shortcut_agreement <= 1.0):
        raise ValueError(f"`shortcut_agreement` must be a number in [0, 1]; got {shortcut_agreement!r}.")


def _rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    """Independent generator per (seed, split, index, stream); stream 0 = layout, 1 = pixels."""
    return np.random.default_rng([int(seed), SPLITS[split], int(index), stream])


def mark_box(corner: int, image_size: int) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) pixel box of the corner mark; bottom and right exclusive."""
    side = max(4, int(round(_MARK_SIZE * image_size)))
    top = 0 if corner in (0, 1) else image_size - side
    left = 0 if corner in (0, 2) else image_size - side
    return top, left, top + side, left + side


def mark_pattern(shortcut: int, side: int) -> np.ndarray:
    """The (side, side) boolean texture that names class `shortcut` (True = light)."""
    i, j = np.mgrid[0:side, 0:side]
    return np.asarray(_MARK_PATTERN_LIST[shortcut](i, j), dtype=bool)


def _boxes_overlap(a, b, margin: float) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def sample_layout(
    seed: int, split: str, index: int, image_size: int = 64, shortcut_agreement: float = 0.9
) -> Layout:
    """The label, shortcut, object box and mark corner of example `index` of `split`.

    Labels cycle through the classes (`index % NUM_CLASSES`), so every split is balanced to within
    one example per class. In "train" the shortcut is the label with probability
    `shortcut_agreement` and otherwise a uniformly random other class; in "test" it is uniformly
    random over all classes, independent of the label (`shortcut_agreement` is ignored).
    """
    _check_args(seed, split, index, image_size, shortcut_agreement)
    rng = _rng(seed, split, index, 0)
    label = int(index) % NUM_CLASSES
    if split == "train":
        agrees = rng.random() < shortcut_agreement
        shortcut = label if agrees else (label + int(rng.integers(1, NUM_CLASSES))) % NUM_CLASSES
    else:
        shortcut = int(rng.integers(0, NUM_CLASSES))
    corner = int(rng.integers(0, len(CORNERS)))
    size = float(rng.uniform(*_OBJECT_SIZE_RANGE) * image_size)
    mark = mark_box(corner, image_size)
    margin = _MARK_MARGIN * image_size
    low, high = size / 2 + 1, image_size - size / 2 - 1
    # Rejection sampling of the centre away from the mark: the mark excludes well under half of the
    # admissible centres, so this ends within a few draws.
    while True:
        center = (float(rng.uniform(low, high)), float(rng.uniform(low, high)))
        layout = Layout(label=label, shortcut=shortcut, center=center, size=size, corner=corner)
        if not _boxes_overlap(layout.bbox, mark, margin):
            return layout


# ------------------------------------------------------------------------------------ shapes
# Each shape maps normalised coordinates (u, v) in [-1, 1]^2 (u: right, v: down) to a boolean mask.


def _square(u, v):
    return (np.abs(u) <= 1) & (np.abs(v) <= 1)


def _disk(u, v):
    return u**2 + v**2 <= 1


def _triangle(u, v):
    return (np.abs(v) <= 1) & (np.abs(u) <= (v + 1) / 2)


def _diamond(u, v):
    return np.abs(u) + np.abs(v) <= 1


def _dots(u, v):
    cu = np.clip(np.round(u * 1.5), -1, 1) / 1.5
    cv = np.clip(np.round(v * 1.5), -1, 1) / 1.5
    return (u - cu) ** 2 + (v - cv) ** 2 <= 0.26**2


SHAPES: dict[str, Callable] = {
    "ring": lambda u, v: _disk(u, v) & (u**2 + v**2 >= 0.55**2),
    "disk": _disk,
    "cross": lambda u, v: _square(u, v) & ((np.abs(u) <= 0.28) | (np.abs(v) <= 0.28)),
    "diagonal_cross": lambda u, v: _square(u, v) & ((np.abs(u - v) <= 0.4) | (np.abs(u + v) <= 0.4)),
    "checker": lambda u, v: _square(u, v) & ((np.floor((u + 1) * 2) + np.floor((v + 1) * 2)) % 2 == 0),
    "stripes": lambda u, v: _square(u, v) & (np.floor((v + 1) * 2.5) % 2 == 0),
    "dots": _dots,
    "triangle": _triangle,
    "frame": lambda u, v: _square(u, v) & (np.maximum(np.abs(u), np.abs(v)) >= 0.62),
    "diamond": _diamond,
}

# The region a person would mark for each object: the area the pattern occupies, gaps included.
_FOOTPRINTS: dict[str, Callable] = {"ring": _disk, "disk": _disk, "triangle": _triangle, "diamond": _diamond}


def _coverage(shape: Callable, layout: Layout, image_size: int) -> np.ndarray:
    """Fraction of each pixel covered by `shape` placed at `layout`, (S, S) float32 in [0, 1]."""
    k = _SUPERSAMPLING
    coords = (np.arange(image_size * k, dtype=np.float32) + 0.5) / k
    half = layout.size / 2
    u = (coords[None, :] - layout.center[1]) / half
    v = (coords[:, None] - layout.center[0]) / half
    mask = shape(u, v).astype(np.float32)
    return mask.reshape(image_size, k, image_size, k).mean(axis=(1, 3))


def object_mask(layout: Layout, image_size: int) -> np.ndarray:
    """Per-pixel coverage of the diagnostic object, (S, S) float32 in [0, 1]."""
    return _coverage(SHAPES[CLASS_NAMES[layout.label]], layout, image_size)


def human_map(layout: Layout, image_size: int) -> np.ndarray:
    """The "human" importance map: the object's footprint, Gaussian-blurred, (S, S) uint8, peak 255."""
    footprint = _coverage(_FOOTPRINTS.get(CLASS_NAMES[layout.label], _square), layout, image_size)
    blurred = ndimage.gaussian_filter(footprint, sigma=_HEATMAP_SIGMA * layout.size, mode="constant")
    return np.round(blurred * (255.0 / blurred.max())).astype(np.uint8)


# ------------------------------------------------------------------------------------ pixels


def _interpolation_matrix(size: int, knots: int) -> np.ndarray:
    """(size, knots) matrix that linearly interpolates `knots` evenly spaced values to `size` pixels."""
    positions = (np.arange(size) + 0.5) / size * (knots - 1)
    return np.maximum(0.0, 1.0 - np.abs(positions[:, None] - np.arange(knots)[None, :])).astype(np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smoothly varying colour field (bilinear over a 5x5 grid) plus pixel noise, (S, S, 3) float32."""
    base = rng.uniform(0.15, 0.55, size=3).astype(np.float32)
    coarse = rng.normal(scale=0.12, size=(5, 5, 3)).astype(np.float32)
    interp = _interpolation_matrix(size, 5)
    field = np.tensordot(interp, np.tensordot(interp, coarse, axes=(1, 1)), axes=(1, 1))  # (S, S, 3)
    noise = rng.standard_normal(size=(size, size, 3), dtype=np.float32) * 0.03
    return base + field + noise


def _paint(image: np.ndarray, coverage: np.ndarray, colour, alpha: float = 1.0) -> None:
    """Alpha-blend `colour` into `image` (in place) with weight alpha * coverage."""
    weight = (alpha * coverage)[..., None]
    image *= 1 - weight
    image += weight * np.asarray(colour, dtype=np.float32)


def _clutter(rng: np.random.Generator, image: np.ndarray, grey_range: tuple[float, float]) -> None:
    """Distractors in random colours (some in the objects' grey): thick line segments and blobs."""
    size = image.shape[0]
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    for _ in range(int(rng.integers(*_CLUTTER_COUNT))):
        colour = rng.uniform(0.0, 1.0, size=3)
        if rng.random() < _CLUTTER_GREY_FRACTION:
            colour = np.full(3, rng.uniform(*grey_range))
        start = rng.uniform(0, size, size=2)
        if rng.random() < 0.6:  # segment: distance of each pixel to it
            angle = rng.uniform(0, np.pi)
            length = rng.uniform(0.1, 0.3) * size
            direction = np.array([np.sin(angle), np.cos(angle)])
            rel_r, rel_c = rows - start[0], cols - start[1]
            t = np.clip(rel_r * direction[0] + rel_c * direction[1], 0, length)
            dist = np.hypot(rel_r - t * direction[0], rel_c - t * direction[1])
            half_width = rng.uniform(0.6, 1.3) * size / 64
        else:  # blob
            dist = np.hypot(rows - start[0], cols - start[1])
            half_width = rng.uniform(1.5, 4.0) * size / 64
        _paint(image, np.clip(half_width + 0.5 - dist, 0, 1), colour, alpha=0.85)


def _render(layout: Layout, rng: np.random.Generator, image_size: int) -> np.ndarray:
    image = _background(rng, image_size)
    _clutter(rng, image, _OBJECT_GREY)
    # One colour for every class (a light grey), so only shape and texture tell the classes apart.
    grey = rng.uniform(*_OBJECT_GREY)
    _paint(image, object_mask(layout, image_size), (grey, grey, grey))
    top, left, bottom, right = mark_box(layout.corner, image_size)
    middle = rng.uniform(0.4, 0.6)
    dark, light = middle - _MARK_CONTRAST / 2, middle + _MARK_CONTRAST / 2
    pattern = mark_pattern(layout.shortcut, bottom - top)
    image[top:bottom, left:right] = np.where(pattern, light, dark)[..., None]
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def generate_example(
    seed: int, split: str, index: int, image_size: int = 64, shortcut_agreement: float = 0.9
) -> SyntheticExample:
    """Example `index` of `split`, a pure function of the arguments.

    Args:
        seed: int >= 0. Selects the dataset; the same seed gives the same examples bit for bit.
        split: "train" (the mark agrees with the label) or "test" (the mark is random).
        index: int >= 0. Position in the split; the label is `index % NUM_CLASSES`.
        image_size: int >= 32. Side S of the square image and heatmap. Defaults to 64.
        shortcut_agreement: float in [0, 1]. Probability that a train image's corner mark names its
            label. Ignored for "test". Defaults to 0.9.

    Returns:
        A `SyntheticExample`: `image` (S, S, 3) uint8, `heatmap` (S, S, 1) uint8, `label`, `id`,
        and the `layout` it was drawn from.
    """
    layout = sample_layout(seed, split, index, image_size, shortcut_agreement)
    image = _render(layout, _rng(seed, split, index, 1), image_size)
    return SyntheticExample(
        id=example_id(split, index),
        image=image,
        heatmap=human_map(layout, image_size)[..., None],
        label=layout.label,
        layout=layout,
    )


def generate_split(
    seed: int, split: str, num_examples: int, image_size: int = 64, shortcut_agreement: float = 0.9
) -> Iterator[SyntheticExample]:
    """Examples 0 .. num_examples-1 of `split`, in order (see `generate_example`)."""
    check_int(num_examples, "num_examples", minimum=0)
    _check_args(seed, split, 0, image_size, shortcut_agreement)
    for index in range(num_examples):
        yield generate_example(seed, split, index, image_size, shortcut_agreement)


def generate_arrays(
    seed: int, split: str, num_examples: int, image_size: int = 64, shortcut_agreement: float = 0.9
) -> dict[str, np.ndarray]:
    """A whole split as stacked arrays: `image`, `heatmap`, `label`, `shortcut`, `bbox`, `id`.

    For experiments without TFDS. `shortcut` and `bbox` are the generator's ground truth, which the
    TFDS dataset (ClickMe's features only) does not carry; use `shortcut` to measure how often a
    model's test predictions follow the mark instead of the object.
    """
    examples = list(generate_split(seed, split, num_examples, image_size, shortcut_agreement))
    size = image_size
    return {
        "image": np.stack([e.image for e in examples]) if examples else np.zeros((0, size, size, 3), np.uint8),
        "heatmap": np.stack([e.heatmap for e in examples]) if examples else np.zeros((0, size, size, 1), np.uint8),
        "label": np.array([e.label for e in examples], dtype=np.int64),
        "shortcut": np.array([e.layout.shortcut for e in examples], dtype=np.int64),
        "bbox": np.array([e.layout.bbox for e in examples], dtype=np.int64).reshape(-1, 4),
        "id": np.array([e.id for e in examples], dtype=object),
    }
