"""bench/gpu/run.py on the CPU with tiny models, so that the script a GPU lease runs cannot rot between leases.

Nothing here is a timing test: the figures are noise at this size. The test checks that the script runs JAX and
PyTorch in children without TensorFlow, that its GPU-vs-CPU check (here CPU against CPU, which it says) and its
Spearman comparison pass, that every field the README's numbers are read from is in the JSON, and that a run out
of budget records what it skipped instead of overrunning.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from backend_helpers import ROOT, require_backend

SCRIPT = ROOT / "bench" / "gpu" / "run.py"

# What a record of each kind must hold (bench/gpu/README.md describes them).
COMMON = {"id", "kind", "backend", "backend_version", "keras_version", "device", "accelerator", "ended"}
CHECK_FIELDS = COMMON | {"model", "batch_size", "image_size", "fp32_matmul", "reference", "cpu_vs_cpu", "tolerance",
                         "loss_accelerator", "loss_cpu", "loss_rel", "weights_max_rel", "update_rel_l2", "passed"}
STEP_FIELDS = COMMON | {
    "model", "policy", "requested_batch", "batch_size", "oom_batches", "image_size", "params", "fp32_matmul",
    "plain_s", "harmonized_s", "ratio", "plain_images_per_s", "harmonized_images_per_s", "plain_times_s",
    "harmonized_times_s", "plain_peak_bytes", "harmonized_peak_bytes", "plain_resident_bytes",
    "harmonized_resident_bytes", "memory_note", "plain_flops", "harmonized_flops", "flops_source",
    "plain_tflops_per_s", "harmonized_tflops_per_s", "peak_flops", "peak_used",
}
SPEARMAN_FIELDS = COMMON | {"maps", "map_size", "on_accelerator", "path", "ours_s", "scipy_s", "host_numpy_s",
                            "speedup_vs_scipy", "max_abs_diff_vs_scipy", "identical_to_host_path", "passed"}
REPORT_FIELDS = {"schema", "date", "command", "device_requested", "tiny", "budget_s", "elapsed_s", "host", "settings",
                 "installed_wheels", "peaks_flops", "peak_source", "check_tolerance", "checks", "steps", "spearman",
                 "skipped", "errors"}


def run_script(out, *args: str, timeout: float = 240) -> dict:
    """`python bench/gpu/run.py --out OUT ARGS...` as the GPU machine runs it; the JSON it wrote."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *args], capture_output=True, text=True, timeout=timeout,
        cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (out / "table.md").read_text() in done.stdout  # the table is printed as written
    assert (out / "log.txt").exists()
    report = json.loads((out / "results.json").read_text())
    assert REPORT_FIELDS <= set(report), REPORT_FIELDS - set(report)
    return report


@pytest.mark.slow  # ~55 s on 2 cores, most of it XLA compiling the JAX steps on the CPU
def test_bench_gpu_runs_both_backends_on_the_cpu_and_reports_every_field(tmp_path):
    require_backend("jax")
    require_backend("torch")
    report = run_script(tmp_path, "--tiny", "--device", "cpu", "--models", "vit_b16", "--policies", "mixed_bfloat16",
                        "--check-models", "vit_b16", "--warmup", "1", "--steps", "2", "--rounds", "1")
    assert report["skipped"] == [] and report["errors"] == [], (report["skipped"], report["errors"])
    assert report["device_requested"] == "cpu" and report["tiny"] is True
    for kind, fields in (("checks", CHECK_FIELDS), ("steps", STEP_FIELDS), ("spearman", SPEARMAN_FIELDS)):
        assert sorted(record["backend"] for record in report[kind]) == ["jax", "torch"], kind
        for record in report[kind]:
            assert fields <= set(record), (kind, record["backend"], fields - set(record))
            assert record["ended"] == "finished" and record["accelerator"] is None
    for check in report["checks"]:
        # On the CPU the check compares the CPU with itself, and says so; it must agree exactly.
        assert check["cpu_vs_cpu"] is True and check["passed"] is True
        assert check["loss_rel"] == check["weights_max_rel"] == check["update_rel_l2"] == 0.0
    for step in report["steps"]:
        assert step["batch_size"] == step["requested_batch"] == 4 and step["oom_batches"] == []
        assert len(step["plain_times_s"]) == len(step["harmonized_times_s"]) == 2
        for key in ("plain_s", "harmonized_s", "ratio", "plain_images_per_s", "harmonized_images_per_s",
                    "plain_flops", "harmonized_flops"):
            assert math.isfinite(step[key]) and step[key] > 0, (step["backend"], key, step[key])
        # The harmonized step does more arithmetic than the plain one (about twice: a double backward pass).
        assert step["harmonized_flops"] > 1.5 * step["plain_flops"]
        # No memory counter and no known peak on a CPU: None, never a made-up number.
        assert step["plain_peak_bytes"] is None and step["peak_flops"] is None and "harmonized_mfu" not in step
    for record in report["spearman"]:
        assert record["on_accelerator"] is False and "forced" in record["path"]
        assert record["passed"] and record["identical_to_host_path"] and record["max_abs_diff_vs_scipy"] <= 1e-12
        assert record["speedup_vs_scipy"] > 0


def test_bench_gpu_out_of_budget_records_what_it_skipped(tmp_path):
    # Half a second: the first child is stopped before it has imported Keras, and nothing else may start.
    report = run_script(tmp_path, "--tiny", "--device", "cpu", "--backends", "torch", "--models", "vit_b16",
                        "--policies", "float32", "--check-models", "vit_b16", "--budget-s", "0.5",
                        "--min-start-s", "0", timeout=60)
    assert report["checks"] == report["steps"] == report["spearman"] == [] and report["errors"] == []
    reasons = {entry["id"]: entry["reason"] for entry in report["skipped"]}
    assert set(reasons) == {"spearman torch", "check torch vit_b16", "step torch vit_b16 float32"}
    assert reasons["spearman torch"] == reasons["check torch vit_b16"] == "stopped at the budget"
    assert reasons["step torch vit_b16 float32"].startswith("budget: 0 s left of 0.5 s")
    assert report["elapsed_s"] < 10  # stopped, not waited for


def test_bench_gpu_peaks_follow_the_device_name():
    spec = importlib.util.spec_from_file_location("bench_gpu_run", SCRIPT)
    bench_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_gpu)  # imports no backend: the parent never does
    assert bench_gpu.chip_of("NVIDIA H100 80GB HBM3") == "H100 SXM"
    assert bench_gpu.chip_of("NVIDIA H100 PCIe") == "H100 PCIe"
    assert bench_gpu.chip_of("NVIDIA H200") == "H200 SXM" and bench_gpu.chip_of("NVIDIA H200 NVL") == "H200 NVL"
    assert bench_gpu.peak_flops("NVIDIA H100 80GB HBM3", "mixed_bfloat16", "tf32")[0] == 989.5e12
    assert bench_gpu.peak_flops("NVIDIA H100 80GB HBM3", "float32", "tf32")[0] == 494.5e12
    assert bench_gpu.peak_flops("NVIDIA H100 80GB HBM3", "float32", "highest")[0] == 67e12
    assert bench_gpu.peak_flops("CPU", "float32", "tf32")[0] is None


@pytest.mark.parametrize("bad", [["--batch", "0"], ["--budget-s", "-1"]])
def test_bench_gpu_refuses_bad_arguments(bad, tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), *bad], capture_output=True,
                          text=True, timeout=60, cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and bad[0] in done.stderr
