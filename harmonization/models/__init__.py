"""The published 0.0.9 model API (serre-lab/Harmonization `harmonization/models`), and the zoo's entries.

`load_ViT_B16()`, `load_ResNet50()`, `load_VGG16()`, `load_EfficientNetB0()`, `load_tiny_ConvNeXT()`,
`load_tiny_MaxViT()`, `load_LeViT_small()` and `preprocess_input(images)` work as in 0.0.9 (see
`harmonization.models.loaders`); the zoo's JSON entries are installed here as `harmonization.models.entries`.
"""

from harmonization.models import loaders
from harmonization.models.loaders import (
    load_EfficientNetB0,
    load_LeViT_small,
    load_ResNet50,
    load_tiny_ConvNeXT,
    load_tiny_MaxViT,
    load_VGG16,
    load_ViT_B16,
)
from harmonization.models.preprocess import preprocess_input

__all__ = [*loaders.__all__, "preprocess_input"]
