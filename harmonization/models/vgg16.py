"""0.0.9's module path for the harmonized VGG16 loader (`harmonization.models.loaders`)."""

from harmonization.models.loaders import HARMONIZED_VGG16_WEIGHTS, load_VGG16  # noqa: F401
