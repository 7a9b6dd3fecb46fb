"""0.0.9's module path for the harmonized ResNet50V2 loader (`harmonization.models.loaders`)."""

from harmonization.models.loaders import HARMONIZED_RESNET50_WEIGHTS, load_ResNet50  # noqa: F401
