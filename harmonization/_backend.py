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

#: The install commands, by what is missing.
INSTALL = {
    "tensorflow": 'pip install "harmonization-hub"  (the default install brings TensorFlow)',
    "jax": 'pip install "harmonization-hub[jax]"',
    "torch": 'pip install "harmonization-hub[torch]"',
}


class MissingBackendError(ImportError):
    """Something needs a package (TensorFlow, JAX or PyTorch) that is not installed, or another backend."""


def name() -> str:
    """The Keras backend in use: "tensorflow", "jax" or "torch" (Keras decides; see the module docstring)."""
    import keras  # on use: importing Keras picks the backend, which `import harmonization` must not do

    return keras.backend.backend()


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
            f"{what} needs TensorFlow, which is not installed (the Keras backend is {name()!r}). "
            f"Install it with: {INSTALL['tensorflow']}; models, presets, saliency, metrics, evaluation and "
            "HarmonizedModel.fit work without it."
        )


def require_tensorflow_backend(what: str) -> None:
    """Raise a MissingBackendError unless Keras runs on TensorFlow (e.g. `tf.distribute` strategies).

    `what` completes "... runs on the TensorFlow backend only".
    """
    require_tensorflow(what)
    if not is_tensorflow():
        raise MissingBackendError(
            f"{what} runs on the TensorFlow backend only; the Keras backend is {name()!r}. Run it with "
            "KERAS_BACKEND=tensorflow, or train in your own loop with HarmonizedModel.fit, which runs on every "
            "backend."
        )


def check_backend_installed() -> None:
    """Raise a MissingBackendError when the package of the chosen backend is missing (e.g. KERAS_BACKEND=jax
    without JAX), with the install command; Keras itself fails later with a bare ModuleNotFoundError."""
    import os

    wanted = os.environ.get("KERAS_BACKEND") or _configured_backend() or "tensorflow"  # Keras's default
    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}.get(wanted)
    if module is not None and importlib.util.find_spec(module) is None:
        raise MissingBackendError(
            f"The Keras backend is {wanted!r} but {module} is not installed. Install it with: {INSTALL[module]}, "
            "or choose another backend with KERAS_BACKEND (tensorflow, jax or torch)."
        )


def _configured_backend() -> str | None:
    """The backend named in Keras's config file (`$KERAS_HOME/keras.json`, else `~/.keras/keras.json`), if any."""
    import json
    import os

    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json"), encoding="utf-8") as file:
            config = json.load(file)
    except (OSError, ValueError):
        return None
    backend = config.get("backend") if isinstance(config, dict) else None
    return backend if isinstance(backend, str) else None
