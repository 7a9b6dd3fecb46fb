"""0.0.9's module path for the harmonized LeViT-128 loader (`harmonization.models.loaders`)."""

from harmonization.models.loaders import HARMONIZED_LEVIT_SMALL_WEIGHTS, load_LeViT_small  # noqa: F401
