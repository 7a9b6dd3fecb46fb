"""The published ClickMe shard format: what a record holds, and how to write synthetic ones.

The harmonization authors published ClickMe as TFRecord shards (`train-{i}.tfrecords`,
`val-{i}.tfrecords`). Each record is a `tf.train.Example` with three features:

* `image`: bytes, a JPEG-encoded 256x256 RGB image (an ImageNet image, resized);
* `heatmap`: bytes, a JPEG-encoded 256x256 single-channel human feature-importance map;
* `label`: int64, the ImageNet-1k class index (0..999).

The builder reads this format; the dummy data, the tests and the benchmark write it with the
functions below from synthetic pictures (never real ClickMe images).
"""

from __future__ import annotations

import io
import re
from typing import Iterable, Iterator

import numpy as np
from etils import epath
from PIL import Image

IMAGE_KEY = "image"
HEATMAP_KEY = "heatmap"
LABEL_KEY = "label"

#: Shape of the published images and maps.
IMAGE_SHAPE = (256, 256, 3)
HEATMAP_SHAPE = (256, 256, 1)
NUM_CLASSES = 1000

#: Published shard file names: `train-17.tfrecords`, `val-3.tfrecords`.
SHARD_PATTERN = re.compile(r"^(?P<prefix>train|val)-(?P<index>\d+)\.tfrecords$")


def shard_sort_key(name: str) -> tuple:
    """Order shard names numerically (`train-2` before `train-10`), unknown names last."""
    match = SHARD_PATTERN.match(name)
    if match is None:
        return (1, name, 0)
    return (0, match["prefix"], int(match["index"]))


def encode_jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes of a uint8 (H, W, 3) or (H, W[, 1]) array."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"`array` must be uint8; got {array.dtype}.")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def serialize_record(image_bytes: bytes, heatmap_bytes: bytes, label: int) -> bytes:
    """One published-format record: a serialized `tf.train.Example`."""
    # Imported here so that reading the constants above does not load TensorFlow.
    import tensorflow as tf

    feature = {
        IMAGE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_bytes])),
        HEATMAP_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[heatmap_bytes])),
        LABEL_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_shard(path: epath.PathLike, records: Iterable[bytes]) -> int:
    """Write serialized records to a TFRecord shard; returns how many were written."""
    import tensorflow as tf

    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
            count += 1
    return count


def synthetic_picture(
    rng: np.random.Generator, size: int = 256, texture: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic (image, heatmap) pair: smooth coloured shapes and a blob-shaped "human" map.

    `texture` adds pixel noise of that standard deviation so that JPEG sizes and decode times
    approach those of real photographs (about 30 KB at 256x256 for `texture=15`).
    """
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image = np.empty((size, size, 3), np.float32)
    for channel in range(3):
        fy, fx, phase = rng.uniform(1, 6), rng.uniform(1, 6), rng.uniform(0, 2 * np.pi)
        image[..., channel] = 128 + 80 * np.sin(2 * np.pi * fx * x + phase) * np.cos(2 * np.pi * fy * y)
    # A few bright disks: the "objects" the map points at.
    heatmap = np.zeros((size, size), np.float32)
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0.15, 0.85, size=2)
        radius = rng.uniform(0.05, 0.2)
        distance2 = (y - cy) ** 2 + (x - cx) ** 2
        image[distance2 < radius**2] = rng.uniform(0, 255, size=3)
        heatmap += np.exp(-distance2 / (2 * radius**2))
    if texture > 0:
        image += rng.normal(0.0, texture, size=image.shape).astype(np.float32)
    heatmap = 255 * heatmap / heatmap.max()
    return (
        np.clip(image, 0, 255).round().astype(np.uint8),
        np.clip(heatmap, 0, 255).round().astype(np.uint8)[..., None],
    )


def synthetic_records(
    count: int,
    seed: int,
    size: int = 256,
    num_classes: int = NUM_CLASSES,
    texture: float = 0.0,
    quality: int = 90,
) -> Iterator[bytes]:
    """`count` published-format records of synthetic pictures, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        image, heatmap = synthetic_picture(rng, size=size, texture=texture)
        label = int(rng.integers(0, num_classes))
        yield serialize_record(encode_jpeg(image, quality), encode_jpeg(heatmap, quality), label)
