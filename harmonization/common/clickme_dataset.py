"""The published ClickMe loaders (serre-lab/Harmonization 0.0.9, `harmonization/common/clickme_dataset.py`).

Batches are `(images, heatmaps, labels)`: float32 images (B, 224, 224, 3) in [0, 255], float32 maps
(B, 224, 224, 1) resized to 64x64, blurred and resized back, float32 one-hot labels (B, 1000), in the published
record order. Decoding, resizing and blurring are the native pipeline's (`harmonization.data.from_tfrecords`,
equal to the published per-example code to float rounding; tests/test_published_api.py measures it).

Two published behaviours are kept on purpose, because they change which images are scored:
* `load_clickme` batches with `drop_remainder=True`: the last `len % batch_size` images are never seen;
* `load_clickme_train` / `load_clickme_val` fetch shards `range(NB_TRAIN_SHARDS)` / `range(NB_VAL_SHARDS)`,
  i.e. `train-0..317` and `val-0..16`, while the published tests also fetch `train-318` and `val-17`.
The native `harmonization.data.load_clickme` (TFDS builder, every shard, every image) has neither.

Shards are cached where the published loaders cached them (`~/.keras/datasets/click-me/clickme_val_{i}`,
or under `KERAS_HOME`), so files downloaded by 0.0.9 are reused; downloads time out instead of hanging and
an interrupted one is never kept. `HARMONIZATION_CLICKME_URL` replaces the bucket (`harmonization.mirrors`).
"""

from __future__ import annotations

import os
from pathlib import Path

import tensorflow as tf

from harmonization import data, mirrors
from harmonization.tfrecord_framing import first_record_problem, usable_cached_shard
from harmonization.common.blur import gaussian_kernel

__all__ = [
    "AUTO",
    "CLICKME_BASE_URL",
    "FEATURE_DESCRIPTION",
    "GAUSSIAN_KERNEL",
    "NB_TRAIN_SHARDS",
    "NB_VAL_SHARDS",
    "load_clickme",
    "load_clickme_train",
    "load_clickme_val",
    "parse_clickme_prototype",
]

#: The published bucket, or `HARMONIZATION_CLICKME_URL` when it was set at import.
CLICKME_BASE_URL = mirrors.clickme_url()
#: Published shard counts: the loaders fetch `val-0..16` and `train-0..317`.
NB_VAL_SHARDS = 17
NB_TRAIN_SHARDS = 318

AUTO = tf.data.AUTOTUNE
FEATURE_DESCRIPTION = data.PUBLISHED_FEATURES
#: Published image and map sizes, and the number of ImageNet classes of the one-hot labels.
IMAGE_SIZE = 224
NUM_CLASSES = data.CLICKME_NUM_CLASSES


def __getattr__(name: str):
    # GAUSSIAN_KERNEL (published: a module constant) is made on first use: a tensor made while importing would
    # start TensorFlow's runtime, after which a tf.distribute strategy with collectives can no longer be set up.
    if name == "GAUSSIAN_KERNEL":
        return gaussian_kernel()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_clickme_prototype(prototype):
    """One serialized record -> (image (224, 224, 3), blurred heatmap (224, 224, 1), one-hot label (1000,))."""
    example = tf.io.parse_single_example(prototype, FEATURE_DESCRIPTION)
    image = tf.cast(tf.io.decode_jpeg(example["image"], channels=3), tf.float32)
    image = tf.image.resize(image, (IMAGE_SIZE, IMAGE_SIZE), method="bilinear")
    heatmap = tf.io.decode_jpeg(example["heatmap"], channels=1)
    heatmap = data.preprocess_heatmaps(heatmap, IMAGE_SIZE)
    label = tf.one_hot(tf.cast(example["label"], tf.int32), NUM_CLASSES)
    return image, heatmap, label


def load_clickme(shards_paths, batch_size):
    """Batches of `(images, heatmaps, one-hot labels)` from published ClickMe shards, as published.

    Args:
        shards_paths: list of str. The shard files, read in the published (deterministic interleaved) order.
        batch_size: int. Images per batch; the last incomplete batch is dropped, as published.

    Returns:
        A `tf.data.Dataset` of `(images, heatmaps, labels)` tuples.
    """
    # Read in the published interleaved order: from_tfrecords without training keeps tf.data deterministic.
    records = tf.data.TFRecordDataset(shards_paths, num_parallel_reads=AUTO)
    batches = data.from_tfrecords(records, batch_size, IMAGE_SIZE, drop_remainder=True)
    return batches.map(
        lambda batch: (batch["image"], batch["heatmap"], tf.one_hot(batch["label"], NUM_CLASSES)),
        num_parallel_calls=AUTO,
    ).prefetch(AUTO)


def _keras_cache() -> Path:
    """Where `tf.keras.utils.get_file(..., cache_subdir="datasets/click-me")` keeps the shards."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "datasets" / "click-me"


def _published_shards(folder: str, count: int) -> list[str]:
    """Paths of `{folder}-0..count-1` (cached as `clickme_{folder}_{i}`), downloaded when missing."""
    # Imported here: harmonization.hub imports Keras (through presets), which reading local shards never needs.
    from harmonization.hub import download_file

    paths = []
    for index in range(count):
        path = _keras_cache() / f"clickme_{folder}_{index}"
        if not usable_cached_shard(path):
            download_file(f"{mirrors.clickme_url()}/{folder}/{folder}-{index}.tfrecords", path,
                          check=first_record_problem)
        paths.append(str(path))
    return paths


def load_clickme_train(batch_size=64):
    """The published ClickMe training shards as `load_clickme` batches.

    As published: shards `train-0..317` only (the bucket also has `train-318`) and the last incomplete batch
    dropped. `harmonization.data.load_clickme("train", ...)` reads every shard and every image.
    """
    return load_clickme(_published_shards("train", NB_TRAIN_SHARDS), batch_size)


def load_clickme_val(batch_size=64):
    """The published ClickMe validation shards as `load_clickme` batches.

    As published: shards `val-0..16` only (the bucket also has `val-17`) and the last incomplete batch dropped,
    so fewer images are scored than the split holds. `harmonization.data.load_clickme("validation", ...)` and
    `harmonization evaluate` score every image.
    """
    return load_clickme(_published_shards("val", NB_VAL_SHARDS), batch_size)
