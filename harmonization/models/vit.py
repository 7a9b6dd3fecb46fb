"""0.0.9's module path for the harmonized ViT-B/16 loader (`harmonization.models.loaders`)."""

from harmonization.models.loaders import HARMONIZED_VITB16_WEIGHTS, load_ViT_B16  # noqa: F401
