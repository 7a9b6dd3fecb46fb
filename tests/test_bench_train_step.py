"""bench/train_step.py on JAX and PyTorch, at a tiny size, so that the script cannot rot between measurements.

Nothing is timed here (the figures are noise at this size and on a shared machine): the test checks that the
script picks the backend itself, whatever KERAS_BACKEND says, runs both steps there without TensorFlow, and
reports the row and the JSON the README's numbers are read from.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from backend_helpers import ROOT, require_backend

SCRIPT = ROOT / "bench" / "train_step.py"

# The script run as `python bench/train_step.py ...` would be, with TensorFlow made unimportable first (a None
# entry in sys.modules is what Python reports as "not installed", for `import` and `importlib.util.find_spec`
# alike): JAX and PyTorch users measure in environments without it.
WITHOUT_TENSORFLOW = r"""
import runpy, sys
sys.modules["tensorflow"] = None
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

HEADERS = {"jax": "JAX ", "torch": "PyTorch "}


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_bench_train_step_runs_on_the_backend_it_is_given(backend, tmp_path):
    require_backend(backend)
    report_path = tmp_path / "steps.json"
    args = ["--backend", backend, "--models", "tiny", "--batch-size", "2", "--steps", "1", "--warmup", "1",
            "--json", str(report_path)]
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_TENSORFLOW, str(SCRIPT), *args], capture_output=True, text=True,
        timeout=300, cwd=str(ROOT),
        # KERAS_BACKEND names another backend: --backend must win over it.
        env={**os.environ, "PYTHONPATH": str(ROOT), "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    header, row = done.stdout.strip().splitlines()[-2:]
    assert header.startswith(HEADERS[backend]) and ", on " in header
    assert row.startswith("tiny") and "64px" in row and "ratio" in row
    assert ("(XLA)" in row) == (backend == "jax")  # JAX compiles both steps with XLA by default; PyTorch runs eager
    report = json.loads(report_path.read_text())
    assert report["backend"] == backend and report["device"] and report["note"]
    (result,) = report["results"]
    assert result["model"] == "tiny" and result["batch_size"] == 2 and result["image_size"] == 64
    assert len(result["plain_times_s"]) == len(result["harmonized_times_s"]) == 1
    assert math.isfinite(result["ratio"]) and result["ratio"] > 0


def test_bench_train_step_refuses_jit_off_tensorflow():
    # --jit is TensorFlow's XLA switch; elsewhere it would silently measure nothing different.
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--backend", "torch", "--jit"], capture_output=True, text=True, timeout=60,
        cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 2 and "--jit is TensorFlow's XLA switch" in done.stderr
