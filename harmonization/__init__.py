"""Harmonization Hub: train and use vision models whose feature importance agrees with humans.

The neural harmonizer (Fel et al., NeurIPS 2022, arXiv 2211.04533) as a Keras 3 / TensorFlow library.
"""

import os as _os

from harmonization._conflicts import check_no_published_package as _check_no_published_package

# Before anything else: with 0.0.9 installed too, the files under harmonization/ are a mix of both.
_check_no_published_package()

_os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from harmonization import (  # noqa: E402
    architectures,
    convert,
    data,
    layers,
    losses,
    metrics,
    mirrors,
    model_card,
    saliency,
    saliency_input,
    second_order,
    synthetic,
)

# The published 0.0.9 API, as its `harmonization/__init__.py` exposed it (thin layers over the native code).
from harmonization import common, evaluation, models, training  # noqa: E402
from harmonization.harmonized_model import HarmonizedModel  # noqa: E402
from harmonization.losses import (  # noqa: E402
    gaussian_pyramid,
    harmonization_loss,
    pyramidal_mse,
    standardize_cut,
)
from harmonization.evaluation import evaluate_alignment  # noqa: E402
from harmonization.metrics import HUMAN_CEILING, alignment_score, dice, iou, spearman  # noqa: E402
from harmonization.presets import PresetError, load_model, save_preset  # noqa: E402
from harmonization.saliency import input_gradients, saliency_map  # noqa: E402
from harmonization.saliency_input import SaliencyInput, SoftmaxOutputError  # noqa: E402
from harmonization.second_order import exact_moments  # noqa: E402
from harmonization.zoo import list_models, model_info  # noqa: E402

__version__ = "0.1.0"
