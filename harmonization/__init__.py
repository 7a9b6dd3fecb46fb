"""Harmonization Hub: train and use vision models whose feature importance agrees with humans.

The neural harmonizer (Fel et al., NeurIPS 2022, arXiv 2211.04533) as a Keras 3 library: TensorFlow by default,
JAX and PyTorch too (`harmonization._backend`).
"""

from harmonization._backend import check_backend_installed as _check_backend_installed
from harmonization._conflicts import check_no_published_package as _check_no_published_package

# Before anything else: with 0.0.9 installed too, the files under harmonization/ are a mix of both.
_check_no_published_package()

# The backend is the user's choice, by Keras's own rule (KERAS_BACKEND, else ~/.keras/keras.json, else TensorFlow);
# a backend whose package is missing is named here, with its install command, instead of failing deep in Keras.
_check_backend_installed()

# `keras.saving.load_model` builds our published presets once our classes are registered with Keras: done as soon
# as Keras is imported (now, or right after `import keras`), never by importing Keras here.
from harmonization._keras_registration import register_with_keras as _register_with_keras

_register_with_keras()

# Names are imported on first use (PEP 562), so that `import harmonization` and the command's `--help`, `list`
# and `info` do not pay for importing TensorFlow (~3 s). Everything below is what the package exposes.
_SUBMODULES = frozenset((
    "architectures", "batch", "convert", "data", "layers", "loader", "losses", "metrics", "mirrors", "model_card",
    "recipes", "run_dir", "saliency", "saliency_input", "saliency_methods", "second_order", "synthetic", "trainer",
    # The published 0.0.9 API, as its `harmonization/__init__.py` exposed it (thin layers over the native code).
    "common", "evaluation", "models", "training",
))
_NAMES = {
    "HarmonizedModel": "harmonization.harmonized_model",
    "gaussian_pyramid": "harmonization.losses",
    "harmonization_loss": "harmonization.losses",
    "pyramidal_mse": "harmonization.losses",
    "standardize_cut": "harmonization.losses",
    "evaluate_alignment": "harmonization.evaluation",
    "HUMAN_CEILING": "harmonization.metrics",
    "alignment_score": "harmonization.metrics",
    "dice": "harmonization.metrics",
    "iou": "harmonization.metrics",
    "spearman": "harmonization.metrics",
    "PresetError": "harmonization.presets",
    "load_model": "harmonization.loader",
    "save_preset": "harmonization.presets",
    "input_gradients": "harmonization.saliency",
    "saliency_map": "harmonization.saliency",
    "SaliencyInput": "harmonization.saliency_input",
    "SoftmaxOutputError": "harmonization.saliency_input",
    "exact_moments": "harmonization.second_order",
    "list_models": "harmonization.zoo",
    "train": "harmonization.trainer",
    "model_info": "harmonization.zoo",
}
__all__ = sorted((*_SUBMODULES, *_NAMES))


def __getattr__(name: str):
    import importlib

    if name in _SUBMODULES:
        value = importlib.import_module(f"harmonization.{name}")
    elif name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
    else:
        raise AttributeError(f"module 'harmonization' has no attribute {name!r}")
    globals()[name] = value  # later uses are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__version__ = "0.1.0"
