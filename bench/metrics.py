"""Benchmark: `harmonization.metrics.spearman` vs a per-map `scipy.stats.spearmanr` loop, time and memory.

Both score the same pairs of 224x224 maps in the same run, round after round, so that both see the
same machine load: a saliency-like map (continuous, non-negative) against a human-like ClickMe map
(mostly exact zeros, one or two blobs). The TensorFlow inputs are already on the device (GPU if there
is one), as they are in an evaluation loop; each timed call includes fetching the (N,) result.

Reported, in one run:

1. time of one call on N maps (default 512) for ours executed eagerly (the NumPy path on a CPU-only
   machine, the TensorFlow path with a GPU), ours inside `tf.function` (always the TensorFlow path),
   and the scipy loop; with scipy_time / ours_time for both of ours;
2. the peak memory of one call on the same N maps, each measured in a fresh subprocess: the process's
   RSS high-water mark (Linux's VmHWM, reset just before the call; `resource.getrusage` elsewhere)
   minus its RSS once the inputs exist (after a warm-up call
   on 2 maps, so that TensorFlow's start-up is not counted), in MiB and as a multiple of the bytes of
   both inputs together.

    python bench/metrics.py [--batch-size 512] [--rounds 3] [--size 224]
    python bench/metrics.py --quick     # smoke run: a few small maps, one round

This is the TensorFlow bench. The JAX and PyTorch paths for maps already on a GPU (`harmonization._spearman_device`)
are measured against the same scipy loop on the same maps (bench/_maps.py) by bench/gpu/run.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import scipy
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from _child import run_child  # noqa: E402  (this folder is on sys.path when run as a script)
from _maps import make_maps  # noqa: E402  (shared with bench/gpu/run.py, which runs without TensorFlow)

import tensorflow as tf  # noqa: E402

from harmonization import metrics  # noqa: E402

#: What a memory subprocess measures: one call of each, on the bench's maps.
MEMORY_CASES = {
    "spearman-eager-numpy": "spearman, eager, NumPy array inputs",
    "spearman-eager-tensor": "spearman, eager, tensor inputs",
    "spearman-tf-function": "spearman, inside tf.function",
    "dice-eager-numpy": "dice, eager, NumPy array inputs",
}


def _rss_mib() -> float:
    """The process's resident set size now, in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _high_water_mib() -> float:
    """The process's RSS high-water mark, in MiB.

    Linux's `VmHWM` (what `/proc/self/clear_refs` resets) where there is one: `getrusage`'s `ru_maxrss`
    also keeps the high-water mark of threads that have exited, which a reset cannot lower.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def memory_child(case: str, n: int, size: int) -> dict:
    """Measure one call of `case` on n maps in this (fresh) process; return the figures."""
    saliency, human = make_maps(n, size)
    input_mib = (saliency.nbytes + human.nbytes) / 2**20
    if case == "spearman-eager-numpy":
        call, inputs = metrics.spearman, (saliency, human)
    elif case == "spearman-eager-tensor":
        call, inputs = metrics.spearman, (tf.constant(saliency), tf.constant(human))
        del saliency, human  # what is held is the tensors
    elif case == "spearman-tf-function":
        call = tf.function(metrics.spearman)
        inputs = (tf.constant(saliency), tf.constant(human))
        del saliency, human
        call.get_concrete_function(*inputs)  # trace now: the measured call only runs the graph
    elif case == "dice-eager-numpy":
        call, inputs = metrics.dice, (saliency, human)
    else:
        raise ValueError(f"unknown memory case {case!r}")
    call(*(x[:2] for x in inputs)).numpy()  # start-up (kernels, thread pools) is not the call's memory
    gc.collect()
    try:  # Linux >= 4.0: reset the high-water mark to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    baseline = _rss_mib()
    start = time.perf_counter()
    call(*inputs).numpy()
    seconds = time.perf_counter() - start
    peak = max(_high_water_mib(), baseline)
    return {
        "case": case,
        "input_mib": input_mib,
        "baseline_mib": baseline,
        "peak_mib": peak,
        "delta_mib": peak - baseline,
        "multiple": (peak - baseline) / input_mib,
        "high_water_reset": reset,
        "getrusage_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seconds": seconds,
    }


def measure_memory(case: str, n: int, size: int) -> dict:
    """Run `memory_child(case, ...)` in a fresh Python process and return its figures."""
    return run_child(__file__, "--memory-child", case, "--batch-size", n, "--size", size,
                     what=f"memory subprocess for {case}", env={"TF_CPP_MIN_LOG_LEVEL": "2"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=512, help="maps per call (default 512)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    parser.add_argument("--size", type=int, default=224, help="map side in pixels (default 224)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 maps of 32x32, one round")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--memory-child", choices=sorted(MEMORY_CASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.batch_size, args.size)))
        return
    if args.quick:
        args.batch_size, args.size, args.rounds = 8, 32, 1

    saliency, human = make_maps(args.batch_size, args.size)
    gpus = tf.config.list_physical_devices("GPU")
    device = "/GPU:0" if gpus else "/CPU:0"
    with tf.device(device):
        saliency_t, human_t = tf.constant(saliency), tf.constant(human)
        eager_path = "NumPy" if metrics._numpy_path_applies(saliency_t) else "TensorFlow"
        in_graph = tf.function(metrics.spearman)
        runs = {
            f"ours, eager ({eager_path} path)": lambda: metrics.spearman(saliency_t, human_t).numpy(),
            "ours, inside tf.function (TensorFlow path)": lambda: in_graph(saliency_t, human_t).numpy(),
            "scipy.stats.spearmanr, per-map loop": lambda: np.array(
                [stats.spearmanr(s.ravel(), h.ravel())[0] for s, h in zip(saliency, human)]
            ),
        }
        results = {name: run() for name, run in runs.items()}  # warm up (and trace)
        seconds = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)

    (eager_name, eager), (graph_name, graph), (scipy_name, reference) = results.items()
    median = {name: statistics.median(times) for name, times in seconds.items()}
    device_name = "CPU"
    if gpus:
        device_name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
    input_mib = (saliency.nbytes + human.nbytes) / 2**20
    print(f"device: {device_name} ({device}), {os.cpu_count()} CPUs, TensorFlow {tf.__version__}, "
          f"NumPy {np.__version__}, SciPy {scipy.__version__}")
    print(f"maps: {args.batch_size} pairs of {args.size}x{args.size} float32 ({input_mib:.1f} MiB for both), "
          f"human maps {np.mean(human == 0):.0%} zeros")
    print(f"agreement: max |ours - scipy| = {np.max(np.abs(eager - reference)):.2e}; eager and tf.function "
          f"results identical: {np.array_equal(eager, graph)}")
    print()
    print(f"(1) time of one spearman call on {args.batch_size} maps, "
          f"median of {args.rounds} interleaved rounds")
    print(f"    {'':44s} {'seconds':>9s} {'maps/s':>9s} {'scipy_time/ours':>16s}")
    for label in (eager_name, graph_name, scipy_name):
        ratio = "" if label == scipy_name else f"{median[scipy_name] / median[label]:15.2f}x"
        print(f"    {label:44s} {median[label]:9.3f} {args.batch_size / median[label]:9.1f} {ratio:>16s}")
    print(f"    SPEED eager: {median[scipy_name] / median[eager_name]:.2f}x scipy; "
          f"tf.function: {median[scipy_name] / median[graph_name]:.2f}x scipy")

    if args.no_memory:
        return
    print()
    print(f"(2) peak memory of one call on {args.batch_size} maps, each in a fresh subprocess: "
          "RSS high-water minus RSS after allocating the inputs")
    print(f"    {'':44s} {'peak MiB':>9s} {'x input':>9s} {'(input MiB)':>12s}")
    for case, label in MEMORY_CASES.items():
        figures = measure_memory(case, args.batch_size, args.size)
        note = "" if figures["high_water_reset"] else "  (high-water mark not resettable: upper bound)"
        print(f"    {label:44s} {figures['delta_mib']:+9.1f} {figures['multiple']:8.2f}x "
              f"{figures['input_mib']:12.1f}{note}")
        if case == "spearman-eager-numpy":
            headline = figures
    print(f"    MEMORY spearman (eager, NumPy inputs): +{headline['delta_mib']:.0f} MiB = "
          f"{headline['multiple']:.2f}x the input (target <= 4x)")


if __name__ == "__main__":
    main()
