"""The GPU check of issue 20 (sections 1 and 4), in one run that fits a short lease of a GPU machine.

    python3 bench/gpu/run.py --out OUT                           # on the GPU machine (see bench/gpu/README.md)
    python3 bench/gpu/run.py --out OUT --tiny --device cpu       # tiny models on the CPU: what the test runs

What it measures, for ResNet50V2, ViT-B/16 and ConvNeXt-T at 224 px, batch 64 (halved until it fits), in float32
and `mixed_bfloat16`, on JAX and on PyTorch (each measurement in its own child process: Keras picks its backend
once per process, and a fresh process starts with no memory held and JAX's peak-memory counter at zero):

1. **The GPU path is right**: one harmonized step (`HarmonizedModel`, SGD) on the GPU and the same step on the
   CPU, float32 with TF32 off, from the same weights on the same batch: the loss, the updated weights and the
   update itself agree to float noise (relative differences reported).
2. **Speed**: harmonized and plain cross-entropy step (the same model compiled with Keras's own step, as in
   bench/train_step.py), medians of alternated steps after warm-up; images/s; peak GPU memory of each step.
3. **Model FLOP utilisation**: the step's FLOPs over its median time against the chip's dense peak (`PEAKS`).
   FLOPs come from XLA's cost analysis of the lowered step on JAX (every operation, elementwise ones included)
   and from `torch.utils.flop_counter` on PyTorch (matrix products and convolutions only); the JSON says which.
   float32 is timed with TF32 matrix units allowed (`--fp32-matmul tf32`, JAX's default on a GPU) and its MFU is
   against the TF32 peak; `--fp32-matmul highest` times true float32 against the float32 peak.
4. **Spearman on the accelerator** (section 4): `harmonization.metrics.spearman` of 512 pairs of 224x224 maps
   already on the GPU (the device path) vs a per-map `scipy.stats.spearmanr` loop on the host, as bench/metrics.py:
   equal results (max |difference|), and the speed ratio (goal >= 20x).

Everything runs under a hard time budget (`--budget-s`): a measurement that cannot start in time is recorded as
skipped, one still running at the end is stopped and keeps what it had measured. The parent writes `results.json`,
`table.md` (also printed) and `log.txt` under `--out`, and prints its progress as it goes. The parent imports
neither Keras nor a backend; the children import Keras after choosing the backend, and never TensorFlow (the GPU
machine has none: it is made unimportable in them, so a CPU run here behaves as there).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
ROOT = BENCH.parent
for _path in (str(ROOT), str(BENCH)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

# bench/train_step.py's helpers import no backend at module level (nor does bench/_maps.py).
import train_step  # noqa: E402

SCHEMA = 1
BACKENDS = ("jax", "torch")
POLICIES = ("mixed_bfloat16", "float32")
MODELS = ("vit_b16", "resnet50v2", "convnext_tiny")
#: Tiny versions of the three architectures, for `--tiny` (the CPU test): the same code, seconds to build.
TINY_MODELS = {
    "vit_b16": dict(patch_size=8, hidden_size=8, num_layers=1, num_heads=2, mlp_dim=16),
    "resnet50v2": dict(stack_blocks=[1, 1, 1, 1], stack_filters=[2, 2, 4, 4], stem_filters=4),
    "convnext_tiny": dict(depths=[1, 1, 1, 1], widths=[4, 4, 8, 8]),
}
ARCHITECTURES = {"vit_b16": "ViT", "resnet50v2": "ResNetV2", "convnext_tiny": "ConvNeXt"}
TINY_SIZE = 32
#: The check turns off what draws random numbers: a GPU and a CPU draw different dropout masks (PyTorch).
DETERMINISTIC = {"vit_b16": {"dropout_rate": 0.0}, "convnext_tiny": {"drop_connect_rate": 0.0}}

#: Dense (no structured sparsity) peak FLOP/s by chip, from NVIDIA's datasheets: "NVIDIA H100 Tensor Core GPU"
#: (SXM5: FP32 67, TF32 989 and BF16 1,979 TFLOPS with sparsity; PCIe: 51, 756, 1,513; NVL: 60, 835, 1,671) and
#: "NVIDIA H200 Tensor Core GPU" (SXM: 67, 989, 1,979; NVL: 60, 835, 1,671). Tensor-core figures are halved: the
#: datasheets give them with 2:4 sparsity, which dense training does not use.
PEAKS = {
    "H100 SXM": {"float32": 67e12, "tf32": 494.5e12, "bfloat16": 989.5e12},
    "H100 PCIe": {"float32": 51e12, "tf32": 378e12, "bfloat16": 756.5e12},
    "H100 NVL": {"float32": 60e12, "tf32": 417.5e12, "bfloat16": 835.5e12},
    "H200 SXM": {"float32": 67e12, "tf32": 494.5e12, "bfloat16": 989.5e12},
    "H200 NVL": {"float32": 60e12, "tf32": 417.5e12, "bfloat16": 835.5e12},
}
PEAK_SOURCE = "NVIDIA H100 / H200 Tensor Core GPU datasheets, dense (sparsity figures halved)"

#: The check passes when the GPU step is within these relative differences of the CPU step (float32 noise through
#: a forward pass and a double backward pass; a wrong GPU path is off by orders of magnitude more).
CHECK_TOLERANCE = {"loss_rel": 1e-4, "weights_max_rel": 1e-4, "update_rel_l2": 1e-3}
RESULT_PREFIX = "result: "
PROGRESS_PREFIX = "progress: "


# ============================================================================= peaks
def chip_of(device_name: str) -> str | None:
    """The `PEAKS` key for a device name as JAX or PyTorch report it (e.g. "NVIDIA H100 80GB HBM3"), else None."""
    name = device_name.upper()
    for chip in ("H200", "H100"):
        if chip in name:
            if "NVL" in name:
                return f"{chip} NVL"
            if "PCIE" in name:
                return f"{chip} PCIe"
            return f"{chip} SXM"
    return None


def peak_flops(device_name: str, policy: str, fp32_matmul: str) -> tuple[float | None, str]:
    """(peak FLOP/s, what it is) for the step's arithmetic on this device; None on an unknown device (or a CPU)."""
    chip = chip_of(device_name)
    if chip is None:
        return None, f"no peak known for {device_name!r}: no MFU"
    unit = "bfloat16" if policy == "mixed_bfloat16" else ("tf32" if fp32_matmul == "tf32" else "float32")
    return PEAKS[chip][unit], f"{chip} dense {unit} {PEAKS[chip][unit] / 1e12:g} TFLOP/s ({PEAK_SOURCE})"


# ============================================================================= the child (one backend)
def emit(prefix: str, value: Any) -> None:
    print(prefix + (value if isinstance(value, str) else json.dumps(value)), flush=True)


def is_oom(error: BaseException) -> bool:
    """Whether `error` is the backend running out of device memory (PyTorch's OutOfMemoryError, XLA's
    RESOURCE_EXHAUSTED)."""
    text = f"{type(error).__name__} {error}"
    return "OutOfMemory" in text or "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def release_memory(backend: str) -> None:
    """Give back what a failed attempt left allocated, before a smaller batch is tried."""
    import gc

    gc.collect()
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    else:
        import jax

        jax.clear_caches()


def set_fp32_matmul(backend: str, mode: str) -> None:
    """float32 matrix products with TF32 units ("tf32") or in full float32 ("highest"), on both backends alike.

    Set before any computation is traced (JAX reads it at trace time).
    """
    if backend == "jax":
        import jax

        jax.config.update("jax_default_matmul_precision", "tensorfloat32" if mode == "tf32" else "highest")
        return
    import torch

    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    torch.backends.cudnn.allow_tf32 = mode == "tf32"


def accelerator_name(backend: str, device: str) -> str | None:
    """The accelerator the child measures on ("NVIDIA H100 80GB HBM3"), None when it measures on the CPU.

    With `--device gpu` a missing GPU is an error: a CPU figure must never pass for a GPU one.
    """
    if backend == "jax":
        import jax

        first = jax.devices()[0]
        found = None if first.platform == "cpu" else first.device_kind
    else:
        import torch

        found = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if device == "gpu" and found is None:
        raise RuntimeError(f"--device gpu: {backend} sees no GPU (run with --device cpu to measure on the CPU)")
    return found


def build_model(name: str, tiny: bool, **overrides):
    """One of the measured architectures (1000 classes, images in [0, 255]); tiny widths and 32 px with `tiny`."""
    from harmonization import architectures

    cls = getattr(architectures, ARCHITECTURES[name])
    if tiny:
        return cls(image_size=TINY_SIZE, **TINY_MODELS[name], **overrides)
    return cls(image_size=224, **overrides)


class MemoryMeter:
    """Peak device memory of what runs between `start()` and `stop()`, in bytes; None on a CPU.

    PyTorch resets its peak counter at `start()`. JAX has no reset: its peak is the process's since it began, so
    the child measures the plain step first, then the harmonized step, and the second reading is the harmonized
    step's peak only when it is higher (`cumulative` says so in the JSON).
    """

    def __init__(self, backend: str):
        self.backend = backend
        self.cumulative = backend == "jax"

    def _stats(self) -> tuple[int, int] | None:
        """(bytes in use now, peak bytes) on the first accelerator, None without one."""
        if self.backend == "torch":
            import torch

            if not torch.cuda.is_available():
                return None
            return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
        import jax

        stats = jax.devices()[0].memory_stats()
        if not stats or "peak_bytes_in_use" not in stats:
            return None
        return stats["bytes_in_use"], stats["peak_bytes_in_use"]

    def start(self) -> int | None:
        """Reset the peak where the backend can; return the bytes in use now (what the step starts from)."""
        if self.backend == "torch":
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
        stats = self._stats()
        return None if stats is None else stats[0]

    def stop(self) -> int | None:
        if self.backend == "torch":
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
        stats = self._stats()
        return None if stats is None else stats[1]


class _WholeProgramOnly:
    """Stands in for `FlopCounterMode`'s module tracker, which counts per module with hooks on every nn.Module: on
    Keras's PyTorch layers (nn.Modules) those hooks break the `autograd.grad` of the harmonized step, and only the
    total is wanted."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return None


def count_flops(backend: str, model, data, step: Callable[[], Any]) -> tuple[float, str]:
    """(FLOPs of one training step, how they were counted).

    JAX: XLA's cost analysis of `model.train_step` lowered for this state and batch (not compiled again), which
    counts every operation, elementwise ones included. PyTorch: `torch.utils.flop_counter` around one more step
    (`step`), which counts matrix products, convolutions and attention, forward and backward.
    """
    if backend == "jax":
        import jax

        state = model._get_jax_state(
            trainable_variables=True, non_trainable_variables=True, optimizer_variables=True, metrics_variables=True
        )
        lowered = jax.jit(model.train_step).lower(state, data)
        try:
            analysis, how = lowered.cost_analysis(), "lowered"
        except Exception:  # a backend without cost analysis before compilation: compile once more (slow)
            analysis, how = lowered.compile().cost_analysis(), "compiled"
        if isinstance(analysis, (list, tuple)):
            analysis = analysis[0]
        return float(analysis["flops"]), f"XLA cost analysis of the {how} train_step (all operations)"
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _WholeProgramOnly()
    with counter:
        step()
    return float(counter.get_total_flops()), "torch.utils.flop_counter (matmuls, convolutions, attention)"


def onehot_of(labels):
    import numpy as np

    return np.eye(train_step.NUM_CLASSES, dtype="float32")[labels]


def compiled_steps(model, batch: dict, learning_rate: float):
    """(plain model, harmonized model, plain step, harmonized step) on `model` and one batch.

    The plain step is a clone of the model compiled with cross-entropy (label smoothing 0.1, Keras's own step);
    the harmonized step is `HarmonizedModel` on the model itself; both SGD, both Keras's defaults otherwise (XLA
    on JAX, eager on PyTorch), as bench/train_step.py measures them.
    """
    import keras

    import harmonization

    plain = keras.models.clone_model(model)
    plain.compile(
        optimizer=keras.optimizers.SGD(learning_rate),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
    )
    harmonized = harmonization.HarmonizedModel(model)
    harmonized.compile(optimizer=keras.optimizers.SGD(learning_rate))
    onehot = onehot_of(batch["label"])
    return (
        plain,
        harmonized,
        lambda: plain.train_on_batch(batch["image"], onehot),
        lambda: harmonized.train_on_batch(batch),
    )


def measure_step(args, backend: str, name: str, policy: str, batch_size: int, peak: float | None,
                 publish: Callable[[dict], None]) -> dict:
    """Warm up, measure memory, time alternated steps, count FLOPs: one model, one policy, one batch size."""
    import keras

    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
    model = build_model(name, args.tiny)
    size = int(model.input_shape[1])
    batch = train_step.make_batch(size, batch_size)
    plain, harmonized, plain_step, harmonized_step = compiled_steps(model, batch, 1e-3)
    sync = train_step.device_sync(backend)
    row = {"image_size": size, "batch_size": batch_size, "params": int(model.count_params())}
    meter = MemoryMeter(backend)
    # The plain step first, alone: on JAX its reading is then the plain step's peak (see MemoryMeter).
    for key, step in (("plain", plain_step), ("harmonized", harmonized_step)):
        start = time.perf_counter()
        for _ in range(args.warmup):
            train_step.timed(step, sync)
        row[f"{key}_warmup_s"] = time.perf_counter() - start
        row[f"{key}_resident_bytes"] = meter.start()
        train_step.timed(step, sync)
        row[f"{key}_peak_bytes"] = meter.stop()
        emit(PROGRESS_PREFIX, f"{name} {policy} batch {batch_size}: {key} warm ({row[f'{key}_warmup_s']:.1f} s)")
    row["memory_note"] = ("process peak since start (JAX cannot reset it): the harmonized figure is its step's "
                          "only where it exceeds the plain one" if meter.cumulative
                          else "peak allocated during one step, counter reset before it")
    publish(row)
    times = {"plain": [], "harmonized": []}
    for round_ in range(args.steps):
        if round_ >= 3 and time.time() > args.soft_deadline:
            row["steps_cut_short"] = f"{round_} of {args.steps} rounds: its time was running out"
            break
        for key, step in (("plain", plain_step), ("harmonized", harmonized_step)):
            times[key].append(train_step.timed(step, sync))
    for key in times:
        row[f"{key}_times_s"] = times[key]
        row[f"{key}_s"] = statistics.median(times[key])
        row[f"{key}_images_per_s"] = batch_size / row[f"{key}_s"]
    row["ratio"] = row["harmonized_s"] / row["plain_s"]
    publish(row)
    emit(PROGRESS_PREFIX, f"{name} {policy} batch {batch_size}: ratio {row['ratio']:.2f}")
    onehot = onehot_of(batch["label"])
    for key, hmodel, data, step in (("plain", plain, (batch["image"], onehot, None), plain_step),
                                    ("harmonized", harmonized, (batch, None, None), harmonized_step)):
        try:
            flops, source = count_flops(backend, hmodel, data, step)
        except Exception as error:  # a counter that fails leaves the timings standing
            row[f"{key}_flops"], row["flops_source"] = None, f"failed: {type(error).__name__}: {error}"[:300]
            continue
        row[f"{key}_flops"], row["flops_source"] = flops, source
        row[f"{key}_tflops_per_s"] = flops / row[f"{key}_s"] / 1e12
        if peak:
            row[f"{key}_mfu"] = flops / row[f"{key}_s"] / peak
    publish(row)
    return row


def child_step(args, backend: str, info: dict) -> None:
    """One model and policy: the batch halved after each out-of-memory error, down to 1."""
    peak, peak_note = peak_flops(info["accelerator"] or "CPU", args.policy, args.fp32_matmul)
    row: dict[str, Any] = {
        "id": f"step {backend} {args.model} {args.policy}", "kind": "step", "backend": backend,
        "model": args.model, "policy": args.policy, "requested_batch": args.batch, "fp32_matmul": args.fp32_matmul,
        "peak_flops": peak, "peak_used": peak_note, "oom_batches": [], **info,
    }
    set_fp32_matmul(backend, args.fp32_matmul)
    batch_size = args.batch
    while True:
        try:
            measure_step(args, backend, args.model, args.policy, batch_size, peak,
                         lambda figures: emit(RESULT_PREFIX, {**row, **figures}))
            return
        except Exception as error:
            if not is_oom(error) or batch_size == 1:
                raise
            row["oom_batches"].append(batch_size)
            emit(PROGRESS_PREFIX, f"out of memory at batch {batch_size}: halving")
            release_memory(backend)
            batch_size //= 2


def relative_differences(loss_a: float, loss_b: float, weights_before, weights_a, weights_b) -> dict:
    """How far step A is from step B (the reference): loss, updated weights and the update itself.

    weights_max_rel: max over tensors of max|a - b| / max|b|, where a tensor that is about 0 (a bias whose gradient
    cancels analytically, e.g. before a batch normalisation, holds only float noise) is measured against a millionth
    of the largest weight instead. update_rel_l2: ||update_a - update_b|| / ||update_b|| over all weights together
    (an update is one SGD step: the gradient, scaled).
    """
    import numpy as np

    loss_rel = abs(loss_a - loss_b) / max(abs(loss_b), 1e-30)
    largest = max(float(np.max(np.abs(b), initial=0.0)) for b in weights_b)
    weights_max_rel = max(
        float(np.max(np.abs(a - b), initial=0.0)) / max(float(np.max(np.abs(b), initial=0.0)), 1e-6 * largest, 1e-30)
        for a, b in zip(weights_a, weights_b)
    )
    difference = sum(float(np.sum(np.square(a - b, dtype=np.float64))) for a, b in zip(weights_a, weights_b))
    update = sum(float(np.sum(np.square(b - w, dtype=np.float64))) for w, b in zip(weights_before, weights_b))
    update_rel_l2 = (difference / max(update, 1e-300)) ** 0.5
    return {"loss_rel": loss_rel, "weights_max_rel": weights_max_rel, "update_rel_l2": update_rel_l2}


def child_check(args, backend: str, name: str, info: dict) -> None:
    """One harmonized step on the accelerator and on the CPU, float32, full precision, same weights and batch
    (dropout off: `DETERMINISTIC`)."""
    import keras
    import numpy as np

    import harmonization

    set_fp32_matmul(backend, "highest")
    keras.mixed_precision.set_global_policy("float32")
    row: dict[str, Any] = {
        "id": f"check {backend} {name}", "kind": "check", "backend": backend, "model": name, "batch_size": args.batch,
        "fp32_matmul": "highest", "tolerance": CHECK_TOLERANCE, **info, "reference": "cpu",
        "cpu_vs_cpu": info["accelerator"] is None,
    }
    keras.utils.set_random_seed(0)
    model = build_model(name, args.tiny, **DETERMINISTIC.get(name, {}))
    row["image_size"] = size = int(model.input_shape[1])
    batch = train_step.make_batch(size, args.batch)
    before = model.get_weights()

    def one_step(model):
        hmodel = harmonization.HarmonizedModel(model)
        hmodel.compile(optimizer=keras.optimizers.SGD(1e-2))
        logs = hmodel.train_on_batch(batch, return_dict=True)
        return float(logs["loss"]), model.get_weights()

    start = time.perf_counter()
    loss_accelerator, weights_accelerator = one_step(model)
    row["accelerator_s"] = time.perf_counter() - start
    emit(PROGRESS_PREFIX, f"check {name}: step on {info['accelerator'] or 'the CPU'} done")
    start = time.perf_counter()
    with keras.device("cpu"):  # "cpu", not "cpu:0": Keras's PyTorch backend then misplaces the gradients
        keras.utils.set_random_seed(0)
        twin = build_model(name, args.tiny, **DETERMINISTIC.get(name, {}))
        twin.set_weights(before)
        loss_cpu, weights_cpu = one_step(twin)
    row["cpu_s"] = time.perf_counter() - start
    row.update(loss_accelerator=loss_accelerator, loss_cpu=loss_cpu,
               **relative_differences(loss_accelerator, loss_cpu, before, weights_accelerator, weights_cpu))
    row["passed"] = all(row[key] <= limit for key, limit in CHECK_TOLERANCE.items()) and bool(np.isfinite(loss_cpu))
    emit(RESULT_PREFIX, row)


def child_spearman(args, backend: str, info: dict) -> None:
    """`spearman` of maps on the accelerator (the device path) vs scipy's per-map loop on the host."""
    import numpy as np
    from scipy import stats

    from _maps import make_maps
    from harmonization import _spearman_device, metrics

    saliency, human = make_maps(args.maps, args.map_size)
    row: dict[str, Any] = {"id": f"spearman {backend}", "kind": "spearman", "backend": backend, "maps": args.maps,
                           "map_size": args.map_size, "rounds": args.rounds, **info}
    start = time.perf_counter()
    reference = np.array([stats.spearmanr(s.ravel(), h.ravel())[0] for s, h in zip(saliency, human)])
    row["scipy_s"] = time.perf_counter() - start
    if backend == "jax":
        import jax

        on = jax.devices()[0]
        placed = (jax.device_put(saliency, on), jax.device_put(human, on))
    else:
        import torch

        on = "cuda" if info["accelerator"] else "cpu"
        placed = (torch.as_tensor(saliency, device=on), torch.as_tensor(human, device=on))
    row["on_accelerator"] = _spearman_device.on_accelerator(placed[0])
    if row["on_accelerator"]:  # the public function, which picks the device path for maps on an accelerator
        def ours():
            return metrics.spearman(*placed, dtype="float64")
        row["path"] = "metrics.spearman (device path, chosen for maps on the accelerator)"
    else:  # on a CPU the public function would rank on the host: force the device path to test it
        def ours():
            return metrics._spearman_off_tensorflow(*placed, on_device=True)
        row["path"] = "device path forced on the CPU (metrics._spearman_off_tensorflow)"
    got = ours()  # warm-up: compiles on JAX
    seconds = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        got = ours()
        seconds.append(time.perf_counter() - start)
    row["ours_s"] = statistics.median(seconds)
    row["ours_times_s"] = seconds
    start = time.perf_counter()
    host = metrics._spearman_off_tensorflow(saliency, human, on_device=False)
    row["host_numpy_s"] = time.perf_counter() - start
    row["max_abs_diff_vs_scipy"] = float(np.max(np.abs(got - reference)))
    row["identical_to_host_path"] = bool(np.array_equal(got, host))
    row["speedup_vs_scipy"] = row["scipy_s"] / row["ours_s"]
    row["passed"] = row["max_abs_diff_vs_scipy"] <= 1e-12 and row["identical_to_host_path"]
    emit(RESULT_PREFIX, row)


def child_main(args) -> None:
    """A child: choose the backend, make TensorFlow unimportable (as on the GPU machine), run one task."""
    backend = args.backend
    sys.modules["tensorflow"] = None  # Python's "not installed", for import and importlib.util.find_spec alike
    train_step.select_backend(backend)
    header, version, device = train_step.describe_backend(backend)
    import keras

    info = {"backend_version": version, "keras_version": keras.__version__, "device": device,
            "accelerator": accelerator_name(backend, args.device)}
    emit(PROGRESS_PREFIX, header)
    if args.task == "step":
        child_step(args, backend, info)
        return
    # "verify": Spearman (seconds), then the check of each model, in one process (one start-up).
    child_spearman(args, backend, info)
    for name in args.check_models:
        child_check(args, backend, name, info)


# ============================================================================= the parent
def install_wheels(option: str) -> tuple[str | None, list[str]]:
    """(a folder for the children's PYTHONPATH, the wheels installed there) for `--wheels`.

    "auto": nothing when Keras is importable; else the wheels of `.whl/` at the repository root (what
    bench/gpu/fetch_wheels.sh puts there), installed with pip, offline, into a fresh folder. "none": nothing. A
    folder: its wheels, whatever is installed. The parent itself never imports Keras, so only its children need it.
    """
    if option == "none" or (option == "auto" and importlib.util.find_spec("keras") is not None):
        return None, []
    folder = ROOT / ".whl" if option == "auto" else Path(option)
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"Keras is not importable here and {folder} holds no wheels: run bench/gpu/fetch_wheels.sh "
                         "where pip can reach a registry, and bring .whl along (bench/gpu/README.md).")
    target = tempfile.mkdtemp(prefix="bench_gpu_site_")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", target, *map(str, wheels)], check=True)
    return target, [wheel.name for wheel in wheels]


def label_of(item: dict) -> str:
    """A planned measurement in words: "verify jax", "step torch vit_b16 float32"."""
    return " ".join(str(item[key]) for key in ("task", "backend", "model", "policy") if key in item)


class Run:
    """The parent: runs each planned measurement in a child under the budget, keeps the results, writes them."""

    def __init__(self, args):
        self.args = args
        self.started = time.monotonic()
        self.deadline = self.started + args.budget_s
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_file = open(self.out / "log.txt", "w")
        self.results: list[dict] = []
        self.skipped: list[dict] = []
        self.errors: list[dict] = []
        self.site, self.wheels = None, []

    def log(self, text: str) -> None:
        line = f"[{time.monotonic() - self.started:6.1f} s] {text}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def plan(self) -> list[dict]:
        """What to measure, most wanted first: Spearman and the correctness check per backend, then the steps (the
        issue's goal case, ViT-B/16 in bfloat16, first), each backend in turn."""
        args = self.args
        items = []
        items.extend({"task": "verify", "backend": backend} for backend in args.backends)
        items.extend({"task": "step", "backend": backend, "model": model, "policy": policy}
                     for policy in args.policies for model in args.models for backend in args.backends)
        return items

    def child_command(self, item: dict, soft_deadline_s: float) -> list[str]:
        args = self.args
        command = [sys.executable, "-u", str(Path(__file__).resolve()), "--child", item["task"],
                   "--backend", item["backend"], "--device", args.device, "--warmup", str(args.warmup),
                   "--steps", str(args.steps), "--fp32-matmul", args.fp32_matmul, "--maps", str(args.maps),
                   "--map-size", str(args.map_size), "--rounds", str(args.rounds),
                   "--soft-deadline", str(time.time() + soft_deadline_s)]
        if args.tiny:
            command.append("--tiny")
        if item["task"] == "step":
            command += ["--model", item["model"], "--policy", item["policy"], "--batch", str(args.batch)]
        else:
            command += ["--batch", str(args.check_batch), "--check-models", *args.check_models]
        return command

    def child_env(self) -> dict:
        path = [self.site, str(ROOT), os.environ.get("PYTHONPATH")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path)),
               "TF_CPP_MIN_LOG_LEVEL": "2", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"}
        env.pop("KERAS_BACKEND", None)  # the child chooses (train_step.select_backend)
        if self.args.device == "cpu":
            env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
        return env

    def expected_ids(self, item: dict) -> list[str]:
        """The ids of the records an item's child publishes (what is missing when it stops early)."""
        if item["task"] == "step":
            return [f"step {item['backend']} {item['model']} {item['policy']}"]
        return [f"spearman {item['backend']}"] + [f"check {item['backend']} {m}" for m in self.args.check_models]

    def run_child(self, item: dict, hard_s: float, soft_s: float) -> tuple[list[dict], str]:
        """Run one item; return (the last version of each record it published, how it ended). Stopped at
        `hard_s` seconds: what it published by then stays."""
        process = subprocess.Popen(
            self.child_command(item, soft_s), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=str(ROOT), env=self.child_env(), start_new_session=True,
        )
        lines: queue.Queue = queue.Queue()  # the child's stdout, then None at its end
        stderr_tail: list[str] = []

        def read_stdout():
            for line in process.stdout:
                lines.put(line.rstrip("\n"))
            lines.put(None)

        def read_stderr():
            for line in process.stderr:
                stderr_tail.append(line.rstrip("\n"))

        threading.Thread(target=read_stdout, daemon=True).start()
        err_reader = threading.Thread(target=read_stderr, daemon=True)
        err_reader.start()
        records: dict[str, dict] = {}
        ended = "finished"
        stop_at = time.monotonic() + hard_s
        while True:
            try:
                line = lines.get(timeout=max(0.05, stop_at - time.monotonic()))
            except queue.Empty:
                line = ""
            if line is None:
                break
            if line.startswith(RESULT_PREFIX):
                record = json.loads(line[len(RESULT_PREFIX):])
                records[record["id"]] = record
            elif line.startswith(PROGRESS_PREFIX):
                self.log(f"  {item['backend']}: {line[len(PROGRESS_PREFIX):]}")
            if time.monotonic() >= stop_at:
                try:
                    os.killpg(process.pid, 9)  # the child and anything it started (its own session)
                except ProcessLookupError:  # it ended on its own meanwhile
                    pass
                ended = "stopped at the budget"
                break
        process.wait()
        err_reader.join(timeout=5)
        if stderr_tail:  # the child's warnings and tracebacks, for the log only
            self.log_file.write(f"--- stderr of {label_of(item)}, last 200 lines\n")
            self.log_file.write("\n".join(stderr_tail[-200:]) + "\n---\n")
        if ended == "finished" and process.returncode != 0:
            last = next((line for line in reversed(stderr_tail) if line.strip()), "no error output")
            ended = f"failed (exit {process.returncode}): {last.strip()[:500]} (log.txt has the traceback)"
        return list(records.values()), ended

    def execute(self) -> None:
        items = self.plan()
        for index, item in enumerate(items):
            label = label_of(item)
            remaining = self.deadline - time.monotonic()
            if remaining < self.args.min_start_s:
                reason = (f"budget: {max(remaining, 0):.0f} s left of {self.args.budget_s:g} s, "
                          f"{self.args.min_start_s:g} s needed to start")
                self.skipped.extend({"id": name, "reason": reason} for name in self.expected_ids(item))
                self.log(f"skip {label}: out of budget")
                continue
            hard = min(remaining, self.args.child_cap_s)
            # Timing stops early (after 3 rounds) only near the end of the child's time, so that counting the
            # FLOPs still fits: compilation, not timing, is what takes long.
            soft = hard - min(30.0, hard / 4)
            self.log(f"start {label} ({remaining:.0f} s left)")
            try:
                records, ended = self.run_child(item, hard, soft)
            except OSError as error:
                records, ended = [], f"failed to start: {error}"
            for record in records:
                record["ended"] = ended
            self.results.extend(records)
            if ended != "finished":
                self.log(f"  {label}: {ended}")
                stopped = ended.startswith("stopped")
                published = {record["id"] for record in records}
                for name in self.expected_ids(item):
                    if name not in published:
                        (self.skipped if stopped else self.errors).append(
                            {"id": name, "reason" if stopped else "error": ended})
                if not stopped:  # a failure after some records: say which item failed, once
                    self.errors.extend({"id": name, "error": ended} for name in published)

    def report(self) -> dict:
        args = self.args
        return {
            "schema": SCHEMA,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": sys.argv,
            "device_requested": args.device,
            "tiny": args.tiny,
            "budget_s": args.budget_s,
            "elapsed_s": time.monotonic() - self.started,
            "host": {"python": platform.python_version(), "cpu_count": os.cpu_count(), "machine": platform.machine()},
            "settings": {"batch": args.batch, "warmup": args.warmup, "steps": args.steps,
                         "fp32_matmul": args.fp32_matmul, "check_batch": args.check_batch, "maps": args.maps,
                         "map_size": args.map_size, "rounds": args.rounds},
            "installed_wheels": self.wheels,
            "peaks_flops": PEAKS,
            "peak_source": PEAK_SOURCE,
            "check_tolerance": CHECK_TOLERANCE,
            "checks": [r for r in self.results if r["kind"] == "check"],
            "steps": [r for r in self.results if r["kind"] == "step"],
            "spearman": [r for r in self.results if r["kind"] == "spearman"],
            "skipped": self.skipped,
            "errors": self.errors,
        }


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "–" if value is None else format(value * scale, spec)


def table(report: dict) -> str:
    """The report as markdown: the check, the steps, Spearman, what was skipped."""
    devices = sorted({r.get("accelerator") or "CPU" for r in report["checks"] + report["steps"] + report["spearman"]})
    lines = [f"# bench/gpu/run.py, {report['date']}, on {', '.join(devices) or 'nothing measured'}"
             f"{' (tiny models)' if report['tiny'] else ''}", ""]
    lines += ["## GPU step vs CPU step (float32, TF32 off)", "",
              "| backend | model | batch | vs | loss rel. diff. | weights max rel. diff. | update rel. L2 | passed |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["checks"]:
        versus = "CPU vs CPU" if r["cpu_vs_cpu"] else f"{r['accelerator']} vs CPU"
        lines.append(f"| {r['backend']} | {r['model']} | {r['batch_size']} | {versus} | {r['loss_rel']:.1e} | "
                     f"{r['weights_max_rel']:.1e} | {r['update_rel_l2']:.1e} | {'yes' if r['passed'] else 'NO'} |")
    lines += ["", "## Harmonized vs plain step (medians of alternated steps after warm-up)", "",
              "| backend | model | policy | batch | plain ms | harmonized ms | ratio | harmonized img/s | "
              "peak MiB plain / harmonized | TFLOP/s harmonized | MFU harmonized (plain) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["steps"]:
        if "ratio" not in r:
            lines.append(f"| {r['backend']} | {r['model']} | {r['policy']} | {r.get('batch_size', '–')} | "
                         f"not timed: {r.get('ended', '')} | | | | | | |")
            continue
        mib = 1 / 2**20
        lines.append(
            f"| {r['backend']} | {r['model']} | {r['policy']} | {r['batch_size']} | {_fmt(r['plain_s'], '.1f', 1e3)} "
            f"| {_fmt(r['harmonized_s'], '.1f', 1e3)} | {r['ratio']:.2f} | {r['harmonized_images_per_s']:.0f} | "
            f"{_fmt(r.get('plain_peak_bytes'), '.0f', mib)} / {_fmt(r.get('harmonized_peak_bytes'), '.0f', mib)} | "
            f"{_fmt(r.get('harmonized_tflops_per_s'), '.3g')} | {_fmt(r.get('harmonized_mfu'), '.1%')} "
            f"({_fmt(r.get('plain_mfu'), '.1%')}) |")
    lines += ["", "## Spearman, 'ours' on the device vs scipy's per-map loop on the host", "",
              "| backend | maps | ours s | scipy s | NumPy host path s | speed-up vs scipy | max abs diff | passed |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["spearman"]:
        lines.append(f"| {r['backend']} | {r['maps']} x {r['map_size']}^2 | {r['ours_s']:.4f} | {r['scipy_s']:.3f} | "
                     f"{r['host_numpy_s']:.3f} | {r['speedup_vs_scipy']:.1f}x | {r['max_abs_diff_vs_scipy']:.1e} | "
                     f"{'yes' if r['passed'] else 'NO'} |")
    if report["steps"]:
        peaks = sorted({r["peak_used"] for r in report["steps"]})
        lines += ["", "MFU peaks: " + "; ".join(peaks) + "."]
        sources = sorted({r["flops_source"] for r in report["steps"] if "flops_source" in r})
        lines += ["FLOPs: " + "; ".join(sources) + "."]
    for title, entries, key in (("Skipped", report["skipped"], "reason"), ("Errors", report["errors"], "error")):
        if entries:
            lines += ["", f"## {title}", ""]
            lines += [f"- {entry['id']}: {entry[key]}" for entry in entries]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_gpu_out", help="folder for results.json, table.md and log.txt")
    parser.add_argument("--budget-s", type=float, default=480, help="hard limit for the whole run (default 480)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--batch", type=int, default=None, help="step batch (default 64; 4 with --tiny)")
    parser.add_argument("--check-models", nargs="*", default=["resnet50v2"], choices=MODELS,
                        help="models of the GPU-vs-CPU check (default resnet50v2; none: no check)")
    parser.add_argument("--check-batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each kind first (compilation)")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds, each one plain and one harmonized step")
    parser.add_argument("--fp32-matmul", choices=("tf32", "highest"), default="tf32",
                        help="float32 timing: TF32 matrix units allowed (default) or full float32")
    parser.add_argument("--maps", type=int, default=None, help="Spearman: pairs of maps (default 512; 16 with --tiny)")
    parser.add_argument("--map-size", type=int, default=None, help="Spearman: map side (default 224; 32 with --tiny)")
    parser.add_argument("--rounds", type=int, default=5, help="Spearman: timed calls of ours (median)")
    parser.add_argument("--tiny", action="store_true", help="tiny models and maps (the CPU test)")
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                        help="gpu (default; a backend without one is an error) or cpu (testing: the check then "
                             "compares the CPU with itself, and says so)")
    parser.add_argument("--min-start-s", type=float, default=None,
                        help="least budget left to start a measurement (default 20 s; 0 with --tiny)")
    parser.add_argument("--child-cap-s", type=float, default=240, help="most seconds one measurement may take")
    parser.add_argument("--wheels", default="auto",
                        help="auto (default): install .whl/*.whl for the children when Keras is not importable; "
                             "none; or a folder of wheels to install")
    # The child's own arguments (set by the parent).
    parser.add_argument("--child", choices=("step", "verify"), dest="task", help=argparse.SUPPRESS)
    parser.add_argument("--backend", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--policy", choices=POLICIES, help=argparse.SUPPRESS)
    parser.add_argument("--soft-deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = {"batch": (64, 4), "maps": (512, 16), "map_size": (224, TINY_SIZE), "min_start_s": (20, 0)}
    for name, (full, tiny) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    for name in ("batch", "check_batch", "warmup", "steps", "maps", "map_size", "rounds"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            parser.error(f"--{name.replace('_', '-')} must be at least {0 if name == 'warmup' else 1}; "
                         f"got {getattr(args, name)}")
    if args.budget_s < 0:
        parser.error(f"--budget-s must be >= 0; got {args.budget_s:g}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.task:
        child_main(args)
        return 0
    run = Run(args)
    run.log(f"bench/gpu/run.py: budget {args.budget_s:g} s, device {args.device}, backends {' '.join(args.backends)}"
            f"{', tiny models' if args.tiny else ''}; writing to {run.out}")
    try:
        run.site, run.wheels = install_wheels(args.wheels)
        if run.wheels:
            run.log(f"installed {' '.join(run.wheels)} into {run.site} (for the children)")
        run.execute()
    finally:
        report = run.report()
        (run.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
        text = table(report)
        (run.out / "table.md").write_text(text)
        print(text, flush=True)
        run.log(f"done in {report['elapsed_s']:.0f} s: {run.out / 'results.json'}, {run.out / 'table.md'}")
        run.log_file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
