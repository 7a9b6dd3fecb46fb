"""Input pipelines for harmonized training: ClickMe (and ImageNet) in, `HarmonizedModel.fit` batches out.

Every pipeline yields dict batches

    {"image": float32 (B, S, S, 3) in [0, 255], "heatmap": float32 (B, S, S, 1),
     "label": int32 (B,), "token": float32 (B,)}

where `token` is 1 for an example with a human map and 0 for one without (its map is all zeros).

Heatmaps are processed as in the published training code (Fel et al., NeurIPS 2022): resized to
64x64, blurred with a normalised 10x10 Gaussian kernel (sigma 10, SAME padding), resized to the
image size. Training augmentation (random resized crop, horizontal flip) moves image and map
together.

Why the pipeline is fast: per example it only decodes the JPEG (when training, only the crop
window) and resizes the image; the heatmaps of a whole batch are blurred with two small matrix
products (the published kernel is separable) and cropped, flipped and resized with two gathers per
axis, instead of one 10x10 convolution and three resizes per example. `bench/input_pipeline.py`
measures it against the published per-example pipeline.

Each loader is two stages: (encoded example, augmentation seed) pairs in their final order, then decoding, a
pure function of each pair. `harmonization train` batches the encoded pairs, gives each worker its rows of
every global batch and decodes only those (`_TaggedDecoder`): N workers decode each image once, not N times.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Callable, Iterable, Sequence

from harmonization import _backend

# Before `import tensorflow`: without it, one sentence naming what needs it and the install command.
_backend.require_tensorflow("harmonization.data (tf.data input pipelines: load_clickme, from_tfrecords, mix_datasets)")

import numpy as np
import tensorflow as tf

from harmonization._validation import INT64_MAX, check_int
from harmonization.batch import DEFAULT_TOKEN, HEATMAP, IMAGE, LABEL, REQUIRED_KEYS, TOKEN

#: The published heatmap processing: maps are resized to this resolution, then blurred.
PUBLISHED_HEATMAP_RESOLUTION = 64
PUBLISHED_BLUR_SIZE = 10
PUBLISHED_BLUR_SIGMA = 10.0

#: Random resized crop defaults (fraction of the image area, aspect ratio), as in Inception/torchvision.
DEFAULT_CROP_SCALE = (0.08, 1.0)
DEFAULT_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)

#: Feature spec of the published ClickMe TFRecord shards.
PUBLISHED_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "heatmap": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
}

#: ClickMe labels are ImageNet-1k class indices: 0 <= label < CLICKME_NUM_CLASSES.
CLICKME_NUM_CLASSES = 1000

_AUTOTUNE = tf.data.AUTOTUNE
#: Bytes a TFRecord file adds to each record: the uint64 length and two uint32 CRCs.
_TFRECORD_FRAMING_BYTES = 16


# --------------------------------------------------------------------------------------------
# The published heatmap processing, as reusable functions.
# --------------------------------------------------------------------------------------------


def _kernel_offsets(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column offsets of the published kernel grid.

    The published code builds `x = range(-(size-1)//2, (size-1)//2 + 1)` and
    `y = range((size-1)//2, -(size-1)//2 - 1, -1)` (Python floor division); for an even size the
    grid is off-centre by one cell, e.g. x = -5..4 and y = 4..-5 for size 10. We keep it as published.
    """
    low, high = (-(size - 1)) // 2, (size - 1) // 2
    return np.arange(high, low - 1, -1, dtype=np.float64), np.arange(low, high + 1, dtype=np.float64)


def _kernel_factors(size: int, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """(vertical, horizontal) normalised 1-D factors with outer(vertical, horizontal) == the 2-D kernel."""
    rows, cols = _kernel_offsets(size)
    vertical = np.exp(-(rows**2) / (2.0 * sigma**2))
    horizontal = np.exp(-(cols**2) / (2.0 * sigma**2))
    return vertical / vertical.sum(), horizontal / horizontal.sum()


def gaussian_kernel(size: int = PUBLISHED_BLUR_SIZE, sigma: float = PUBLISHED_BLUR_SIGMA) -> np.ndarray:
    """The published normalised Gaussian blur kernel, float64 (size, size), summing to 1.

    Args:
        size: int. Kernel side. Defaults to 10 (published).
        sigma: float. Standard deviation, in pixels of the 64x64 map. Defaults to 10 (published).
    """
    _check_positive_int(size, "size")
    if not (isinstance(sigma, (int, float)) and sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"`sigma` must be a positive number; got {sigma!r}.")
    vertical, horizontal = _kernel_factors(size, float(sigma))
    return np.outer(vertical, horizontal)


def blur_heatmaps(
    heatmaps, size: int = PUBLISHED_BLUR_SIZE, sigma: float = PUBLISHED_BLUR_SIGMA, *, kernel=None
) -> tf.Tensor:
    """Blur maps (N, H, W, 1) or (H, W, 1) with `gaussian_kernel`, zero SAME padding, as published.

    `kernel` (kh, kw) or (kh, kw, 1, 1) replaces `gaussian_kernel(size, sigma)`, e.g. a kernel made once.
    """
    heatmaps = tf.convert_to_tensor(heatmaps)
    if not heatmaps.dtype.is_floating:
        heatmaps = tf.cast(heatmaps, tf.float32)
    single = heatmaps.shape.rank == 3
    if single:
        heatmaps = heatmaps[None]
    if heatmaps.shape.rank != 4 or heatmaps.shape[-1] != 1:
        raise ValueError(
            f"`heatmaps` must have shape (N, H, W, 1) or (H, W, 1); got {tuple(heatmaps.shape)}."
        )
    if kernel is None:
        kernel = gaussian_kernel(size, sigma)
    kernel = tf.cast(kernel, heatmaps.dtype)
    if kernel.shape.rank == 2:
        kernel = kernel[:, :, None, None]
    if kernel.shape.rank != 4 or tuple(kernel.shape[2:]) != (1, 1):
        raise ValueError(f"`kernel` must have shape (kh, kw) or (kh, kw, 1, 1); got {tuple(kernel.shape)}.")
    blurred = tf.nn.conv2d(heatmaps, kernel, strides=1, padding="SAME")
    return blurred[0] if single else blurred


def preprocess_heatmaps(
    heatmaps,
    image_size: int,
    resolution: int = PUBLISHED_HEATMAP_RESOLUTION,
    blur: bool = True,
) -> tf.Tensor:
    """The published heatmap processing: resize to `resolution`, blur, resize to `image_size`.

    Args:
        heatmaps: (N, H, W, 1) or (H, W, 1) maps, any numeric dtype (values are kept, not rescaled).
        image_size: int. Side of the output maps (the image size).
        resolution: int. Side of the maps when blurred. Defaults to 64 (published).
        blur: bool. Apply the Gaussian blur. Defaults to True.

    Returns:
        float32 maps (N, image_size, image_size, 1) (or without N, as given).
    """
    _check_positive_int(image_size, "image_size")
    _check_positive_int(resolution, "resolution")
    heatmaps = tf.cast(tf.convert_to_tensor(heatmaps), tf.float32)
    maps = tf.image.resize(heatmaps, (resolution, resolution), method="bilinear")
    if blur:
        maps = blur_heatmaps(maps)
    return tf.image.resize(maps, (image_size, image_size), method="bilinear")


# --------------------------------------------------------------------------------------------
# Batched heatmap resampling: blur + crop + flip + resize as two matrix products per map.
# --------------------------------------------------------------------------------------------


def _blur_matrix(factor: np.ndarray, n: int) -> np.ndarray:
    """(n, n) matrix applying the 1-D correlation with `factor` along an axis, zero SAME padding."""
    size = len(factor)
    pad_before = (size - 1) // 2  # TensorFlow's SAME padding puts the odd pixel after.
    matrix = np.zeros((n, n), np.float64)
    for out in range(n):
        for tap in range(size):
            source = out + tap - pad_before
            if 0 <= source < n:
                matrix[out, source] = factor[tap]
    return matrix


def _sampling_weights(offset, extent, flip, out_size: int, in_size: int):
    """Bilinear sampling of crops of a map of side `in_size`: (lower, upper, lerp), each (B, out_size).

    Output pixel i samples the window [offset, offset + extent) (fractions of the map side) at its
    pixel centre, with the half-pixel convention and edge clamping of `tf.image.resize`; `flip`
    (B,) reverses the output order. With offset 0 and extent 1 this is `tf.image.resize` exactly.
    """
    positions = (tf.range(out_size, dtype=tf.float32) + 0.5) / out_size  # (S,)
    positions = tf.where(flip[:, None] > 0.5, 1.0 - positions[None], positions[None])  # (B, S)
    coords = (offset[:, None] + positions * extent[:, None]) * in_size - 0.5
    floor = tf.floor(coords)
    lower = tf.cast(tf.maximum(floor, 0.0), tf.int32)
    upper = tf.cast(tf.minimum(tf.math.ceil(coords), in_size - 1.0), tf.int32)
    return lower, upper, coords - floor


def _resample_axis(maps, weights):
    """Linear interpolation of (B, H, W) maps along H at the sampled positions: (B, S, W)."""
    lower, upper, lerp = weights
    low = tf.gather(maps, lower, axis=1, batch_dims=1)
    high = tf.gather(maps, upper, axis=1, batch_dims=1)
    return low + (high - low) * lerp[:, :, None]


def _transform_heatmaps(maps, crops, flip, out_size: int, blur: bool) -> tf.Tensor:
    """Blur (optional), crop, flip and resize a batch of (B, R, R) maps to (B, S, S, 1).

    `crops` is (B, 4): [top, height, left, width] as fractions of the map side. The blur is two
    small matrix products (the published kernel is separable); the resampling gathers two
    neighbours per output pixel, as `tf.image.resize` does.
    """
    resolution = maps.shape[1]
    if blur:
        vertical, horizontal = _kernel_factors(PUBLISHED_BLUR_SIZE, PUBLISHED_BLUR_SIGMA)
        vertical = tf.constant(_blur_matrix(vertical, resolution), tf.float32)
        horizontal = tf.constant(_blur_matrix(horizontal, resolution).T, tf.float32)
        maps = tf.matmul(tf.matmul(vertical, maps), horizontal)
    # Columns first, on the small maps; gathering whole rows (axis 1) is the fast direction.
    columns = _sampling_weights(crops[:, 2], crops[:, 3], flip, out_size, resolution)
    rows = _sampling_weights(crops[:, 0], crops[:, 1], tf.zeros_like(flip), out_size, resolution)
    maps = _resample_axis(tf.transpose(maps, [0, 2, 1]), columns)  # (B, S, R): sampled columns
    maps = _resample_axis(tf.transpose(maps, [0, 2, 1]), rows)  # (B, S, S)
    return maps[..., None]


# --------------------------------------------------------------------------------------------
# Per-example decoding and cropping.
# --------------------------------------------------------------------------------------------


def _decode_pixels(value: tf.Tensor, channels: int) -> tf.Tensor:
    """uint8 (H, W, channels) pixels from encoded image bytes, or from pixels already decoded."""
    if value.dtype == tf.string:
        pixels = tf.io.decode_image(value, channels=channels, expand_animations=False)
        return tf.ensure_shape(pixels, [None, None, channels])
    pixels = tf.cast(value, tf.uint8)
    if pixels.shape.rank == 2:
        pixels = pixels[..., None]
    return pixels


def _sample_crop(shape, seed, scale, ratio) -> tf.Tensor:
    """A random resized crop window [top, left, height, width] (int32) of an image of `shape`."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_size=tf.concat([shape, [3]], axis=0),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=ratio,
        area_range=scale,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return tf.stack([begin[0], begin[1], size[0], size[1]])


def _centre_crop(shape, fraction: float) -> tf.Tensor:
    """The central square window [top, left, height, width] with side `fraction` x the short side."""
    height, width = shape[0], shape[1]
    side = tf.maximum(tf.cast(tf.cast(tf.minimum(height, width), tf.float32) * fraction, tf.int32), 1)
    return tf.stack([(height - side) // 2, (width - side) // 2, side, side])


def _decode_image_window(value, window_fn, jpeg: bool | None = None):
    """(uint8 crop, window, full shape) of an image, decoding only the window when it is a JPEG.

    `window_fn(shape)` picks the window [top, left, height, width] from the full (H, W) shape.
    `jpeg`: True/False when the encoding is known, None to check each image.
    """

    def decode_then_crop():
        pixels = _decode_pixels(value, 3)
        shape = tf.shape(pixels)[:2]
        window = window_fn(shape)
        return pixels[window[0] : window[0] + window[2], window[1] : window[1] + window[3]], window, shape

    def decode_window():
        shape = tf.image.extract_jpeg_shape(value)[:2]
        window = window_fn(shape)
        return tf.io.decode_and_crop_jpeg(value, window, channels=3), window, shape

    if value.dtype != tf.string or jpeg is False:
        crop, window, shape = decode_then_crop()
    elif jpeg:
        crop, window, shape = decode_window()
    else:
        crop, window, shape = tf.cond(tf.io.is_jpeg(value), decode_window, decode_then_crop)
    return tf.ensure_shape(crop, [None, None, 3]), window, shape


class _Preprocessor:
    """Per-example decoding/cropping and per-batch finishing, for one configuration.

    Per example: decode (training: only the random crop window of a JPEG), flip, resize. Training
    images are rounded to 8 bits after the resize (an error of at most 0.5 on the 0..255 scale,
    well below JPEG's own) so that batching moves 4x fewer bytes; evaluation images are exact: when
    every source image has the same known shape they are batched as decoded uint8 pixels and
    resized per batch, otherwise resized per example in float32. Heatmaps are resized to the blur
    resolution per example, then blurred, cropped, flipped and resized per batch.
    """

    def __init__(
        self,
        image_size: int,
        training: bool,
        with_heatmaps: bool,
        crop_scale: Sequence[float] = DEFAULT_CROP_SCALE,
        crop_ratio: Sequence[float] = DEFAULT_CROP_RATIO,
        blur: bool = True,
        eval_crop_fraction: float | None = None,
        heatmap_resolution: int = PUBLISHED_HEATMAP_RESOLUTION,
        source_shape: Sequence[int | None] | None = None,
        jpeg: bool | None = None,
    ):
        self.image_size = image_size
        self.training = training
        self.with_heatmaps = with_heatmaps
        self.crop_scale = tuple(float(v) for v in crop_scale)
        self.crop_ratio = tuple(float(v) for v in crop_ratio)
        self.blur = blur
        self.eval_crop_fraction = eval_crop_fraction
        self.heatmap_resolution = heatmap_resolution
        self.jpeg = jpeg
        static = source_shape is not None and all(isinstance(d, int) for d in source_shape[:2])
        # Evaluation with whole images of one known shape: batch the pixels, resize per batch.
        self.source_shape = tuple(source_shape[:2]) if static else None
        self.resize_per_batch = not training and eval_crop_fraction is None and static

    def example(self, example: dict, seed: tf.Tensor) -> dict:
        """Decode (and crop, flip, resize) one example; the heatmap goes to the blur resolution."""
        size = (self.image_size, self.image_size)
        if self.training:
            crop_seed = tf.stack([seed, tf.constant(0, tf.int64)])
            flip_seed = tf.stack([seed, tf.constant(1, tf.int64)])
            image, window, shape = _decode_image_window(
                example[IMAGE], lambda shape: _sample_crop(shape, crop_seed, self.crop_scale, self.crop_ratio),
                self.jpeg,
            )
            flip = tf.random.stateless_uniform([], flip_seed) < 0.5
            # Flipping before resizing moves 3x fewer bytes; the half-pixel resize commutes with it.
            image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
            image = tf.image.resize(image, size, method="bilinear")
            image = tf.ensure_shape(tf.cast(image + 0.5, tf.uint8), [*size, 3])  # Rounded; in [0, 255].
        elif self.eval_crop_fraction is not None:
            image, window, shape = _decode_image_window(
                example[IMAGE], lambda shape: _centre_crop(shape, self.eval_crop_fraction), self.jpeg
            )
            flip = tf.constant(False)
            image = tf.ensure_shape(tf.image.resize(image, size, method="bilinear"), [*size, 3])
        else:  # The published evaluation input: the whole image resized.
            image = _decode_pixels(example[IMAGE], 3)
            shape = tf.shape(image)[:2]
            window = tf.stack([0, 0, shape[0], shape[1]])
            flip = tf.constant(False)
            if self.resize_per_batch:
                image = tf.ensure_shape(image, [*self.source_shape, 3])
            else:
                image = tf.ensure_shape(tf.image.resize(image, size, method="bilinear"), [*size, 3])
        out = {IMAGE: image, LABEL: tf.cast(example[LABEL], tf.int32)}
        if self.with_heatmaps:
            heatmap = _decode_pixels(example[HEATMAP], 1)
            resolution = (self.heatmap_resolution, self.heatmap_resolution)
            heatmap = tf.image.resize(tf.cast(heatmap, tf.float32), resolution, method="bilinear")
            window = tf.cast(window, tf.float32)
            shape = tf.cast(shape, tf.float32)
            out[HEATMAP] = tf.ensure_shape(heatmap[..., 0], resolution)
            out["crop"] = tf.stack(
                [window[0] / shape[0], window[2] / shape[0], window[1] / shape[1], window[3] / shape[1]]
            )
            out["flip"] = tf.cast(flip, tf.float32)
        return out

    def batch(self, batch: dict) -> dict:
        """Finish a batch: float32 images, the heatmaps' blur, crop, flip and resize, the tokens."""
        image = batch[IMAGE]
        if self.resize_per_batch:
            image = tf.image.resize(image, (self.image_size, self.image_size), method="bilinear")
        image = tf.cast(image, tf.float32)
        batch_size = tf.shape(image)[0]
        if self.with_heatmaps:
            heatmap = _transform_heatmaps(
                batch[HEATMAP], batch["crop"], batch["flip"], self.image_size, self.blur
            )
            token = tf.ones([batch_size], tf.float32)
        else:
            heatmap = tf.zeros([batch_size, self.image_size, self.image_size, 1], tf.float32)
            token = tf.zeros([batch_size], tf.float32)
        return {IMAGE: image, HEATMAP: heatmap, LABEL: batch[LABEL], TOKEN: token}


def _encoded_examples(
    examples: tf.data.Dataset,
    training: bool,
    seed: int | None,
    shuffle_buffer: int,
    reshuffle_each_iteration: bool = True,
) -> tf.data.Dataset:
    """The pipeline's first stage: (encoded example, int64 augmentation seed) pairs, in their final order.

    Nothing is decoded here, so the stage is cheap: `harmonization train` batches these pairs and splits each
    global batch between its workers before any image is decoded (`_TaggedDecoder`). Each example's
    augmentation is a pure function of its pair (`_Preprocessor.example`), so the pairs fix the data.
    """
    if training and shuffle_buffer > 1:
        examples = examples.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=reshuffle_each_iteration)
    # One random int64 per example seeds its augmentation: reproducible with `seed`, new every epoch (every
    # iteration of the dataset) unless `reshuffle_each_iteration` is False.
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=reshuffle_each_iteration)
    return tf.data.Dataset.zip(examples, seeds)


def _decoded_batches(
    examples: tf.data.Dataset,
    decode_example: Callable,
    finish_batch: Callable[[dict], dict],
    batch_size: int,
    drop_remainder: bool,
    deterministic: bool,
) -> tf.data.Dataset:
    """The pipeline's second stage: decode each element (`decode_example`, in parallel) -> batch -> finish each
    batch (`finish_batch`: the heatmaps' blur, crop, flip and resize) -> prefetch."""
    examples = examples.map(decode_example, num_parallel_calls=_AUTOTUNE, deterministic=deterministic)
    batches = examples.batch(batch_size, drop_remainder=drop_remainder)
    batches = batches.map(finish_batch, num_parallel_calls=_AUTOTUNE, deterministic=deterministic)
    options = tf.data.Options()
    options.deterministic = deterministic
    # Each op of the pipeline runs on one thread: parallelism comes from the parallel maps, and
    # per-op sharding of small images costs more than it saves.
    options.threading.max_intra_op_parallelism = 1
    return batches.with_options(options).prefetch(_AUTOTUNE)


# --------------------------------------------------------------------------------------------
# The loaders cut between their two stages (encoded pairs; decoding), for the loaders and the trainer.
# --------------------------------------------------------------------------------------------

#: Keys that the trainer's encoded examples (`_EncodedSource.tagged`) add to image, heatmap and label: the
#: example's augmentation seed, and its source (`_WITH_MAPS`: ClickMe; `_WITHOUT_MAPS`: ImageNet).
_SEED, _SOURCE = "seed", "source"
_WITH_MAPS, _WITHOUT_MAPS = 0, 1


@dataclasses.dataclass(frozen=True)
class _EncodedSource:
    """A loader cut between its two stages: its (encoded example, seed) pairs in their final order, and what
    decodes them. `decoded` finishes it as the public loader does; `tagged` gives the trainer's form of it."""

    pairs: tf.data.Dataset
    preprocessor: _Preprocessor
    deterministic: bool

    @classmethod
    def of(cls, examples: tf.data.Dataset, preprocessor: _Preprocessor, seed: int | None, shuffle_buffer: int,
           reshuffle_each_iteration: bool = True) -> "_EncodedSource":
        """Undecoded `examples` cut as every loader cuts them: shuffled (training) and seeded (`_encoded_examples`),
        deterministic when seeded or not training."""
        training = preprocessor.training
        pairs = _encoded_examples(examples, training, seed, shuffle_buffer, reshuffle_each_iteration)
        return cls(pairs, preprocessor, deterministic=seed is not None or not training)

    def decoded(self, batch_size: int, drop_remainder: bool) -> tf.data.Dataset:
        """The loader's batches (`load_clickme`, `load_imagenet`)."""
        return _decoded_batches(self.pairs, self.preprocessor.example, self.preprocessor.batch, batch_size,
                                drop_remainder, self.deterministic)

    def tagged(self) -> tf.data.Dataset:
        """Each pair as one dict {"image", "heatmap", "label", "seed", "source"}, the same for ClickMe and ImageNet
        (whose heatmap is an empty string), so that the two can be mixed, batched and split into workers' slices
        while still encoded; `_TaggedDecoder` decodes each by its source."""
        with_maps = self.preprocessor.with_heatmaps
        spec = self.pairs.element_spec[0]
        for key in (IMAGE, HEATMAP) if with_maps else (IMAGE,):
            if spec[key] != tf.TensorSpec([], tf.string):
                raise ValueError(
                    f"The training examples' `{key}` must be encoded images (scalar tf.string: a TFDS Image feature); "
                    f"got {spec[key]}. Examples are mixed and split between workers before they are decoded."
                )
        source = _WITH_MAPS if with_maps else _WITHOUT_MAPS

        def tag(example: dict, seed: tf.Tensor) -> dict:
            return {
                IMAGE: example[IMAGE], HEATMAP: example[HEATMAP] if with_maps else tf.constant(b""),
                LABEL: tf.cast(example[LABEL], tf.int64), _SEED: seed, _SOURCE: tf.constant(source, tf.int32),
            }

        return self.pairs.map(tag)


def _clickme_source(
    split: str,
    image_size: int,
    training: bool,
    data_dir: str | os.PathLike | None,
    *,
    name: str,
    seed: int | None,
    shuffle_buffer: int,
    download: bool,
    manual_dir: str | os.PathLike | None = None,
    crop_scale: Sequence[float] = DEFAULT_CROP_SCALE,
    crop_ratio: Sequence[float] = DEFAULT_CROP_RATIO,
    blur: bool = True,
    reshuffle_each_iteration: bool = True,
    per_batch_resize: bool = True,
) -> _EncodedSource:
    """`load_clickme` before decoding (its arguments; see there).

    `per_batch_resize` False resizes whole evaluation images per example, in float32, as `load_imagenet`'s centre
    crops are, instead of batching their pixels and resizing per batch: the same values (the bilinear resize of
    one image does not depend on its batch), one structure for both sources of the trainer's mix.
    """
    builder = _tfds_builder(name, data_dir, download, split, manual_dir=manual_dir)
    features = builder.info.features
    missing = [key for key in REQUIRED_KEYS if key not in features]  # ClickMe's features are the batch's parts
    if missing:
        raise ValueError(
            f"Dataset {name!r} lacks the ClickMe features {missing} (it has {sorted(features)}); "
            "`load_clickme` needs `image`, `heatmap` and `label`."
        )
    examples = _tfds_examples(builder, split, training, seed, (IMAGE, HEATMAP), reshuffle_each_iteration)
    preprocessor = _Preprocessor(
        image_size, training, with_heatmaps=True, crop_scale=crop_scale, crop_ratio=crop_ratio, blur=blur,
        source_shape=features[IMAGE].shape if per_batch_resize else None, jpeg=_is_jpeg_feature(features[IMAGE]),
    )
    return _EncodedSource.of(examples, preprocessor, seed, shuffle_buffer, reshuffle_each_iteration)


def _imagenet_source(
    split: str,
    image_size: int,
    training: bool,
    data_dir: str | os.PathLike | None,
    *,
    manual_dir: str | os.PathLike | None,
    seed: int | None,
    shuffle_buffer: int,
    download: bool,
    crop_scale: Sequence[float] = DEFAULT_CROP_SCALE,
    crop_ratio: Sequence[float] = DEFAULT_CROP_RATIO,
    center_crop_fraction: float = 0.875,
    reshuffle_each_iteration: bool = True,
) -> _EncodedSource:
    """`load_imagenet` before decoding (its arguments; see there)."""
    if not 0 < center_crop_fraction <= 1:
        raise ValueError(f"`center_crop_fraction` must be in (0, 1]; got {center_crop_fraction!r}.")
    builder = _tfds_builder("imagenet2012", data_dir, download, split, manual_dir=manual_dir)
    examples = _tfds_examples(builder, split, training, seed, (IMAGE,), reshuffle_each_iteration)
    preprocessor = _Preprocessor(
        image_size, training, with_heatmaps=False, crop_scale=crop_scale, crop_ratio=crop_ratio,
        eval_crop_fraction=center_crop_fraction, jpeg=_is_jpeg_feature(builder.info.features[IMAGE]),
    )
    return _EncodedSource.of(examples, preprocessor, seed, shuffle_buffer, reshuffle_each_iteration)


# --------------------------------------------------------------------------------------------
# Public loaders.
# --------------------------------------------------------------------------------------------


def load_clickme(
    split: str,
    batch_size: int,
    image_size: int = 224,
    training: bool = False,
    data_dir: str | os.PathLike | None = None,
    *,
    name: str = "clickme",
    seed: int | None = None,
    shuffle_buffer: int = 2048,
    drop_remainder: bool | None = None,
    download: bool = True,
    manual_dir: str | os.PathLike | None = None,
    crop_scale: Sequence[float] = DEFAULT_CROP_SCALE,
    crop_ratio: Sequence[float] = DEFAULT_CROP_RATIO,
    blur: bool = True,
    reshuffle_each_iteration: bool = True,
) -> tf.data.Dataset:
    """ClickMe (or any TFDS dataset with its features) as batches for `HarmonizedModel.fit`.

    Without `training`, images are resized whole to `image_size` and heatmaps are processed as
    published (64x64, blurred, resized): the published evaluation input. With `training`, the
    examples are shuffled and each gets a random resized crop and a horizontal flip, the same for
    its image and its map (the map is blurred over the whole field of view first, then cropped).

    Args:
        split: str. A TFDS split of the dataset ("train", "validation", "train[:10%]", ...).
        batch_size: int. Examples per batch.
        image_size: int. Side of the square output images and maps. Defaults to 224.
        training: bool. Shuffle and augment. Defaults to False.
        data_dir: path. TFDS data directory. Defaults to TFDS's (~/tensorflow_datasets).
        name: str. TFDS dataset name, with its features `image`, `heatmap`, `label`, e.g.
            "clickme", "clickme/skip_bad_records" or "clickme_synthetic". Defaults to "clickme".
        seed: int or None. Makes shuffling and augmentation reproducible (still different at every
            epoch). Defaults to None (non-deterministic and a little faster).
        shuffle_buffer: int. Examples in the shuffle buffer (encoded, ~40 KB each). Defaults to 2048.
        drop_remainder: bool. Drop the last incomplete batch. Defaults to `training`.
        download: bool. Download and prepare the dataset if `data_dir` lacks it. Defaults to True.
        manual_dir: str, path or None. Build from the published shards in this folder instead of
            downloading them (`train-*.tfrecords`, `val-*.tfrecords`); a missing or empty folder is an
            error. Defaults to None.
        crop_scale: (min, max) fraction of the image area kept by the random crop.
            Defaults to (0.08, 1.0).
        crop_ratio: (min, max) aspect ratio of the random crop. Defaults to (3/4, 4/3).
        blur: bool. Blur the heatmaps as published. Defaults to True.
        reshuffle_each_iteration: bool. A new order and new augmentations each time the dataset is iterated
            (each epoch of a `fit` over it). False: every iteration repeats the first, so that a dataset made
            for one epoch is a pure function of `seed` (`harmonization train` builds one per epoch and may
            iterate it twice). Defaults to True.

    Returns:
        A `tf.data.Dataset` of dicts {"image", "heatmap", "label", "token"} (see the module docstring).

    Example:

    ```python
    train = harmonization.data.load_clickme("train", 64, training=True, seed=0)
    harmonized_model.fit(train, epochs=30)
    ```
    """
    _check_common_args(batch_size, image_size, shuffle_buffer, crop_scale, crop_ratio)
    source = _clickme_source(
        split, image_size, training, data_dir, name=name, seed=seed, shuffle_buffer=shuffle_buffer,
        download=download, manual_dir=manual_dir, crop_scale=crop_scale, crop_ratio=crop_ratio, blur=blur,
        reshuffle_each_iteration=reshuffle_each_iteration,
    )
    return source.decoded(batch_size, training if drop_remainder is None else bool(drop_remainder))


def from_tfrecords(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    batch_size: int,
    image_size: int = 224,
    training: bool = False,
    *,
    seed: int | None = None,
    shuffle_buffer: int = 2048,
    drop_remainder: bool | None = None,
    crop_scale: Sequence[float] = DEFAULT_CROP_SCALE,
    crop_ratio: Sequence[float] = DEFAULT_CROP_RATIO,
    blur: bool = True,
) -> tf.data.Dataset:
    """The `load_clickme` pipeline over raw published ClickMe shards, without building the dataset.

    Args:
        paths: a shard path, a glob pattern (e.g. "clickme/train-*.tfrecords") or a list of them; or a
            `tf.data.Dataset` of serialized records already read, in the order wanted (e.g. the published
            loader's `tf.data.TFRecordDataset(paths, num_parallel_reads=AUTOTUNE)`).
        Other arguments: as in `load_clickme`.

    Returns:
        A `tf.data.Dataset` of dicts {"image", "heatmap", "label", "token"}.
    """
    _check_common_args(batch_size, image_size, shuffle_buffer, crop_scale, crop_ratio)
    if isinstance(paths, tf.data.Dataset):
        if paths.element_spec != tf.TensorSpec([], tf.string):
            raise ValueError(
                "`paths` as a tf.data.Dataset must yield serialized records (scalar tf.string); got "
                f"{paths.element_spec}."
            )
        # No file names: errors name the record's position in `paths`.
        records = _parse_records(paths.enumerate().map(
            lambda index, record: (record, tf.constant("the `paths` dataset"), index)
        ))
    else:
        files = _expand_paths(paths)
        sizes = [tf.io.gfile.stat(file).length for file in files]
        filenames = tf.data.Dataset.from_tensor_slices((files, tf.constant(sizes, tf.int64)))
        if training:
            filenames = filenames.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
        records = filenames.interleave(
            _shard_records,
            cycle_length=min(len(files), 16),
            num_parallel_calls=_AUTOTUNE,
            deterministic=seed is not None or not training,
        )
    examples = records.map(_check_published_record, num_parallel_calls=_AUTOTUNE)
    preprocessor = _Preprocessor(
        image_size, training, with_heatmaps=True, crop_scale=crop_scale, crop_ratio=crop_ratio, blur=blur
    )
    drop = training if drop_remainder is None else bool(drop_remainder)
    return _EncodedSource.of(examples, preprocessor, seed, shuffle_buffer).decoded(batch_size, drop)


def _shard_records(filename: tf.Tensor, size: tf.Tensor) -> tf.data.Dataset:
    """(record, filename, index) per record of one shard; an error naming the shard if it is broken.

    tf.data.TFRecordDataset reports a bad length or CRC, or a truncated file, as a DataLossError
    with a byte offset but no file name, and cannot be wrapped to add one. So the reader stops
    quietly at such a record (`ignore_errors`, this shard only), and an end marker checks that the
    records read cover the whole file (`size`, taken when the pipeline is made): if not, an
    InvalidArgumentError names the shard, the record and the byte where reading stopped.
    """
    records = tf.data.TFRecordDataset(filename).ignore_errors().enumerate()
    end_marker = tf.data.Dataset.from_tensors((tf.constant(-1, tf.int64), tf.constant(b"")))

    def step(state, item):
        offset, count = state  # Bytes and records read so far.
        index, record = item  # index is -1 for the end marker.

        complete = tf.logical_or(index >= 0, tf.equal(offset, size))
        offset = _fail_unless(complete, offset, lambda: [
            "ClickMe shard ", filename, " is corrupted or truncated: record ", tf.strings.as_string(count),
            " (at byte ", tf.strings.as_string(offset), " of ", tf.strings.as_string(size), ") has a bad "
            "length or CRC, or the file ends inside it; tf.data.TFRecordDataset cannot read past it. "
            "Download the shard again (the clickme/skip_bad_records TFDS build skips such records).",
        ])
        # Each record takes its length plus 16 bytes of framing (length, two CRCs).
        offset += tf.cast(tf.strings.length(record), tf.int64) + _TFRECORD_FRAMING_BYTES
        return (offset, count + 1), (record, filename, index)

    zero = tf.constant(0, tf.int64)
    checked = records.concatenate(end_marker).scan((zero, zero), step)
    return _parse_records(checked.filter(lambda record, source, index: index >= 0))


def _fail_unless(ok: tf.Tensor, value: tf.Tensor, message_parts) -> tf.Tensor:
    """`value`, or an InvalidArgumentError with the joined `message_parts()` when `ok` is false, per element of a
    tf.data pipeline (the message is built only on failure: this runs for every record)."""

    def fail():
        with tf.control_dependencies([tf.debugging.Assert(False, [tf.strings.join(message_parts())])]):
            return tf.identity(value)

    return tf.cond(ok, lambda: value, fail)


#: Records parsed together. Naming a record that does not parse takes a small dataset per try (below); trying a
#: whole group first, and record by record only when the group fails, pays that once per group: per record it
#: cost 17% of `from_tfrecords`' throughput at 224 px (bench/input_pipeline.py).
_PARSE_GROUP = 64


def _parse_records(records: tf.data.Dataset) -> tf.data.Dataset:
    """(features, source, index) of each (record, source, index), in order; an error naming the first record
    that does not parse (`_parsed_or_refused`)."""

    def group(record, source, index):
        whole = tf.data.Dataset.from_tensors((record, source, index))
        parsed = whole.map(lambda r, s, i: (tf.io.parse_example(r, PUBLISHED_FEATURES), s, i)).ignore_errors()
        one_by_one = (whole.flat_map(lambda r, s, i: tf.data.Dataset.from_tensor_slices((r, s, i)))
                      .flat_map(_parsed_or_refused).batch(_PARSE_GROUP))
        return parsed.concatenate(one_by_one).take(1).unbatch()  # one_by_one runs only if the group failed

    return records.batch(_PARSE_GROUP).flat_map(group)


def _parsed_or_refused(record: tf.Tensor, source: tf.Tensor, index: tf.Tensor) -> tf.data.Dataset:
    """(features, source, index) of one record, or an error naming the shard and the record if it does not parse.

    `tf.io.parse_single_example` reports a record that is not a tf.train.Example, or lacks a feature or holds
    it in another type (a heatmap of floats), without saying which record. A tf.data map cannot catch an error,
    so the parse is tried in a one-record dataset (`ignore_errors`), and a refusal naming the record follows it,
    reached only when the parse yielded nothing.
    """
    one = tf.data.Dataset.from_tensors((record, source, index))
    parsed = one.map(lambda record, source, index: (tf.io.parse_single_example(record, PUBLISHED_FEATURES),
                                                     source, index)).ignore_errors()

    def refuse(record, source, index):
        message = tf.strings.join([
            "ClickMe record ", tf.strings.as_string(index), " in ", source, " is not a published ClickMe "
            "example: expected a tf.train.Example with bytes features `image` and `heatmap` (encoded images) and an "
            "int64 `label`.",
        ])
        with tf.control_dependencies([tf.debugging.Assert(False, [message])]):
            empty = tf.identity(tf.constant(b""))
            return {IMAGE: empty, HEATMAP: empty, LABEL: tf.identity(tf.constant(0, tf.int64))}, source, index

    return parsed.concatenate(one.map(refuse)).take(1)


#: The first bytes of each encoding `tf.io.decode_image` reads: JPEG, PNG, GIF, BMP, WebP ("RIFF....WEBP").
_IMAGE_SIGNATURES = ((0, b"\xff\xd8\xff"), (0, b"\x89PNG\r\n\x1a\n"), (0, b"GIF8"), (0, b"BM"))


def _is_encoded_image(value: tf.Tensor) -> tf.Tensor:
    """Whether bytes start as an image `tf.io.decode_image` can decode (a cheap look at the header)."""
    head = tf.strings.join([tf.strings.substr(value, 0, 12), b"\0" * 12])  # at least 12 bytes to look at
    known = [tf.equal(tf.strings.substr(head, start, len(magic)), magic) for start, magic in _IMAGE_SIGNATURES]
    webp = tf.equal(tf.strings.substr(head, 0, 4), b"RIFF") & tf.equal(tf.strings.substr(head, 8, 4), b"WEBP")
    return tf.reduce_any(tf.stack([*known, webp]))


def _check_published_record(example: dict, source: tf.Tensor, index: tf.Tensor) -> dict:
    """The features of one parsed record; an error naming the feature, the shard and the record if its label is
    not an ImageNet-1k class (one-hot encoding would silently give an all-zero row) or its image or heatmap is not
    an encoded image (TensorFlow's decoder would fail later without saying which record)."""
    example = dict(example)
    label = example[LABEL]
    in_range = tf.logical_and(label >= 0, label < CLICKME_NUM_CLASSES)
    example[LABEL] = _fail_unless(in_range, label, lambda: [
        "ClickMe `label` ", tf.strings.as_string(label), " of record ", tf.strings.as_string(index), " in ",
        source, f" is outside [0, {CLICKME_NUM_CLASSES}): ClickMe labels are ImageNet-1k class indices.",
    ])
    for key, published in ((IMAGE, "RGB JPEGs"), (HEATMAP, "single-channel JPEGs")):
        value = example[key]
        example[key] = _fail_unless(_is_encoded_image(value), value, lambda key=key, value=value, published=published: [
            f"ClickMe `{key}` of record ", tf.strings.as_string(index), " in ", source, " is not an encoded image "
            f"(JPEG, PNG, GIF, BMP or WebP; the published ones are {published}): its ",
            tf.strings.as_string(tf.strings.length(value)), " bytes have no image header.",
        ])
    return example


def load_imagenet(
    split: str,
    batch_size: int,
    image_size: int = 224,
    training: bool = False,
    data_dir: str | os.PathLike | None = None,
    *,
    manual_dir: str | os.PathLike | None = None,
    seed: int | None = None,
    shuffle_buffer: int = 2048,
    drop_remainder: bool | None = None,
    download: bool = True,
    crop_scale: Sequence[float] = DEFAULT_CROP_SCALE,
    crop_ratio: Sequence[float] = DEFAULT_CROP_RATIO,
    center_crop_fraction: float = 0.875,
    reshuffle_each_iteration: bool = True,
) -> tf.data.Dataset:
    """ImageNet-1k (TFDS `imagenet2012`) as batches without human maps: zero heatmaps, token 0.

    ImageNet needs a manual download: put `ILSVRC2012_img_train.tar` and `ILSVRC2012_img_val.tar`
    in `manual_dir` (see `tfds.builder("imagenet2012").MANUAL_DOWNLOAD_INSTRUCTIONS`). Training
    uses the same random resized crop and flip as `load_clickme`; evaluation takes the central
    square of side `center_crop_fraction` x the short side, resized to `image_size`.

    Args:
        manual_dir: path. Where the ImageNet archives are. Defaults to TFDS's manual directory.
        center_crop_fraction: float in (0, 1]. Evaluation crop. Defaults to 0.875.
        reshuffle_each_iteration: bool. As in `load_clickme`. Defaults to True.
        Other arguments: as in `load_clickme`.
    """
    _check_common_args(batch_size, image_size, shuffle_buffer, crop_scale, crop_ratio)
    source = _imagenet_source(
        split, image_size, training, data_dir, manual_dir=manual_dir, seed=seed, shuffle_buffer=shuffle_buffer,
        download=download, crop_scale=crop_scale, crop_ratio=crop_ratio, center_crop_fraction=center_crop_fraction,
        reshuffle_each_iteration=reshuffle_each_iteration,
    )
    return source.decoded(batch_size, training if drop_remainder is None else bool(drop_remainder))


def mix_datasets(
    clickme: tf.data.Dataset,
    imagenet: tf.data.Dataset,
    clickme_fraction: float = 0.2,
    *,
    batch_size: int | None = None,
    seed: int | None = None,
    reshuffle_each_iteration: bool = True,
) -> tf.data.Dataset:
    """Mix examples with human maps (ClickMe) and without (e.g. ImageNet), as in the published training.

    Each output example comes from `clickme` with probability `clickme_fraction` (default 0.2, ours: the
    published package has no mixing code)
    and from `imagenet` otherwise. Examples from `imagenet` get an all-zero map and `token` 0
    (only cross-entropy applies to them); those from `clickme` keep their token (1 by default).
    The mix stops when either input runs out, so that the fraction holds: `.repeat()` the inputs
    for multi-epoch training.

    Args:
        clickme: dataset of dicts {"image", "heatmap", "label"[, "token"]}, batched or not.
        imagenet: dataset of dicts {"image", "label", ...}, batched or not, with the same image
            size (e.g. `load_imagenet`); other keys are replaced.
        clickme_fraction: float in [0, 1]. Probability that an example comes from `clickme`.
        batch_size: int or None. Output batch size. Defaults to the (static) batch size of
            `clickme` when it is batched; unbatched inputs give an unbatched output by default.
        seed: int or None. Makes the draw reproducible.
        reshuffle_each_iteration: bool. A new draw each time the dataset is iterated. Defaults to True.

    Returns:
        A `tf.data.Dataset` of dicts {"image", "heatmap", "label", "token"}.
    """
    if not (isinstance(clickme_fraction, (int, float)) and 0.0 <= clickme_fraction <= 1.0):
        raise ValueError(f"`clickme_fraction` must be a number in [0, 1]; got {clickme_fraction!r}.")
    if batch_size is not None:
        _check_positive_int(batch_size, "batch_size")
    parts = []
    for name, dataset, has_maps in (("clickme", clickme, True), ("imagenet", imagenet, False)):
        if not isinstance(dataset, tf.data.Dataset):
            raise TypeError(f"`{name}` must be a tf.data.Dataset; got {type(dataset).__name__}.")
        spec = dataset.element_spec
        required = REQUIRED_KEYS if has_maps else (IMAGE, LABEL)
        if not isinstance(spec, dict) or any(key not in spec for key in required):
            raise ValueError(f"`{name}` must yield dicts with the keys {list(required)}; got element spec {spec}.")
        rank = spec[IMAGE].shape.rank
        if rank == 4:
            if batch_size is None and has_maps:
                batch_size = spec[IMAGE].shape[0]
                if batch_size is None:
                    raise ValueError(
                        "`clickme` has no static batch size (its last batch may be smaller): pass "
                        "`batch_size`, or batch it with drop_remainder=True."
                    )
            dataset = dataset.unbatch()
        elif rank != 3:
            raise ValueError(
                f"`{name}` images must have shape (H, W, 3) or (B, H, W, 3); got {spec[IMAGE].shape}."
            )
        parts.append(dataset.map(_standardise_fn(has_maps), num_parallel_calls=_AUTOTUNE))
    clickme_shape = parts[0].element_spec[IMAGE].shape
    imagenet_shape = parts[1].element_spec[IMAGE].shape
    if not clickme_shape.is_compatible_with(imagenet_shape):
        raise ValueError(
            f"`clickme` and `imagenet` images must have the same size; got {tuple(clickme_shape)} and "
            f"{tuple(imagenet_shape)}. Load both with the same `image_size`."
        )
    mixed = _draw(parts[0], parts[1], clickme_fraction, seed, reshuffle_each_iteration)
    if batch_size is not None:
        mixed = mixed.batch(batch_size, drop_remainder=True)
    return mixed.prefetch(_AUTOTUNE)


def _standardise_fn(has_maps: bool):
    """Map an example to {"image", "heatmap", "label", "token"}; without maps: zero map, token 0."""

    def standardise(example: dict) -> dict:
        image = tf.cast(example[IMAGE], tf.float32)
        if has_maps:
            heatmap = tf.cast(example[HEATMAP], tf.float32)
            if heatmap.shape.rank == 2:
                heatmap = heatmap[..., None]
            token = tf.cast(example.get(TOKEN, DEFAULT_TOKEN), tf.float32)
        else:
            heatmap = tf.zeros_like(image[..., :1])
            token = tf.constant(0.0, tf.float32)
        return {IMAGE: image, HEATMAP: heatmap, LABEL: tf.cast(example[LABEL], tf.int32), TOKEN: token}

    return standardise


def _draw(clickme: tf.data.Dataset, imagenet: tf.data.Dataset, clickme_fraction: float, seed: int | None,
          reshuffle_each_iteration: bool) -> tf.data.Dataset:
    """Each element from `clickme` with probability `clickme_fraction`, else from `imagenet`, until one runs out.

    The sequence of choices depends on `seed` only, never on the elements: mixing encoded examples
    (`_mix_encoded`) and decoding them afterwards gives what mixing the decoded ones (`mix_datasets`) gives.
    """
    return tf.data.Dataset.sample_from_datasets(
        [clickme, imagenet],
        weights=[float(clickme_fraction), 1.0 - float(clickme_fraction)],
        seed=seed,
        stop_on_empty_dataset=True,
        rerandomize_each_iteration=reshuffle_each_iteration,
    )


# --------------------------------------------------------------------------------------------
# The trainer's pipeline: encoded examples mixed, batched and split between workers, then decoded.
# --------------------------------------------------------------------------------------------


def _mix_encoded(clickme: tf.data.Dataset, imagenet: tf.data.Dataset, clickme_fraction: float, *,
                 seed: int | None, reshuffle_each_iteration: bool = True) -> tf.data.Dataset:
    """`mix_datasets` of unbatched tagged examples (`_EncodedSource.tagged`), before decoding: the same draw."""
    if clickme.element_spec != imagenet.element_spec:
        raise ValueError(
            "ClickMe and ImageNet examples must have one structure to be mixed before decoding; got "
            f"{clickme.element_spec} and {imagenet.element_spec}."
        )
    return _draw(clickme, imagenet, clickme_fraction, seed, reshuffle_each_iteration)


class _TaggedDecoder:
    """Decodes tagged examples (`_EncodedSource.tagged`) into `fit` batches, each example by its source's
    `_Preprocessor`: what `load_clickme`, `load_imagenet` and `mix_datasets` give, decoded after the split.

    Decoding is a pure function of (encoded example, seed) per example, and finishing a batch (float32 images,
    the heatmaps' blur, crop, flip and resize, the tokens) works row by row; so a worker that decodes only its
    rows of a global batch gets exactly those rows of the batch decoded whole. Examples without a human map
    (ImageNet) get an all-zero map and token 0, as in `mix_datasets`; ClickMe's get token 1.
    """

    def __init__(self, clickme: _Preprocessor, imagenet: _Preprocessor | None = None):
        if not clickme.with_heatmaps or (imagenet is not None and imagenet.with_heatmaps):
            raise ValueError("`clickme` must decode human maps and `imagenet` must not.")
        self.preprocessors = [clickme] if imagenet is None else [clickme, imagenet]
        for preprocessor in self.preprocessors:
            if preprocessor.resize_per_batch:
                raise ValueError("Tagged examples are resized per example: make the ClickMe source with "
                                 "per_batch_resize=False.")
            if (preprocessor.training, preprocessor.image_size) != (clickme.training, clickme.image_size):
                raise ValueError("ClickMe and ImageNet examples must be decoded alike (training, image size) to "
                                 "be batched together.")
        self.image_size = clickme.image_size
        self.blur = clickme.blur
        self.resolution = clickme.heatmap_resolution

    def __call__(self, examples: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
        """Batches of `batch_size` of the unbatched tagged `examples`, decoded (a last partial batch is dropped)."""
        return _decoded_batches(examples, self.example, self.batch, batch_size, drop_remainder=True,
                                deterministic=True)

    def example(self, tagged: dict) -> dict:
        """Decode one tagged example by its source; the same structure from both (a zero map without one)."""

        def decode(source: int) -> dict:
            preprocessor = self.preprocessors[source]
            encoded = {IMAGE: tagged[IMAGE], HEATMAP: tagged[HEATMAP], LABEL: tagged[LABEL]}
            out = preprocessor.example(encoded, tagged[_SEED])
            if not preprocessor.with_heatmaps:  # the whole (empty) map, unflipped: stays zero in `batch`
                out[HEATMAP] = tf.zeros([self.resolution, self.resolution], tf.float32)
                out["crop"] = tf.constant([0.0, 1.0, 0.0, 1.0], tf.float32)
                out["flip"] = tf.constant(0.0, tf.float32)
            out[TOKEN] = tf.constant(1.0 if preprocessor.with_heatmaps else 0.0, tf.float32)
            return out

        if len(self.preprocessors) == 1:
            return decode(_WITH_MAPS)
        # One branch runs per example: an ImageNet example is never decoded as a ClickMe one, nor the reverse.
        return tf.switch_case(tagged[_SOURCE], [lambda: decode(_WITH_MAPS), lambda: decode(_WITHOUT_MAPS)])

    def batch(self, batch: dict) -> dict:
        """Finish a batch as `_Preprocessor.batch` does; rows without a human map keep an all-zero map."""
        # A row without a human map holds zeros, and blurring, cropping and resizing (linear) keep them zero.
        heatmap = _transform_heatmaps(batch[HEATMAP], batch["crop"], batch["flip"], self.image_size, self.blur)
        return {IMAGE: tf.cast(batch[IMAGE], tf.float32), HEATMAP: heatmap, LABEL: batch[LABEL], TOKEN: batch[TOKEN]}


# --------------------------------------------------------------------------------------------
# TFDS plumbing and argument checks.
# --------------------------------------------------------------------------------------------


def prepared_builder(
    name: str, split: str | Sequence[str], data_dir: str | os.PathLike | None = None, *, download: bool = True,
    manual_dir: str | os.PathLike | None = None,
):
    """The prepared TFDS builder of dataset `name` (built first if `download`), with `split` (one or several)
    checked.

    Its `info` gives what a training run must know before it starts (classes, split sizes), so that a bad
    name, split or directory fails before anything trains; the loaders above check theirs the same way.
    """
    return _tfds_builder(name, data_dir, download, split, manual_dir=manual_dir)


def _tfds_builder(name: str, data_dir, download: bool, split: str | Sequence[str], manual_dir=None):
    """The prepared TFDS builder for `name`, downloading it if allowed, with each split checked; clear errors
    otherwise."""
    import tensorflow_datasets as tfds

    if name.split("/")[0].startswith("clickme"):
        import tfds_clickme  # noqa: F401  (registers the ClickMe builders)
    splits = list(split) if isinstance(split, (list, tuple)) else [split]
    for one in splits:
        if not isinstance(one, str) or not one.strip():
            raise ValueError(f"`split` must be a non-empty split name such as 'train'; got {one!r}.")
    if data_dir is not None:
        data_dir = os.fspath(data_dir)
        if not download and not tf.io.gfile.isdir(data_dir):
            raise FileNotFoundError(f"`data_dir` {data_dir!r} does not exist (and `download` is False).")
    builder = tfds.builder(name, data_dir=data_dir)
    known_splits = getattr(type(builder), "SPLIT_NAMES", None)
    if known_splits and not builder.is_prepared():
        for one in splits:
            _check_split(one, known_splits, name)  # Before a long download, not after.
    if not builder.is_prepared():
        if not download:
            raise FileNotFoundError(
                f"Dataset {name!r} is not prepared in data_dir={builder.data_dir_root!s} (looked for "
                f"{builder.data_dir!s}). Build it first, e.g. tfds.builder({name!r}, data_dir=...)"
                ".download_and_prepare(), or pass download=True."
            )
        download_config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir) if manual_dir else None)
        builder.download_and_prepare(download_config=download_config)
    for one in splits:
        _check_split(one, tuple(builder.info.splits.keys()), name)
        _check_split_selects_examples(one, builder.info.splits, name)
    return builder


_SPLIT_NAME = re.compile(r"[A-Za-z_][\w-]*")


def _check_split(split: str, available: Sequence[str], name: str) -> None:
    """Raise a ValueError naming the available splits when `split` refers to an unknown one."""
    for part in split.split("+"):
        match = _SPLIT_NAME.match(part.strip())
        base = match.group(0) if match else part.strip()
        if base not in available:
            hint = " (ClickMe's published 'val' shards are the split 'validation')" if base == "val" else ""
            raise ValueError(f"Unknown split {base!r} for dataset {name!r}; available: {sorted(available)}{hint}.")


def _check_split_selects_examples(split: str, split_infos, name: str) -> None:
    """Raise a ValueError saying where a slice starts and ends when it selects nothing (e.g. train[50%:10%]).

    TFDS itself reports such a slice only when it is read, as a negative number of elements.
    """
    import tensorflow_datasets as tfds

    try:
        parts = tfds.core.ReadInstruction.from_spec(split).to_absolute(split_infos)
    except (ValueError, AssertionError) as error:
        raise ValueError(f"`split` {split!r} of dataset {name!r}: {str(error).splitlines()[0]}") from None
    for part in parts:
        size = split_infos[part.splitname].num_examples
        start = 0 if part.from_ is None else part.from_
        end = size if part.to is None else part.to
        if end <= start:
            raise ValueError(
                f"`split` {split!r} of dataset {name!r} selects no examples: its {part.splitname!r} slice starts "
                f"at example {start} and ends at {end} (of {size}); the end must come after the start, e.g. "
                f"{part.splitname}[{min(start, end)}:{max(start, end)}]."
            )


def _tfds_examples(builder, split: str, training: bool, seed: int | None, encoded: Sequence[str],
                   reshuffle_each_iteration: bool = True):
    """Examples of a prepared builder, with the image features left encoded (decoded later)."""
    import tensorflow_datasets as tfds

    features = builder.info.features
    decoders = {
        key: tfds.decode.SkipDecoding()
        for key in encoded
        if isinstance(features[key], tfds.features.Image)
    }
    read_config = tfds.ReadConfig(
        shuffle_seed=seed,
        shuffle_reshuffle_each_iteration=reshuffle_each_iteration,
        try_autocache=not training,
    )
    return builder.as_dataset(split=split, shuffle_files=training, decoders=decoders, read_config=read_config)


def _is_jpeg_feature(feature) -> bool | None:
    """Whether a TFDS image feature stores JPEG bytes; None when unknown (checked per image)."""
    encoding = getattr(feature, "encoding_format", None)
    return {"jpeg": True, "png": False}.get(encoding)


def _expand_paths(paths) -> list[str]:
    """Files named by a path, a glob pattern or a list of them; an error if any matches nothing."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[str] = []
    for path in paths:
        path = os.fspath(path)
        matches = sorted(tf.io.gfile.glob(path))
        if not matches:
            raise FileNotFoundError(f"No ClickMe shard matches {path!r}.")
        files.extend(matches)
    if not files:
        raise ValueError("`paths` is empty: pass shard paths or a glob pattern such as 'train-*.tfrecords'.")
    return files


def _check_positive_int(value, name: str) -> None:
    check_int(value, name, minimum=1, maximum=INT64_MAX, expected="a positive integer")


def _check_range_pair(value, name: str, low: float, high: float) -> None:
    try:
        first, second = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a pair (min, max); got {value!r}.") from None
    if not (low < first <= second <= high):
        raise ValueError(f"`{name}` must satisfy {low} < min <= max <= {high}; got {value!r}.")


def _check_common_args(batch_size, image_size, shuffle_buffer, crop_scale, crop_ratio) -> None:
    _check_positive_int(batch_size, "batch_size")
    _check_positive_int(image_size, "image_size")
    _check_positive_int(shuffle_buffer, "shuffle_buffer")
    _check_range_pair(crop_scale, "crop_scale", 0.0, 1.0)
    _check_range_pair(crop_ratio, "crop_ratio", 0.0, math.inf)
