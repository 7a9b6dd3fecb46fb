"""Benchmark: images/s of the ClickMe training input pipeline against the published per-example one.

Both read the same generated shards (published format, textured synthetic pictures whose JPEGs are
about the size of real 256x256 photographs). Measured side by side in one run, in alternating
rounds, so that load from other processes hits both alike; the median round is reported.

* `published (naive)`: TFRecordDataset -> per-example map (parse, decode, resize the image, resize
  the map to 64, blur it with a 10x10 conv, resize it, one-hot) -> batch -> prefetch; what the
  published loader does.
* `load_clickme(training=True)`: the TFDS dataset built from the same shards, shuffled, with random
  resized crops and flips (more work than the naive pipeline, which does not augment).
* `load_clickme(training=False)`: the published evaluation input, same output as the naive one.
* `from_tfrecords(training=True)`: the training pipeline straight from the raw shards.

Then the time of one harmonized training step (`HarmonizedModel.train_step`) of a deliberately
small CNN at the same batch and image size, to compare with the pipeline's time per batch.

Usage: python bench/input_pipeline.py [--records 384] [--batch-size 32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # Run as a script from a checkout, without installing.
    sys.path.insert(0, str(REPO_ROOT))

import os  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

import tfds_clickme  # noqa: E402,F401
from harmonization import data  # noqa: E402
from tfds_clickme.clickme import published_shards  # noqa: E402


def naive_published_pipeline(files: list[str], batch_size: int, image_size: int) -> tf.data.Dataset:
    """The published loader's structure: all the work per example in one `map`."""
    kernel = tf.constant(data.gaussian_kernel()[:, :, None, None], tf.float32)

    def parse(record):
        example = tf.io.parse_single_example(record, data.PUBLISHED_FEATURES)
        image = tf.reshape(tf.io.decode_jpeg(example["image"]), published_shards.IMAGE_SHAPE)
        image = tf.image.resize(tf.cast(image, tf.float32), (image_size, image_size), method="bilinear")
        heatmap = tf.reshape(tf.io.decode_jpeg(example["heatmap"]), published_shards.HEATMAP_SHAPE)
        heatmap = tf.image.resize(tf.cast(heatmap, tf.float32), (64, 64), method="bilinear")
        heatmap = tf.nn.conv2d(heatmap[None], kernel, [1, 1, 1, 1], "SAME")[0]
        heatmap = tf.image.resize(heatmap, (image_size, image_size), method="bilinear")
        label = tf.one_hot(tf.cast(example["label"], tf.int32), published_shards.NUM_CLASSES)
        return image, heatmap, label

    options = tf.data.Options()
    options.deterministic = True  # As published.
    dataset = tf.data.TFRecordDataset(files, num_parallel_reads=tf.data.AUTOTUNE).with_options(options)
    dataset = dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def throughput(dataset: tf.data.Dataset, batch_size: int, batches: int, warmup: int = 4) -> tuple[float, float]:
    """(images per wall-clock second, images per CPU-second of this process) over `batches` batches.

    Measured after `warmup` batches (buffers filled, functions traced). The CPU-time rate counts all
    of tf.data's threads and is insensitive to other processes competing for the cores.
    """
    iterator = iter(dataset.repeat())
    for _ in range(warmup):
        next(iterator)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(iterator)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return batches * batch_size / wall, batches * batch_size / cpu


def harmonized_step_seconds(batch: dict, steps: int = 3) -> float | None:
    """Seconds per `HarmonizedModel` training step of a small CNN on `batch` (None if unavailable)."""
    try:
        import keras

        from harmonization import HarmonizedModel
    except ImportError as error:  # pragma: no cover - depends on the rest of the library
        print(f"(skipping the training-step reference: {error})")
        return None
    image_size = batch["image"].shape[1]
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    for filters in (16, 32, 64, 64):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(published_shards.NUM_CLASSES)(x)
    model = HarmonizedModel(keras.Model(inputs, outputs, name="small_cnn"))
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    step = tf.function(model.train_step)
    step(batch)  # Trace.
    start = time.perf_counter()
    for _ in range(steps):
        step(batch)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=384, help="Generated records (4 shards).")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batches", type=int, default=12, help="Timed batches per pipeline and round.")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="clickme_bench_") as tmp:
        run(Path(tmp), args)


def run(work: Path, args: argparse.Namespace) -> None:
    """Generate the shards and the TFDS dataset under `work`, then measure."""
    batch_size, image_size = args.batch_size, args.image_size
    shard_dir = work / "manual"
    per_shard = -(-args.records // 4)
    for shard in range(4):
        records = published_shards.synthetic_records(per_shard, seed=shard, texture=15.0)
        published_shards.write_shard(shard_dir / f"train-{shard}.tfrecords", records)
    files = sorted(str(p) for p in shard_dir.glob("train-*.tfrecords"))
    mean_kb = sum(Path(f).stat().st_size for f in files) / (4 * per_shard) / 1024
    builder = tfds.builder("clickme", data_dir=str(work / "tfds"))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(shard_dir)))

    pipelines = {
        "published (naive)": lambda: naive_published_pipeline(files, batch_size, image_size),
        "load_clickme(training=True)": lambda: data.load_clickme(
            "train", batch_size, image_size, training=True, data_dir=str(work / "tfds")
        ),
        "load_clickme(training=False)": lambda: data.load_clickme(
            "train", batch_size, image_size, training=False, data_dir=str(work / "tfds")
        ),
        "from_tfrecords(training=True)": lambda: data.from_tfrecords(
            files, batch_size, image_size, training=True
        ),
    }
    rates: dict[str, list[float]] = {name: [] for name in pipelines}
    cpu_rates: dict[str, list[float]] = {name: [] for name in pipelines}
    ratios: list[float] = []
    for round_index in range(args.rounds):
        for name, make in pipelines.items():
            rate, cpu_rate = throughput(make(), batch_size, args.batches)
            rates[name].append(rate)
            cpu_rates[name].append(cpu_rate)
        ratios.append(rates["load_clickme(training=True)"][-1] / rates["published (naive)"][-1])
        print(f"round {round_index + 1}: " + ", ".join(f"{n}: {r[-1]:.0f}" for n, r in rates.items()))

    print(
        f"\n{4 * per_shard} records ({mean_kb:.1f} KB per record), batch {batch_size}, image {image_size}, "
        f"{os.cpu_count()} CPU cores (shared), median of {args.rounds} rounds of {args.batches} batches:"
    )
    naive = statistics.median(rates["published (naive)"])
    naive_cpu = statistics.median(cpu_rates["published (naive)"])
    header = ("images/s", "vs naive", "images/CPU-s", "vs naive", "CPU ms/image")
    print(f"  {'pipeline':32s} {header[0]:>9s} {header[1]:>9s} {header[2]:>13s} {header[3]:>9s} {header[4]:>13s}")
    for name in pipelines:
        median, median_cpu = statistics.median(rates[name]), statistics.median(cpu_rates[name])
        print(
            f"  {name:32s} {median:9.0f} {median / naive:8.2f}x {median_cpu:13.0f} {median_cpu / naive_cpu:8.2f}x"
            f" {1000 / median_cpu:13.2f}"
        )
    print(f"  training pipeline / naive (wall clock), per round: {', '.join(f'{r:.2f}' for r in ratios)}")

    train = data.load_clickme("train", batch_size, image_size, training=True, data_dir=str(work / "tfds"))
    batch = next(iter(train))
    step = harmonized_step_seconds(batch)
    train_rate = statistics.median(rates["load_clickme(training=True)"])
    if step is not None:
        print(
            f"\nHarmonized training step, small 4-conv CNN, batch {batch_size}: {step * 1000:.0f} ms "
            f"({batch_size / step:.0f} images/s); the input pipeline makes a batch in "
            f"{batch_size / train_rate * 1000:.0f} ms on the same cores."
        )


if __name__ == "__main__":
    main()
