"""The published model loaders (serre-lab/Harmonization 0.0.9, `harmonization/models/*.py`), on the zoo.

Each `load_*()` returns what 0.0.9 returned: the **bare** network, whose input is
`harmonization.models.preprocess_input(images)` (no preprocessing layer inside), with the published
harmonized weights and the original's output: logits, except `load_EfficientNetB0`, whose published file ends
in a softmax (so it returns probabilities). The weights come through `harmonization.load_model`: the zoo's Hub
repo when it exists, else the published `.h5` (from `HARMONIZATION_MODELS_URL` when set) converted once into
a cached preset. None of 0.0.9's dependencies (vit-keras, keras-cv-attention-models, efficientnet) is needed.

For new code, `harmonization.load_model(name)` gives the same network with its preprocessing inside (raw
RGB in [0, 255]) and logits for every model.
"""

from __future__ import annotations

import keras

from harmonization import loader, zoo
from harmonization.mirrors import PUBLISHED_MODELS_URL

__all__ = [
    "load_EfficientNetB0",
    "load_LeViT_small",
    "load_ResNet50",
    "load_VGG16",
    "load_ViT_B16",
    "load_tiny_ConvNeXT",
    "load_tiny_MaxViT",
]

# The published URLs (0.0.9's constants); tests/test_published_api.py checks them against the zoo entries.
HARMONIZED_RESNET50_WEIGHTS = f"{PUBLISHED_MODELS_URL}/resnet50v2_harmonized.h5"
HARMONIZED_EFFICIENTNETB0_WEIGHTS = f"{PUBLISHED_MODELS_URL}/efficientnetB0_harmonized.h5"
HARMONIZED_VGG16_WEIGHTS = f"{PUBLISHED_MODELS_URL}/vgg16_harmonized.h5"
HARMONIZED_VITB16_WEIGHTS = f"{PUBLISHED_MODELS_URL}/vit-b16_harmonized.h5"
HARMONIZED_TINY_CONVNEXT_WEIGHTS = f"{PUBLISHED_MODELS_URL}/convnext_tiny_harmonized.h5"
HARMONIZED_TINY_MAXVIT_WEIGHTS = f"{PUBLISHED_MODELS_URL}/maxvit_tiny_harmonized.h5"
HARMONIZED_LEVIT_SMALL_WEIGHTS = f"{PUBLISHED_MODELS_URL}/levit_small_harmonized.h5"


def load_published(zoo_name: str) -> keras.Model:
    """Zoo model `zoo_name` as 0.0.9 returned it: the bare network, with the original file's output."""
    entry = zoo.model_info(zoo_name)
    network = loader.load_entry(entry, preprocess=False)
    if entry["output"]["original"] == "logits":
        return network
    # The published file's last layer applied a softmax; ours returns its logits.
    probabilities = keras.layers.Softmax(name="probabilities")(network.output)
    model = keras.Model(network.input, probabilities, name=network.name)
    model.class_names = getattr(network, "class_names", None)
    return model


def load_ResNet50() -> keras.Model:
    """The harmonized ResNet50V2: logits of `preprocess_input(images)` (224x224)."""
    return load_published("resnet50v2_harmonized")


def load_EfficientNetB0() -> keras.Model:
    """The harmonized EfficientNetB0: softmax probabilities of `preprocess_input(images)`, as published."""
    return load_published("efficientnet_b0_harmonized")


def load_VGG16() -> keras.Model:
    """The harmonized VGG16: logits of `preprocess_input(images)`."""
    return load_published("vgg16_harmonized")


def load_ViT_B16() -> keras.Model:
    """The harmonized ViT-B/16: logits of `preprocess_input(images)`."""
    return load_published("vit_b16_harmonized")


def load_tiny_ConvNeXT() -> keras.Model:
    """The harmonized ConvNeXt-Tiny: logits of `preprocess_input(images)`."""
    return load_published("convnext_tiny_harmonized")


def load_tiny_MaxViT() -> keras.Model:
    """The harmonized MaxViT-Tiny: logits of `preprocess_input(images)`."""
    return load_published("maxvit_tiny_harmonized")


def load_LeViT_small() -> keras.Model:
    """The harmonized LeViT-128 ("LeViT small" in 0.0.9): logits of `preprocess_input(images)`."""
    return load_published("levit128_harmonized")
