"""0.0.9's module path for the harmonized ConvNeXt-Tiny loader (`harmonization.models.loaders`)."""

from harmonization.models.loaders import HARMONIZED_TINY_CONVNEXT_WEIGHTS, load_tiny_ConvNeXT  # noqa: F401
