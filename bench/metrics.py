"""Benchmark: batched `harmonization.metrics.spearman` vs a per-map `scipy.stats.spearmanr` loop.

Both score the same pairs of 224x224 maps in the same run, round after round, so that both see the
same machine load: a saliency-like map (continuous, non-negative) against a human-like ClickMe map
(mostly exact zeros, one or two blobs). The TensorFlow inputs are already on the device (GPU if there
is one), as they are in an evaluation loop; each timed call includes fetching the (N,) result.

    python bench/metrics.py [--batch-size 64] [--rounds 5] [--size 224]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import tensorflow as tf  # noqa: E402

from harmonization import metrics  # noqa: E402


def make_maps(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return (saliency-like, human-like) float32 maps of shape (n, size, size)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size].astype(np.float32)
    human = np.zeros((n, size, size), np.float32)
    for i in range(n):
        for _ in range(rng.integers(1, 3)):
            r, c = rng.uniform(0.2, 0.8, 2) * size
            sigma = rng.uniform(0.04, 0.1) * size
            blob = np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * sigma**2))
            human[i] += np.where(blob > 0.05, blob, 0.0)
    saliency = np.abs(rng.normal(size=(n, size, size))).astype(np.float32) + 0.5 * human
    return saliency, human


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()

    saliency, human = make_maps(args.batch_size, args.size)
    gpus = tf.config.list_physical_devices("GPU")
    device = "/GPU:0" if gpus else "/CPU:0"
    with tf.device(device):
        saliency_t, human_t = tf.constant(saliency), tf.constant(human)
        batched = tf.function(metrics.spearman)
        ours = batched(saliency_t, human_t).numpy()  # trace and warm up

        def run_tf():
            return batched(saliency_t, human_t).numpy()

        def run_scipy():
            return np.array([stats.spearmanr(s.ravel(), h.ravel())[0] for s, h in zip(saliency, human)])

        reference = run_scipy()
        tf_seconds, scipy_seconds = [], []
        for _ in range(args.rounds):
            for run, seconds in ((run_tf, tf_seconds), (run_scipy, scipy_seconds)):
                start = time.perf_counter()
                run()
                seconds.append(time.perf_counter() - start)

    tf_rate = args.batch_size / statistics.median(tf_seconds)
    scipy_rate = args.batch_size / statistics.median(scipy_seconds)
    name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU") if gpus else "CPU"
    print(f"device: {name} ({device}), TensorFlow {tf.__version__}, intra-op threads: "
          f"{tf.config.threading.get_intra_op_parallelism_threads() or 'default'}")
    print(f"maps: {args.batch_size} pairs of {args.size}x{args.size}, human maps "
          f"{np.mean(human == 0):.0%} zeros; median of {args.rounds} interleaved rounds")
    print(f"max |ours - scipy| = {np.max(np.abs(ours - reference)):.2e}")
    print(f"harmonization.metrics.spearman (batched): {tf_rate:10.1f} maps/s")
    print(f"scipy.stats.spearmanr (per-map loop):     {scipy_rate:10.1f} maps/s")
    print(f"speed-up: {tf_rate / scipy_rate:.2f}x (target >= 20x)")


if __name__ == "__main__":
    main()
