"""Which Keras backend runs, and one clear sentence when something needs a package that is not installed.

Keras chooses the backend (`KERAS_BACKEND`, else `~/.keras/keras.json`, else TensorFlow); we never override it.
The models, presets, saliency, metrics and the harmonized step run on TensorFlow, JAX and PyTorch. The TFDS
builders, `tf.data` pipelines, `harmonization train` (its `tf.distribute` strategies) and the published 0.0.9
API are TensorFlow code: `require_tensorflow` is what they call first, so that a JAX or PyTorch user learns what
needs TensorFlow and how to get it, instead of a `ModuleNotFoundError` from deep inside.

Standard library only, and Keras is imported on use: `import harmonization` must not pick the backend.
"""

from __future__ import annotations

import importlib.util
import os
import sys

#: The install commands, by what is missing.
INSTALL = {
    # What the default install adds for TensorFlow (setup.py's TENSORFLOW_ONLY; TensorBoard comes with TensorFlow).
    # Not `pip install harmonization-hub`: pip keeps an installed copy built without TensorFlow as it is.
    "tensorflow": 'pip install "tensorflow>=2.21,<2.22" "tensorflow-datasets>=4.9,<5" importlib_resources dill',
    "jax": 'pip install "harmonization-hub[jax]"',
    "torch": 'pip install "harmonization-hub[torch]"',
}


#: The package each Keras backend imports (Keras 3.15's backends; numpy and openvino run inference only).
BACKEND_PACKAGES = {
    "tensorflow": "tensorflow", "jax": "jax", "torch": "torch", "numpy": "numpy", "openvino": "openvino",
}


class MissingBackendError(ImportError):
    """Something needs a package (TensorFlow, JAX or PyTorch) that is not installed, or another backend."""


def name() -> str:
    """The Keras backend in use: "tensorflow", "jax" or "torch" (Keras decides; see the module docstring)."""
    import keras  # on use: importing Keras picks the backend, which `import harmonization` must not do

    return keras.backend.backend()


def chosen() -> str:
    """The backend Keras runs on, or will once imported, without importing it (commands check before paying for it).

    Keras's rule: `KERAS_BACKEND` when set and not empty, else the `backend` of `$KERAS_HOME/keras.json` (default
    `~/.keras/keras.json`), else "tensorflow". Once Keras is imported, its own answer.
    """
    keras = sys.modules.get("keras")
    if keras is not None and hasattr(keras, "backend"):
        return keras.backend.backend()
    return os.environ.get("KERAS_BACKEND") or _configured_backend() or "tensorflow"


def is_tensorflow() -> bool:
    """True when Keras runs on TensorFlow."""
    return name() == "tensorflow"


def has_tensorflow() -> bool:
    """True when TensorFlow is installed (whatever the backend), without importing it."""
    return importlib.util.find_spec("tensorflow") is not None


def require_tensorflow(what: str) -> None:
    """Raise a MissingBackendError naming `what` and the install command when TensorFlow is not installed.

    `what` completes "... needs TensorFlow", e.g. "The ClickMe TFDS builders".
    """
    if not has_tensorflow():
        raise MissingBackendError(
            f"{what} needs TensorFlow, which is not installed (the Keras backend is {chosen()!r}). "
            f"Install it with: {INSTALL['tensorflow']}; models, presets, saliency, metrics, evaluation and "
            "HarmonizedModel.fit work without it."
        )


def require_tensorflow_backend(what: str) -> None:
    """Raise a MissingBackendError unless Keras runs on TensorFlow (e.g. `tf.distribute` strategies).

    `what` completes "... runs on the TensorFlow backend only".
    """
    require_tensorflow(what)
    backend = chosen()
    if backend != "tensorflow":
        raise MissingBackendError(
            f"{what} runs on the TensorFlow backend only; the Keras backend is {backend!r}. Run it with "
            "KERAS_BACKEND=tensorflow, or train in your own loop with HarmonizedModel.fit, which runs on every "
            "backend."
        )


def check_backend_installed() -> None:
    """Raise a MissingBackendError when the chosen backend is not one Keras has, or its package is missing (e.g.
    KERAS_BACKEND=jax without JAX), with the fix; Keras itself fails later with a bare ModuleNotFoundError."""
    wanted = chosen()
    module = BACKEND_PACKAGES.get(wanted)
    if module is None:
        where = "KERAS_BACKEND" if os.environ.get("KERAS_BACKEND") else _config_path()
        raise MissingBackendError(
            f"{where} names the Keras backend {wanted!r}, which Keras does not have; expected one of "
            f"{', '.join(BACKEND_PACKAGES)} (tensorflow, jax or torch for training)."
        )
    if importlib.util.find_spec(module) is None:
        install = INSTALL.get(module, f"pip install {module}")
        raise MissingBackendError(
            f"The Keras backend is {wanted!r} but {module} is not installed. Install it with: {install}, "
            "or choose another backend with KERAS_BACKEND (tensorflow, jax or torch)."
        )


def _config_path() -> str:
    """Keras's config file, found as Keras finds it: `$KERAS_HOME/keras.json`, else `~/.keras/keras.json`, or
    `/tmp/.keras/keras.json` when the home folder is not writable."""
    if "KERAS_HOME" in os.environ:
        folder = os.environ["KERAS_HOME"]
    else:
        home = os.path.expanduser("~")
        folder = os.path.join(home if os.access(home, os.W_OK) else "/tmp", ".keras")
    return os.path.expanduser(os.path.join(folder, "keras.json"))


def _configured_backend() -> str | None:
    """The backend named in Keras's config file (`_config_path()`), if any; an unreadable file names none, as
    Keras then falls back to its default too."""
    import json  # on use: only when KERAS_BACKEND is unset

    try:
        with open(_config_path(), encoding="utf-8") as file:
            config = json.load(file)
    except (OSError, ValueError):
        return None
    backend = config.get("backend") if isinstance(config, dict) else None
    return backend if isinstance(backend, str) and backend else None
