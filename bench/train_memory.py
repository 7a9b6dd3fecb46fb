"""Benchmark: peak memory of the harmonized training step against the plain step, each in a fresh process.

    python bench/train_memory.py                               # ResNet50V2, ViT-B/16, ConvNeXt-T at 224, batch 8
    python bench/train_memory.py --models tiny --batch-size 32

Double backprop keeps the forward pass's activations *and* the input-gradient pass's alive until the weight
gradient is taken, so the harmonized step needs more memory than the plain one. Each (model, step) runs in a
fresh process, so that nothing one leaves allocated counts against the other. On a CPU the process's
resident-memory high-water mark (`ru_maxrss`) is read after building and compiling the model (the "before"
point) and after the steps; the step's share is the difference (it includes tracing the step, which is small
next to 224px activations; measuring after a warm-up step does not work on a CPU: the allocator keeps what the
warm-up freed, so later steps add nothing to the resident set). On a GPU (when TensorFlow sees one)
`tf.config.experimental.get_memory_info("GPU:0")["peak"]`, reset after one warm-up step, is the peak of the
steps (weights and optimizer state included). Both models compile without XLA (`jit_compile=False`,
`HarmonizedModel`'s default), so XLA is not what is compared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from _child import run_child  # noqa: E402

MIB = 1024 * 1024
DEFAULT_MODELS = ["resnet50v2", "vit_b16", "convnext_tiny"]


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux




def child(name: str, mode: str, batch_size: int, steps: int) -> dict:
    """Build, compile, run `steps` steps of one kind; return the memory facts (in a fresh process)."""
    import keras
    import numpy as np
    import tensorflow as tf

    import harmonization
    from train_step import MODELS, NUM_CLASSES, make_batch  # the same models and batches as bench/train_step.py

    build, size = MODELS[name]
    keras.utils.set_random_seed(0)
    model = build(size)
    batch = make_batch(size, batch_size)
    if mode == "plain":
        model.compile(optimizer=keras.optimizers.SGD(1e-3),
                      loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
                      jit_compile=False)
        onehot = np.eye(NUM_CLASSES, dtype="float32")[batch["label"]]
        step = lambda: model.train_on_batch(batch["image"], onehot)  # noqa: E731
    else:
        trainer = harmonization.HarmonizedModel(model)
        trainer.compile(optimizer=keras.optimizers.SGD(1e-3))
        step = lambda: trainer.train_on_batch(batch)  # noqa: E731
    gpu = bool(tf.config.list_physical_devices("GPU"))
    before = _rss_peak_bytes()
    if gpu:
        step()  # warm-up: on a GPU, tracing and the optimizer's state are left out of the peak
        tf.config.experimental.reset_memory_stats("GPU:0")
    for _ in range(steps):
        step()
    facts = {"model": name, "mode": mode, "params": model.count_params(), "device": "GPU" if gpu else "CPU",
             "before_mib": before / MIB, "peak_mib": _rss_peak_bytes() / MIB}
    if gpu:
        facts["gpu_peak_mib"] = tf.config.experimental.get_memory_info("GPU:0")["peak"] / MIB
    return facts


def measure(name: str, mode: str, batch_size: int, steps: int) -> dict:
    return run_child(__file__, "--child", name, mode, "--batch-size", batch_size, "--steps", steps,
                     what=f"{name} {mode}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="steps per process (the first traces the step)")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.batch_size, args.steps)))
        return
    print(f"batch {args.batch_size}, {args.steps} steps per fresh process; MiB. 'peak': the process's high-water "
          "mark; '(step)': that minus the memory after building the model")
    print(f"{'model':<14} {'params':>12} {'plain peak':>11} {'(step)':>8} {'harm. peak':>11} {'(step)':>8} "
          f"{'peak ratio':>10} {'step ratio':>10}")
    for name in args.models:
        plain = measure(name, "plain", args.batch_size, args.steps)
        harmonized = measure(name, "harmonized", args.batch_size, args.steps)
        key = "gpu_peak_mib" if "gpu_peak_mib" in plain else None
        p_peak, h_peak = (plain[key], harmonized[key]) if key else (plain["peak_mib"], harmonized["peak_mib"])
        p_step = p_peak if key else p_peak - plain["before_mib"]
        h_step = h_peak if key else h_peak - harmonized["before_mib"]
        print(f"{name:<14} {plain['params']:>12,} {p_peak:>11.0f} {p_step:>8.0f} {h_peak:>11.0f} {h_step:>8.0f} "
              f"{h_peak / p_peak:>10.2f} {h_step / p_step:>10.2f}   ({plain['device']})", flush=True)


if __name__ == "__main__":
    main()
