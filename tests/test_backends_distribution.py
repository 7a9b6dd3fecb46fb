"""`keras.distribution.DataParallel` on JAX gives the one-device harmonized step on the global batch (issue 19, §5).

Two CPU devices stand in for two accelerators (`XLA_FLAGS=--xla_force_host_platform_device_count=2`, which JAX
reads once, when it starts: hence a child process, whatever backend the suite itself runs on). The child builds a
small CNN with a Rescaling layer and BatchNormalization, saves its initial weights to a .npz, and from those weights
fits `HarmonizedModel` for two SGD steps (16 examples, global batch 8, one token 0 in each batch) three ways in
one process:

* on one device (no distribution): the reference;
* under `DataParallel` over both devices: each device holds half of every batch, the variables are replicated and
  XLA's SPMD partitioner inserts the all-reduces; the step is the same code. Every variable, trainable and
  BatchNormalization's moving statistics, must equal the reference's;
* the negative control: the same two halves, each a separate one-device step from the same weights, the results
  averaged. With plain SGD that is exactly data parallelism with all-reduced gradients but per-replica
  BatchNormalization statistics (what `pmap` without a synchronised batch norm would do). Cross-entropy and the
  harmonization term are per-example means, so for equal halves they average to the global mean; the batch
  statistics do not (a global variance is the mean of the half variances plus the variance of the half means),
  and they reach every gradient, the input-gradient saliency and the moving variance. The same comparison must
  fail, which shows it can.

The child also records how the batches reached the step (the host check sees the arrays Keras distributed): two
devices, four examples each, so a pass cannot come from a distribution that silently ran on one device.

Multi-host is run too, as two processes on this machine joined by `keras.distribution.initialize` (one CPU device
each, JAX's CPU collectives between them), each fed only its own rows of every global batch: both must end with the
one-device run's variables. That is what the README documents, and what needed the JAX step to check each host's
rows rather than the global batch (which no host can read whole).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from backend_helpers import ROOT, run_on_backend

pytestmark = pytest.mark.backends

if importlib.util.find_spec("jax") is None:
    pytest.skip(
        "jax is not installed: keras.distribution.DataParallel is checked on the JAX backend (in a child process), "
        "and this environment has no jax to run it",
        allow_module_level=True,
    )

#: Per variable, max |DataParallel weight - one-device weight| must be at most RELATIVE times the largest change
#: the one-device run made to that variable over the two steps, plus ULPS float32 ulps of its largest value. The runs
#: differ only in float32 summation order (a batch sum split into two partial sums and an all-reduce,
#: BatchNormalization's moments likewise), a few ulps of each reduction, amplified a little by the second step. The
#: ulps term is there because the weights themselves are float32: a BatchNormalization gamma near 1 that moved by
#: 0.025 cannot agree to better than ~1e-5 of that move once each run has rounded it (measured here: the first
#: BatchNormalization's gamma and beta differ by 1-2 ulps of 1.0, 9e-6 and 8e-6 of their moves; every other variable
#: by under 2e-6 of its move). The negative control misses this by orders of
#: magnitude on every kind of variable, its moving variances included.
RELATIVE = 1e-5
ULPS = 4

#: Two SGD steps: the second one starts from state the distributed step wrote back (replicated weights, optimizer
#: iterations, moving statistics), so the sharding of the state is exercised as well as that of the batch.
GLOBAL_BATCH = 8
EXAMPLES = 16

# What every child runs first: the spec, the data, the model (from the saved weights), the batch recorder.
# KERAS_BACKEND=jax (and XLA_FLAGS where wanted) come from its environment.
PRELUDE = r"""
import json
import os

import numpy as np
import keras

spec = json.loads(os.environ["DISTRIBUTION_SPEC"])
if "process_id" in spec:  # a multi-host worker: Keras's initialize must come before anything else touches JAX
    keras.distribution.initialize(spec["coordinator"], spec["num_processes"], spec["process_id"])

import jax

import harmonization

data = {k: v for k, v in np.load(spec["batch"]).items()}
weights_file = spec["weights"]


def build():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((16, 16, 3)), keras.layers.Rescaling(1 / 127.5, offset=-1.0),
        keras.layers.Conv2D(6, 3, padding="same", use_bias=False), keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Conv2D(4, 3, strides=2, padding="same", use_bias=False), keras.layers.BatchNormalization(),
        keras.layers.ReLU(), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(5),
    ])
    if not os.path.exists(weights_file):
        np.savez(weights_file, **{f"w{i}": w for i, w in enumerate(model.get_weights())})
    stored = np.load(weights_file)
    model.set_weights([stored[f"w{i}"] for i in range(len(stored.files))])
    hmodel = harmonization.HarmonizedModel(model)
    hmodel.compile(optimizer=keras.optimizers.SGD(1.0))  # jit_compile: Keras's default on JAX (XLA)
    return model, hmodel


def weights(model):
    return [np.asarray(w, np.float64).tolist() for w in model.get_weights()]


def record_batches(hmodel, seen):
    # The host check runs on each batch exactly as the compiled step receives it: note how it is laid out.
    check = hmodel._checked_batch

    def recording(batch):
        images = batch[0]["image"] if isinstance(batch, tuple) else batch["image"]
        sharding = getattr(images, "sharding", None)
        seen.append({
            "shape": list(images.shape),
            "devices": len(sharding.device_set) if sharding is not None else 0,  # 0: a host (NumPy) array
            "shard": list(sharding.shard_shape(images.shape)) if sharding is not None else None,
        })
        return check(batch)

    hmodel._checked_batch = recording
"""

# The single-host child (two CPU devices from XLA_FLAGS): the three runs. Prints one JSON line.
CHILD = PRELUDE + r"""
result = {"devices": len(jax.devices())}

# 1. One device: the reference.
model, hmodel = build()
result["names"] = [w.path for w in model.weights]
result["initial"] = weights(model)
seen = []
record_batches(hmodel, seen)
hmodel.fit(data, batch_size=spec["global_batch"], epochs=1, shuffle=False, verbose=0)
result["one_device"] = {"weights": weights(model), "batches": seen}

# 2. The negative control: each half a separate one-device step from the same weights, the results averaged.
model, hmodel = build()
half = spec["global_batch"] // 2
for start in range(0, spec["examples"], spec["global_batch"]):
    before = model.get_weights()
    after = []
    for lo in (start, start + half):
        model.set_weights(before)
        hmodel.train_on_batch({k: v[lo:lo + half] for k, v in data.items()})
        after.append(model.get_weights())
    model.set_weights([(a + b) / 2 for a, b in zip(*after)])
result["per_replica"] = {"weights": weights(model)}

# 3. DataParallel over both devices, set before the model is built (so its variables are created replicated).
distribution = keras.distribution.DataParallel(devices=keras.distribution.list_devices("cpu"))
keras.distribution.set_distribution(distribution)
model, hmodel = build()
seen = []
record_batches(hmodel, seen)
hmodel.fit(data, batch_size=spec["global_batch"], epochs=1, shuffle=False, verbose=0)
result["data_parallel"] = {
    "weights": weights(model),
    "batches": seen,
    "variable_devices": sorted({len(v.value.sharding.device_set) for v in model.weights}),
}
print(json.dumps(result))
"""

# A multi-host worker (one CPU device per process): DataParallel over every process's devices, fed only this
# process's rows of each global batch (Keras assembles the global batch from the processes' parts in process order).
WORKER = PRELUDE + r"""
process, count = spec["process_id"], spec["num_processes"]
distribution = keras.distribution.DataParallel(devices=keras.distribution.list_devices(), auto_shard_dataset=False)
keras.distribution.set_distribution(distribution)
model, hmodel = build()
part = spec["global_batch"] // count
rows = np.concatenate([np.arange(start + process * part, start + (process + 1) * part)
                       for start in range(0, spec["examples"], spec["global_batch"])])
seen = []
record_batches(hmodel, seen)
hmodel.fit({k: v[rows] for k, v in data.items()}, batch_size=part, epochs=1, shuffle=False, verbose=0)
print(json.dumps({"weights": weights(model), "batches": seen, "devices": len(jax.devices()),
                  "local_devices": len(jax.local_devices())}))
"""


def _data(path):
    """16 raw images (0..255: the model's Rescaling layer scales them), maps, labels and tokens with one 0 token per
    global batch, so that a token-weighted mean over the wrong examples would show."""
    rng = np.random.default_rng(7)
    np.savez(
        path,
        image=(rng.random((EXAMPLES, 16, 16, 3)) * 255).astype("float32"),
        heatmap=rng.random((EXAMPLES, 16, 16)).astype("float32"),
        label=rng.integers(0, 5, EXAMPLES),
        token=np.array([1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1], "float32"),
    )


def _ratios(run, reference, initial, names) -> dict[str, float]:
    """Per variable: max |run - reference| over what the tolerance allows (see RELATIVE); <= 1 passes."""
    ratios = {}
    for name, got, want, start in zip(names, run, reference, initial):
        got, want, start = (np.asarray(a, np.float64) for a in (got, want, start))
        moved = np.max(np.abs(want - start))
        assert moved > 0, f"{name} did not change in the one-device run: the comparison would be empty"
        allowed = RELATIVE * moved + ULPS * np.finfo(np.float32).eps * np.max(np.abs(want))
        ratios[name] = float(np.max(np.abs(got - want)) / allowed)
    return ratios


def _worst(ratios: dict[str, float]) -> str:
    name = max(ratios, key=ratios.get)
    return f"{name}: {ratios[name]:.3g} times the tolerance"


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    """The children's common spec: where the data and the initial weights are, and the batch sizes."""
    folder = tmp_path_factory.mktemp("distribution")
    _data(folder / "batch.npz")
    return {"batch": str(folder / "batch.npz"), "weights": str(folder / "weights.npz"),
            "global_batch": GLOBAL_BATCH, "examples": EXAMPLES}


@pytest.fixture(scope="module")
def runs(spec):
    """The child's three runs (one device, per-replica control, DataParallel), computed once for the module; the
    child also writes the initial weights that the multi-host workers load."""
    return run_on_backend(
        "jax", CHILD, timeout=300,
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "DISTRIBUTION_SPEC": json.dumps(spec)},
    )


def _free_port() -> int:
    """A TCP port free on this machine now, for the JAX coordinator of the two workers."""
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def workers(spec, runs):
    """Two JAX processes on this machine as two hosts (`keras.distribution.initialize`), each with one CPU device and
    fed its own rows of every global batch; their JSON results in process order. `runs` first: it writes the weights.
    """
    coordinator = f"localhost:{_free_port()}"
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("XLA_FLAGS", None)  # one device per process: the two devices are the two processes'
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
            env={**env, "DISTRIBUTION_SPEC": json.dumps(
                {**spec, "coordinator": coordinator, "num_processes": 2, "process_id": process})},
        )
        for process in range(2)
    ]
    results = []
    try:
        for process, child in enumerate(processes):
            out, err = child.communicate(timeout=300)
            assert child.returncode == 0, f"worker {process} failed ({child.returncode}):\n{err[-4000:]}"
            results.append(json.loads([line for line in out.splitlines() if line.strip()][-1]))
    finally:
        for child in processes:  # a worker left waiting for its peer must not outlive the test
            if child.poll() is None:
                child.kill()
                child.communicate()
    return results


def test_data_parallel_really_splits_the_batch(runs):
    """Two devices, each batch arriving as two shards of four, the variables replicated on both: otherwise the
    equality below could come from a distribution that quietly ran everything on one device."""
    assert runs["devices"] == 2
    image = [16, 16, 3]
    assert [b["shape"] for b in runs["one_device"]["batches"]] == [[GLOBAL_BATCH, *image]] * 2
    assert all(b["devices"] <= 1 for b in runs["one_device"]["batches"])
    assert runs["data_parallel"]["batches"] == [
        {"shape": [GLOBAL_BATCH, *image], "devices": 2, "shard": [GLOBAL_BATCH // 2, *image]}
    ] * 2
    assert runs["data_parallel"]["variable_devices"] == [2]


def test_data_parallel_equals_one_device_on_the_global_batch(runs):
    """Every variable after two steps, BatchNormalization's moving mean and variance included: the sharded step
    normalises with the statistics of the global batch, as the one-device step does."""
    names = runs["names"]
    assert any("moving_variance" in n for n in names) and any("moving_mean" in n for n in names)
    ratios = _ratios(runs["data_parallel"]["weights"], runs["one_device"]["weights"], runs["initial"], names)
    assert max(ratios.values()) <= 1, f"DataParallel differs from one device; worst {_worst(ratios)}"


def test_multi_host_data_parallel_equals_one_device(runs, workers):
    """Two processes as two hosts (`keras.distribution.initialize`, DataParallel over both, each fed its own rows)
    end with the one-device run's variables on both hosts. Each host checked only the rows it fed (four per step):
    NumPy cannot read the rows another host holds, which is why the JAX step checks each host's part."""
    for process, worker in enumerate(workers):
        assert (worker["devices"], worker["local_devices"]) == (2, 1)
        assert [b["shape"] for b in worker["batches"]] == [[GLOBAL_BATCH // 2, 16, 16, 3]] * 2
        ratios = _ratios(worker["weights"], runs["one_device"]["weights"], runs["initial"], runs["names"])
        assert max(ratios.values()) <= 1, f"host {process} differs from one device; worst {_worst(ratios)}"


def test_per_replica_statistics_fail_the_same_comparison(runs):
    """The negative control: halves stepped separately and averaged differ far beyond the tolerance (through
    BatchNormalization's per-half statistics), so the comparison above can fail; the moving variances alone fail
    it too, so the check of the moving statistics is not carried by the other variables."""
    ratios = _ratios(runs["per_replica"]["weights"], runs["one_device"]["weights"], runs["initial"], runs["names"])
    assert max(ratios.values()) > 100, f"the per-replica control is too close to one device; worst {_worst(ratios)}"
    variances = {n: r for n, r in ratios.items() if "moving_variance" in n}
    assert len(variances) == 2 and min(variances.values()) > 1, variances
