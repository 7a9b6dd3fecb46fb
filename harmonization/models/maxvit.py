"""0.0.9's module path for the harmonized MaxViT-Tiny loader (`harmonization.models.loaders`)."""

from harmonization.models.loaders import HARMONIZED_TINY_MAXVIT_WEIGHTS, load_tiny_MaxViT  # noqa: F401
