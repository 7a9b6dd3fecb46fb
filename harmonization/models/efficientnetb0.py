"""0.0.9's module path for the harmonized EfficientNetB0 loader (`harmonization.models.loaders`)."""

from harmonization.models.loaders import HARMONIZED_EFFICIENTNETB0_WEIGHTS, load_EfficientNetB0  # noqa: F401
