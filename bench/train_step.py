"""Benchmark: the harmonized training step against a plain cross-entropy step, in the same run.

    python bench/train_step.py                      # tiny CNN, ResNet50V2, ViT-B/16 at 224x224, batch 8
    python bench/train_step.py --models convnext_tiny --jit
    python bench/train_step.py --models tiny --steps 10
    python bench/train_step.py --jit                # also time both steps under XLA

The harmonized step needs a forward pass, an input-gradient backward pass, and a backward pass through
both, so its FLOP floor is about 2x the plain step (forward + backward). We report the ratio of median
step times measured in one process, one model at a time; absolute times on shared machines are noise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import harmonization  # noqa: E402

NUM_CLASSES = 1000


def tiny_cnn(size):
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.LayerNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(x), name="tiny_cnn")


def resnet50v2(size):
    return harmonization.architectures.ResNetV2(image_size=size)


def vit_b16(size):
    return harmonization.architectures.ViT(image_size=size)


def convnext_tiny(size):
    return harmonization.architectures.ConvNeXt(image_size=size)


MODELS = {
    "tiny": (tiny_cnn, 64),
    "resnet50v2": (resnet50v2, 224),
    "vit_b16": (vit_b16, 224),
    "convnext_tiny": (convnext_tiny, 224),
}
DEFAULT_MODELS = ["tiny", "resnet50v2", "vit_b16"]


def make_batch(size, batch_size):
    rng = np.random.default_rng(0)
    return {
        "image": rng.uniform(0, 255, (batch_size, size, size, 3)).astype("float32"),
        "heatmap": rng.uniform(0, 1, (batch_size, size, size, 1)).astype("float32"),
        "label": rng.integers(0, NUM_CLASSES, batch_size).astype("int32"),
    }


def timed(step):
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def bench(name, batch_size, steps, warmup, jit):
    build, size = MODELS[name]
    batch = make_batch(size, batch_size)
    keras.utils.set_random_seed(0)
    model = build(size)
    plain = keras.models.clone_model(model)
    plain.compile(
        optimizer=keras.optimizers.SGD(1e-3),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
        jit_compile=jit,
    )
    hmodel = harmonization.HarmonizedModel(model)
    hmodel.compile(optimizer=keras.optimizers.SGD(1e-3), jit_compile=jit)
    onehot = np.eye(NUM_CLASSES, dtype="float32")[batch["label"]]
    plain_step = lambda: plain.train_on_batch(batch["image"], onehot)  # noqa: E731
    harmonized_step = lambda: hmodel.train_on_batch(batch)  # noqa: E731
    # Alternate the two steps so that load from other processes hits both alike.
    times = {"plain": [], "harmonized": []}
    for round_ in range(warmup + steps):
        for key, step in (("plain", plain_step), ("harmonized", harmonized_step)):
            elapsed = timed(step)
            if round_ >= warmup:
                times[key].append(elapsed)
    t_plain, t_harm = (statistics.median(times[k]) for k in ("plain", "harmonized"))
    label = f"{name}{' (XLA)' if jit else ''}"
    print(
        f"{label:<22} {size:>4}px  batch {batch_size:<3} params {model.count_params():>11,}  "
        f"plain {t_plain * 1e3:9.1f} ms  harmonized {t_harm * 1e3:9.1f} ms  ratio {t_harm / t_plain:5.2f}",
        flush=True,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model and mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (tracing, allocation)")
    parser.add_argument("--jit", action="store_true", help="also time both steps with jit_compile=True")
    args = parser.parse_args(argv)
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPU cores")
    for name in args.models:
        for jit in (False, True) if args.jit else (False,):
            bench(name, args.batch_size, args.steps, args.warmup, jit)


if __name__ == "__main__":
    main()
