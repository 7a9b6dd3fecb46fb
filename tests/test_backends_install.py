"""Installing and importing on every Keras backend: what setup.py asks for, and who picks the backend.

These run under TensorFlow in the main suite and, in CI, under JAX and PyTorch in environments built without
TensorFlow (`HARMONIZATION_NO_TENSORFLOW=1 pip install ".[jax]"`). Each case that depends on the backend or on
what is installed runs in a child Python, because Keras picks its backend once per process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from backend_helpers import ROOT, current_backend

pytestmark = pytest.mark.backends

# setup.py's TENSORFLOW_ONLY: what an install built with HARMONIZATION_NO_TENSORFLOW=1 leaves out.
TENSORFLOW_ONLY = {"tensorflow", "tensorflow-datasets", "importlib_resources", "dill", "tensorboard"}


def _child(code: str, env: dict[str, str | None], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `code` in a child Python with this repository first on its path and `env` applied (None unsets)."""
    child_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                 "TF_CPP_MIN_LOG_LEVEL": "3"}
    for key, value in env.items():
        if value is None:
            child_env.pop(key, None)
        else:
            child_env[key] = value
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=child_env, cwd=str(ROOT))


def _last_json(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, f"the child failed ({result.returncode}):\n{result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def _setup_kwargs(no_tensorflow: str | None) -> dict:
    """What setup.py passes to setuptools.setup, with HARMONIZATION_NO_TENSORFLOW set to `no_tensorflow`.

    setuptools is replaced by a stand-in that records the call, so nothing is built and the environment needs no
    setuptools (a fresh venv may lack it).
    """
    code = """
        import json, runpy, sys, types
        recorded = {}
        stand_in = types.ModuleType("setuptools")
        stand_in.setup = lambda **kwargs: recorded.update(kwargs)
        stand_in.find_packages = lambda **kwargs: []
        sys.modules["setuptools"] = stand_in
        runpy.run_path("setup.py", run_name="__main__")
        print(json.dumps({"install_requires": recorded["install_requires"], "extras": recorded["extras_require"]}))
    """
    return _last_json(_child(code, {"HARMONIZATION_NO_TENSORFLOW": no_tensorflow}))


def _names(requirements: list[str]) -> set[str]:
    from packaging.requirements import Requirement  # here: packaging is pytest's dependency, needed by these only

    return {Requirement(r).name for r in requirements}


@pytest.mark.parametrize("value", [None, "0", ""])
def test_the_default_install_brings_tensorflow(value):
    requires = _names(_setup_kwargs(value)["install_requires"])
    assert TENSORFLOW_ONLY <= requires, f"HARMONIZATION_NO_TENSORFLOW={value!r} must keep TensorFlow: {requires}"
    assert {"keras", "numpy", "h5py", "huggingface_hub"} <= requires


def test_an_install_without_tensorflow_leaves_out_only_what_needs_it():
    default = _setup_kwargs(None)
    without = _setup_kwargs("1")
    assert not TENSORFLOW_ONLY & _names(without["install_requires"])
    assert _names(without["install_requires"]) == _names(default["install_requires"]) - TENSORFLOW_ONLY
    assert without["extras"] == default["extras"]


def test_the_extras_name_each_backend_and_the_tests_get_all_three():
    extras = _setup_kwargs(None)["extras"]
    assert extras["jax"] == ["jax"]
    assert extras["torch"] == ["torch>=2.1"]
    # torch pinned: the local CPU build (2.13.0+cpu); an unpinned torch resolves to PyPI's CUDA build.
    assert {"pytest>=7", "jax", "torch==2.13.0"} <= set(extras["test"])


def test_an_environment_built_without_tensorflow_has_none():
    if os.environ.get("HARMONIZATION_NO_TENSORFLOW") != "1":
        pytest.skip("this environment was not built with HARMONIZATION_NO_TENSORFLOW=1")
    assert importlib.util.find_spec("tensorflow") is None, "HARMONIZATION_NO_TENSORFLOW=1 but TensorFlow is here"
    assert current_backend() != "tensorflow"


@pytest.mark.parametrize("backend", ["jax", "torch", "tensorflow"])
def test_a_backend_whose_package_is_missing_is_one_sentence(backend):
    # The package is hidden from the child (`sys.modules[name] = None` makes find_spec and import fail), so this
    # runs wherever the package is installed or not.
    result = _last_json(_child(f"""
        import json, sys
        sys.modules[{backend!r}] = None
        try:
            import harmonization
        except ImportError as error:
            print(json.dumps({{"type": type(error).__name__, "message": str(error)}}))
        else:
            print(json.dumps({{"type": None}}))
    """, {"KERAS_BACKEND": backend}))
    assert result["type"] == "MissingBackendError", result
    message = result["message"]
    assert f"The Keras backend is {backend!r} but {backend} is not installed" in message
    assert "pip install" in message and "KERAS_BACKEND" in message
    assert "\n" not in message


def test_an_unknown_backend_name_is_one_sentence():
    result = _last_json(_child("""
        import json
        try:
            import harmonization
        except ImportError as error:
            print(json.dumps({"type": type(error).__name__, "message": str(error)}))
    """, {"KERAS_BACKEND": "jaxx"}))
    assert result["type"] == "MissingBackendError"
    assert "KERAS_BACKEND names the Keras backend 'jaxx', which Keras does not have" in result["message"]
    assert "tensorflow, jax, torch" in result["message"]


def _with_keras_json(tmp_path: Path, backend: str, code: str) -> subprocess.CompletedProcess:
    home = tmp_path / "keras_home"
    home.mkdir(exist_ok=True)
    (home / "keras.json").write_text(json.dumps({"backend": backend, "floatx": "float32"}), encoding="utf-8")
    return _child(code, {"KERAS_BACKEND": None, "KERAS_HOME": str(home)})


def test_keras_json_picks_the_backend_when_keras_backend_is_unset(tmp_path):
    # The current backend is installed wherever this runs; `import harmonization` must not override the file.
    backend = current_backend()
    result = _last_json(_with_keras_json(tmp_path, backend, """
        import json
        import harmonization
        from harmonization import _backend
        chosen_before_keras = _backend.chosen()
        import keras
        print(json.dumps({"chosen": chosen_before_keras, "keras": keras.backend.backend(), "name": _backend.name()}))
    """))
    assert result == {"chosen": backend, "keras": backend, "name": backend}


@pytest.mark.parametrize("named", ["tensorflow", "jax", "torch"])
def test_keras_json_naming_a_missing_backend_is_one_sentence_naming_it(tmp_path, named):
    if importlib.util.find_spec(named) is not None:
        pytest.skip(f"{named} is installed here; the case of a missing one runs where it is not")
    result = _last_json(_with_keras_json(tmp_path, named, """
        import json
        try:
            import harmonization
        except ImportError as error:
            print(json.dumps({"type": type(error).__name__, "message": str(error)}))
    """))
    assert result["type"] == "MissingBackendError"
    assert f"The Keras backend is {named!r} but {named} is not installed" in result["message"]


def test_keras_backend_wins_over_keras_json(tmp_path):
    # Keras's rule: the variable first. The file names another backend, possibly one not installed here.
    backend = current_backend()
    other = "jax" if backend != "jax" else "torch"
    code = """
        import json
        import harmonization, keras
        print(json.dumps({"keras": keras.backend.backend()}))
    """
    home = tmp_path / "keras_home"
    home.mkdir()
    (home / "keras.json").write_text(json.dumps({"backend": other}), encoding="utf-8")
    result = _last_json(_child(code, {"KERAS_BACKEND": backend, "KERAS_HOME": str(home)}))
    assert result == {"keras": backend}
