"""Small helpers shared by the console commands (standard library only, so `--help` stays instant)."""

from __future__ import annotations

import os
import re
import sys
import tempfile

# What TensorFlow 2.21 writes to stderr when it starts on a machine without a GPU, before and after its logging
# is initialised (measured here; TF_CPP_MIN_LOG_LEVEL cannot hide the part written before initialisation,
# which is printed once per TensorFlow library loaded, i.e. twice).
_STARTUP_NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|oneDNN custom operations are on"
    r"|cudart_stub\.cc.*Could not find cuda drivers"
    r"|cpu_feature_guard\.cc"
    r"|^To enable the following instructions: .*rebuild TensorFlow"
    r"|failed call to cuInit"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|computation placer already registered"
    r"|TF-TRT Warning: Could not find TensorRT"
)


def startup_noise_removed(text: str) -> str:
    """`text` without TensorFlow's start-up lines; every other line (real warnings and errors) is kept."""
    return "".join(line for line in text.splitlines(keepends=True) if not _STARTUP_NOISE.search(line))


def import_backend_quietly() -> None:
    """Import Keras, and TensorFlow with its devices initialised when it is the backend, without TensorFlow's
    start-up noise on stderr.

    On JAX or PyTorch, TensorFlow is not imported (it may not even be installed). Only what
    `startup_noise_removed` recognises is dropped; anything else written meanwhile is replayed. A user who set
    `TF_CPP_MIN_LOG_LEVEL` chose what to see, so nothing is filtered then.
    """
    if "tensorflow" in sys.modules or "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import keras  # imported here so that its start-up output (TensorFlow's, on that backend) is filtered

            if keras.backend.backend() == "tensorflow":
                import tensorflow as tf

                tf.config.list_physical_devices()  # the device initialisation that logs "failed call to cuInit"
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = startup_noise_removed(capture.read().decode("utf-8", errors="replace"))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


def to_numpy(values):
    """`values` as a NumPy array, from any backend's tensor (a PyTorch one may be on a GPU or still require grad,
    which `np.asarray` refuses) or anything `np.asarray` takes."""
    import keras  # here: this module imports only the standard library at load
    import numpy as np

    if keras.ops.is_tensor(values):
        return keras.ops.convert_to_numpy(values)
    return np.asarray(values)


def input_size(model) -> int:
    """The side of the square images `model` takes, or a ValueError that shows its input shape."""
    shape = model.input_shape
    if not (isinstance(shape, tuple) and len(shape) == 4 and shape[1] and shape[1] == shape[2]):
        raise ValueError(f"Expected a model with square image inputs (batch, size, size, 3), got {shape}.")
    return int(shape[1])
