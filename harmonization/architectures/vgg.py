"""VGG (Simonyan & Zisserman, 2015, https://arxiv.org/abs/1409.1556), layer names of `keras.applications.VGG16`.

The published `vgg16_harmonized.h5` is a Keras-2 full-model save of that network with a linear head.
VGG has no normalisation layer, so its second derivatives are exact as is.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import keras

from harmonization.architectures.base import ImageClassifier

__all__ = ["VGG"]


@keras.saving.register_keras_serializable(package="harmonization")
class VGG(ImageClassifier):
    """VGG image classifier; the defaults are VGG16 (138,357,544 parameters at 224x224, 1000 classes).

    Args:
        image_size: int. Height and width of the input images. Defaults to 224.
        block_convs: sequence of ints. 3x3 convolutions per block ([2, 2, 3, 3, 3] is VGG16,
            [2, 2, 4, 4, 4] VGG19). Defaults to VGG16.
        block_filters: sequence of ints. Filters of each block. Defaults to [64, 128, 256, 512, 512].
        fc_units: int. Width of the two fully connected layers `fc1`, `fc2`. Defaults to 4096.
        num_classes: int. Number of logits. Defaults to 1000.
        include_top: bool. Keep the `predictions` layer; False returns the `fc2` features. Defaults to True.
        preprocess: bool or mapping. Take RGB in [0, 255] and normalise inside the model: True for the published
            ImageNet normalisation, a mapping {"scale", "mean", "std"} for another (a zoo entry's
            `preprocessing` gives it), False for the bare network. Defaults to True.
        name: str. Defaults to "vgg".

    Example:
        >>> model = harmonization.architectures.VGG(image_size=32, block_filters=[4, 8, 8, 8, 8], fc_units=16)
    """

    def __init__(
        self,
        *,
        image_size: int = 224,
        block_convs: Sequence[int] = (2, 2, 3, 3, 3),
        block_filters: Sequence[int] = (64, 128, 256, 512, 512),
        fc_units: int = 4096,
        num_classes: int = 1000,
        include_top: bool = True,
        preprocess: bool | Mapping[str, Any] = True,
        name: str = "vgg",
        **kwargs,
    ):
        if len(block_convs) != len(block_filters):
            raise ValueError(
                f"VGG: `block_convs` and `block_filters` need one entry per block; got {list(block_convs)} "
                f"and {list(block_filters)}."
            )
        inputs, x = self._begin(image_size, preprocess, "VGG")
        for block, (convs, filters) in enumerate(zip(block_convs, block_filters), start=1):
            for conv in range(1, convs + 1):
                x = keras.layers.Conv2D(
                    filters, 3, padding="same", activation="relu", name=f"block{block}_conv{conv}"
                )(x)
            x = keras.layers.MaxPooling2D(2, strides=2, name=f"block{block}_pool")(x)
        x = keras.layers.Flatten(name="flatten")(x)
        x = keras.layers.Dense(fc_units, activation="relu", name="fc1")(x)
        x = keras.layers.Dense(fc_units, activation="relu", name="fc2")(x)
        outputs = self._head(x, num_classes, include_top, "VGG")
        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)
        self._arguments = {
            "image_size": image_size,
            "block_convs": list(block_convs),
            "block_filters": list(block_filters),
            "fc_units": fc_units,
            "num_classes": num_classes,
            "include_top": include_top,
            "preprocess": preprocess,
        }
