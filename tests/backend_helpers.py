"""Run a snippet of Python under another Keras backend, in a child process, and read back what it printed as JSON.

Keras picks its backend once per process, so a comparison across backends (a preset's logits on JAX vs
TensorFlow) needs a child. The child gets this interpreter, this repository on its path and `KERAS_BACKEND`;
the tests' own backend stays TensorFlow (or whatever the suite runs under).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("tensorflow", "jax", "torch")
_MODULE = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


def current_backend() -> str:
    """The backend this test process runs on (Keras's rule), without importing TensorFlow needlessly."""
    import keras

    return keras.backend.backend()


def installed(backend: str) -> bool:
    return importlib.util.find_spec(_MODULE[backend]) is not None


def other_backends() -> list[str]:
    """The installed backends other than the current one (all three where the test extras are installed)."""
    return [b for b in BACKENDS if b != current_backend() and installed(b)]


def require_backend(backend: str) -> None:
    """Fail (not skip) when a backend the test extras install is missing: a comparison never silently vanishes.

    In an environment built without TensorFlow (CI's JAX and PyTorch runs), TensorFlow's absence is expected and
    the test is skipped with that reason.
    """
    if installed(backend):
        return
    if backend == "tensorflow" and os.environ.get("HARMONIZATION_NO_TENSORFLOW") == "1":
        pytest.skip("this environment was built without TensorFlow (HARMONIZATION_NO_TENSORFLOW=1)")
    pytest.fail(f"{backend} is not installed; `pip install \".[test]\"` installs TensorFlow, JAX and PyTorch.")


def run_on_backend(backend: str, code: str, *, timeout: float = 600, env: dict | None = None):
    """Run `code` with KERAS_BACKEND=`backend` in a child Python; return the JSON it printed on its last line."""
    require_backend(backend)
    child_env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        **(env or {}),
    }
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=child_env, cwd=str(ROOT)
    )
    if result.returncode != 0:
        raise AssertionError(f"the {backend} child failed ({result.returncode}):\n{result.stderr[-4000:]}")
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return json.loads(lines[-1])
