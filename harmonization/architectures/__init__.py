"""Native Keras 3 architectures of the harmonized model zoo, one module per family.

Importing this package registers every architecture (and its layers) as Keras-serialisable under the
`harmonization` package, which is what lets `load_model` rebuild them with `safe_mode=True`.
"""

from harmonization.architectures.base import ImageClassifier, ImageNetNormalization
from harmonization.architectures.convnext import ConvNeXt
from harmonization.architectures.efficientnet import EfficientNet
from harmonization.architectures.levit import LeViT
from harmonization.architectures.maxvit import MaxViT
from harmonization.architectures.resnet_v2 import ResNetV2
from harmonization.architectures.vgg import VGG
from harmonization.architectures.vit import ViT

__all__ = [
    "ConvNeXt",
    "EfficientNet",
    "ImageClassifier",
    "ImageNetNormalization",
    "LeViT",
    "MaxViT",
    "ResNetV2",
    "VGG",
    "ViT",
]
