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

    python bench/train_throughput.py --measure decodes   # only the two-worker count below (~30 s here)

And a count, not a time (so the machine's load does not matter):
  decodes     `harmonization train --strategy multiworker` on two local workers (TF_CONFIG on 127.0.0.1, one
              process each, the tests' quick dataset, augmented, batch 16, 100 steps): input images decoded by
              all workers per image trained on. The decode function (`data._Preprocessor.example`, the one every
              pipeline decodes with) is wrapped in each worker to count its calls. Before the input split each
              worker decoded the whole global batch (2 with two workers); now each decodes its rows (1). Reported
              over the steady state (from step 21 to the last, so that what the pipeline has prefetched ahead
              mostly cancels) and over the whole run (prefetched batches beyond the last step included).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
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


# ------------------------------------------------------------------ images decoded per trained image, two workers
DECODE_OVERRIDES = ["data.clickme=clickme_synthetic/quick", "data.augment=true", "batch_size=16", "steps_per_epoch=100",
                    "epochs=1", "checkpoint.every_steps=1000", *OVERRIDES]
#: The steady state starts after this step (the pipeline has filled its buffers) and ends at the last.
STEADY_FROM = 20


def _counting_decodes() -> list:
    """Wrap `data._Preprocessor.example`, the decode function of every pipeline, to count its calls; returns the
    one-item list holding the count (read it while tf.data's threads add to it)."""
    import tensorflow as tf

    from harmonization import data

    count, lock = [0], threading.Lock()
    original = data._Preprocessor.example

    def add(n):
        with lock:  # tf.data decodes on several threads
            count[0] += 1
        return n

    def example(self, example, seed):
        out = original(self, example, seed)
        done = tf.py_function(add, [seed], tf.int64)
        with tf.control_dependencies([done]):
            out["label"] = tf.identity(out["label"])
        return out

    data._Preprocessor.example = example
    return count


def decoding_worker(data_dir: str, out: str) -> dict:
    """One worker of the two (TF_CONFIG says which): train, and count the images it decoded after each step."""
    import keras

    import harmonization
    from harmonization import recipes

    count = _counting_decodes()

    class AfterEachStep(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.counts = []

        def on_train_batch_end(self, batch, logs=None):
            self.counts.append(count[0])

    after = AfterEachStep()
    recipe = recipes.load_recipe("quickstart", DECODE_OVERRIDES)
    result = harmonization.train(recipe, data_dir=data_dir, out=out, strategy="multiworker", callbacks=[after],
                                 verbose=0)
    return {"decoded_after_each_step": after.counts, "decoded": count[0], "steps": result.trained_steps,
            "batch_size": recipe["batch_size"]}


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for one in sockets:
        one.bind(("127.0.0.1", 0))
    ports = [one.getsockname()[1] for one in sockets]
    for one in sockets:
        one.close()
    return ports


def measure_decodes(data_dir: str, workers: int = 2) -> dict:
    """Train on `workers` local workers (fresh processes, as a cluster launches them); decodes per trained image."""
    run_child(__file__, "--child", "prepare_quick", "--data-dir", data_dir, what="building the quick dataset")
    addresses = [f"127.0.0.1:{port}" for port in _free_ports(workers)]
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as out:
        processes = []
        for index in range(workers):
            config = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
            env = {**os.environ, "PYTHONPATH": os.path.dirname(here), "TF_CONFIG": json.dumps(config)}
            processes.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--child", "decoding_worker", "--data-dir", data_dir,
                 "--out", os.path.join(out, "run")], cwd=here, env=env, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True))
        reports = []
        for index, process in enumerate(processes):
            stdout, stderr = process.communicate(timeout=900)
            if process.returncode:
                raise RuntimeError(f"worker {index} failed:\n{stderr[-3000:]}")
            reports.append(json.loads(stdout.strip().splitlines()[-1]))
    steps, batch = reports[0]["steps"], reports[0]["batch_size"]
    last = steps - 1
    steady = sum(r["decoded_after_each_step"][last] - r["decoded_after_each_step"][STEADY_FROM - 1] for r in reports)
    return {"workers": workers, "steps": steps, "batch_size": batch,
            "decoded_per_worker": [r["decoded"] for r in reports],
            "steady_decoded_per_trained_image": steady / ((last - STEADY_FROM + 1) * batch),
            "total_decoded_per_trained_image": sum(r["decoded"] for r in reports) / (steps * batch)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per measurement (the first is not timed)")
    parser.add_argument("--data-dir", default=None, help="TFDS data directory (default: a temporary one)")
    parser.add_argument("--measure", choices=("all", "speed", "decodes"), default="all",
                        help="speed: the images/s measurements; decodes: the two-worker decode count; all: both")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "decoding_worker":
        print(json.dumps(decoding_worker(args.data_dir, args.out)))
        return
    if args.child == "prepare_quick":
        from harmonization import quickstart

        quickstart.build_dataset("quick", args.data_dir)
        print(json.dumps({}))
        return
    if args.child:
        print(json.dumps(child(args.child, args.epochs, args.data_dir)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = args.data_dir or scratch
        if args.measure in ("all", "decodes"):
            _report_decodes(measure_decodes(data_dir))
        if args.measure == "decodes":
            return
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



def _report_decodes(result: dict) -> None:
    print(f"{result['workers']} local workers, quick dataset augmented, {result['steps']} steps of "
          f"{result['batch_size']} images: input images decoded per trained image, all workers together")
    print(f"  steady state (steps {STEADY_FROM + 1}..{result['steps']}): "
          f"{result['steady_decoded_per_trained_image']:.2f}")
    print(f"  whole run (prefetched batches included): {result['total_decoded_per_trained_image']:.2f}  "
          f"(decoded per worker: {result['decoded_per_worker']})")


if __name__ == "__main__":
    main()
