"""Benchmark: images/s of `harmonization train` (quickstart recipe) against a plain `fit` of the same model on the
same data, and of the input pipeline alone: the end-to-end ratio a user feels, input included.

    python bench/train_throughput.py                 # the quickstart recipe's data (3,000 images, 64x64)
    python bench/train_throughput.py --epochs 4 --data-dir /tmp/tfds

Each measurement runs in a fresh process, one after the other:
  pipeline    iterating the recipe's epoch batches (decode, shuffle, batch, heatmaps) without training;
  plain fit   the quickstart CNN, cross-entropy only, Keras `fit` on the same batches (image, one-hot label);
  train       `harmonization.train("quickstart")`: the harmonized step, checkpoints every 20 steps and at
              each epoch's end, history and TensorBoard logs; with deterministic ops off, then on (the recipe's
              default, which makes a resumed run bit-identical).
The first epoch (tracing, dataset build) is not timed; validation and the final evaluation are off in all.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from _child import run_child  # noqa: E402
HERE = os.path.dirname(os.path.abspath(__file__))
OVERRIDES = ["evaluation.each_epoch=false", "evaluation.final=false"]


def _recipe(epochs: int, deterministic: bool):
    from harmonization import recipes

    recipe = recipes.load_recipe("quickstart", [*OVERRIDES, f"deterministic={str(deterministic).lower()}"])
    return recipes.with_settings(recipe, epochs=epochs)


def _epoch_timer():
    """A Keras callback that records each epoch's seconds and steps (Keras is imported in the child only)."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds, self.steps = [], []

        def on_epoch_begin(self, epoch, logs=None):
            self.start, self.count = time.perf_counter(), 0

        def on_train_batch_end(self, batch, logs=None):
            self.count += 1

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.start)
            self.steps.append(self.count)

    return EpochTimer()


def child(kind: str, epochs: int, data_dir: str) -> dict:
    import keras
    import tensorflow as tf

    import harmonization
    from harmonization import trainer
    from harmonization.quickstart import quickstart_model

    recipe = _recipe(epochs, deterministic=kind == "train_deterministic")
    batch = recipe["batch_size"]
    data = trainer._open_data(recipe, data_dir, None, download=True)
    steps = trainer._steps_per_epoch(recipe, data)
    if kind == "pipeline":
        rates = []
        for epoch in range(epochs):
            start = time.perf_counter()
            for _ in trainer._epoch_batches(recipe, data, data_dir, None, epoch, 0, steps).take(steps):
                pass
            rates.append(steps * batch / (time.perf_counter() - start))
        return {"kind": kind, "images_per_s": sum(rates[1:]) / len(rates[1:])}
    timer = _epoch_timer()
    if kind == "plain_fit":
        keras.utils.set_random_seed(recipe["seed"])
        model = quickstart_model(data.num_classes, recipe["data"]["image_size"], recipe["seed"])
        model.compile(optimizer=keras.optimizers.Adam(recipe["optimizer"]["learning_rate"]),
                      loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
                      metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
                      jit_compile=False)  # as HarmonizedModel compiles by default: XLA is not what is compared
        for epoch in range(epochs):
            batches = trainer._epoch_batches(recipe, data, data_dir, None, epoch, 0, steps).map(
                lambda b: (b["image"], tf.one_hot(b["label"], data.num_classes)))
            model.fit(batches.prefetch(tf.data.AUTOTUNE), epochs=epoch + 1, initial_epoch=epoch,
                      steps_per_epoch=steps, callbacks=[timer], verbose=0, shuffle=False)
    else:
        with tempfile.TemporaryDirectory() as out:
            harmonization.train(recipe, data_dir=data_dir, out=os.path.join(out, "run"), callbacks=[timer],
                                verbose=0)
    seconds = timer.seconds[1:]
    return {"kind": kind, "images_per_s": sum(timer.steps[1:]) * batch / sum(seconds)}


def measure(kind: str, epochs: int, data_dir: str) -> dict:
    return run_child(__file__, "--child", kind, "--epochs", epochs, "--data-dir", data_dir, what=kind)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per measurement (the first is not timed)")
    parser.add_argument("--data-dir", default=None, help="TFDS data directory (default: a temporary one)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.epochs, args.data_dir)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = args.data_dir or scratch
        rates = {kind: measure(kind, args.epochs, data_dir)["images_per_s"]
                 for kind in ("pipeline", "plain_fit", "train", "train_deterministic")}
    print(f"quickstart recipe (64x64, batch 64), {args.epochs - 1} timed epochs each; images/s")
    for kind, rate in rates.items():
        print(f"  {kind:<20} {rate:9.0f}")
    print(f"harmonization train / plain fit:                {rates['plain_fit'] / rates['train']:.2f}x the time")
    print(f"harmonization train (deterministic) / plain fit: {rates['plain_fit'] / rates['train_deterministic']:.2f}x"
          " the time")
    print(f"input pipeline / harmonized training:           {rates['pipeline'] / rates['train']:.1f}x faster "
          "(input is not the bottleneck when > 1)")


if __name__ == "__main__":
    main()
