"""ResNet V2 (He et al., 2016, https://arxiv.org/abs/1603.05027), layer names of `keras.applications.ResNet50V2`.

Pre-activation bottleneck blocks; the published `resnet50v2_harmonized.h5` is a Keras-2 full-model save of
`ResNet50V2` with a linear head. Batch normalisation uses `harmonization.layers.BatchNormalization`, whose
training-mode second derivatives are exact, so the model can keep being harmonized.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import keras

from harmonization.architectures.base import ImageClassifier
from harmonization.layers import BatchNormalization

__all__ = ["ResNetV2"]

_BN_EPSILON = 1.001e-5  # keras.applications' value


def _block(x, filters: int, *, stride: int, conv_shortcut: bool, name: str):
    preact = BatchNormalization(epsilon=_BN_EPSILON, name=f"{name}_preact_bn")(x)
    preact = keras.layers.Activation("relu", name=f"{name}_preact_relu")(preact)
    if conv_shortcut:
        shortcut = keras.layers.Conv2D(4 * filters, 1, strides=stride, name=f"{name}_0_conv")(preact)
    elif stride > 1:
        shortcut = keras.layers.MaxPooling2D(1, strides=stride, name=f"{name}_0_pool")(x)
    else:
        shortcut = x
    y = keras.layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_1_conv")(preact)
    y = BatchNormalization(epsilon=_BN_EPSILON, name=f"{name}_1_bn")(y)
    y = keras.layers.Activation("relu", name=f"{name}_1_relu")(y)
    y = keras.layers.ZeroPadding2D(1, name=f"{name}_2_pad")(y)
    y = keras.layers.Conv2D(filters, 3, strides=stride, use_bias=False, name=f"{name}_2_conv")(y)
    y = BatchNormalization(epsilon=_BN_EPSILON, name=f"{name}_2_bn")(y)
    y = keras.layers.Activation("relu", name=f"{name}_2_relu")(y)
    y = keras.layers.Conv2D(4 * filters, 1, name=f"{name}_3_conv")(y)
    return keras.layers.Add(name=f"{name}_out")([shortcut, y])


@keras.saving.register_keras_serializable(package="harmonization")
class ResNetV2(ImageClassifier):
    """ResNet V2 image classifier; the defaults are ResNet50V2 (25,613,800 parameters, 1000 classes).

    Args:
        image_size: int. Height and width of the input images. Defaults to 224.
        stack_blocks: sequence of ints. Bottleneck blocks per stage ([3, 4, 6, 3] is ResNet50V2,
            [3, 4, 23, 3] ResNet101V2, [3, 8, 36, 3] ResNet152V2). Defaults to ResNet50V2.
        stack_filters: sequence of ints. Bottleneck width per stage (outputs are 4x). Defaults to
            [64, 128, 256, 512].
        stem_filters: int. Filters of the 7x7 stem convolution. Defaults to 64.
        num_classes: int. Number of logits. Defaults to 1000.
        include_top: bool. Keep the `predictions` layer; False returns the pooled features. Defaults to True.
        preprocess: bool or mapping. Take RGB in [0, 255] and normalise inside the model: True for the published
            ImageNet normalisation, a mapping {"scale", "mean", "std"} for another (a zoo entry's
            `preprocessing` gives it), False for the bare network. Defaults to True.
        name: str. Defaults to "resnet_v2".

    Example:
        >>> model = harmonization.architectures.ResNetV2(image_size=32, stack_blocks=[1, 1, 1, 1],
        ...                                              stack_filters=[4, 4, 8, 8], stem_filters=4)
    """

    def __init__(
        self,
        *,
        image_size: int = 224,
        stack_blocks: Sequence[int] = (3, 4, 6, 3),
        stack_filters: Sequence[int] = (64, 128, 256, 512),
        stem_filters: int = 64,
        num_classes: int = 1000,
        include_top: bool = True,
        preprocess: bool | Mapping[str, Any] = True,
        name: str = "resnet_v2",
        **kwargs,
    ):
        if len(stack_blocks) != len(stack_filters) or min(stack_blocks, default=0) < 1:
            raise ValueError(
                "ResNetV2: `stack_blocks` (each >= 1) and `stack_filters` need one entry per stage; got "
                f"{list(stack_blocks)} and {list(stack_filters)}."
            )
        inputs, x = self._begin(image_size, preprocess, "ResNetV2")
        x = keras.layers.ZeroPadding2D(3, name="conv1_pad")(x)
        x = keras.layers.Conv2D(stem_filters, 7, strides=2, name="conv1_conv")(x)
        x = keras.layers.ZeroPadding2D(1, name="pool1_pad")(x)
        x = keras.layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
        last = len(stack_blocks) - 1
        for stage, (blocks, filters) in enumerate(zip(stack_blocks, stack_filters)):
            name_prefix = f"conv{stage + 2}"
            # keras.applications downsamples at the *last* block of every stage but the last one.
            stride = 1 if stage == last else 2
            for block in range(1, blocks + 1):
                x = _block(
                    x,
                    filters,
                    stride=stride if block == blocks else 1,
                    conv_shortcut=block == 1,
                    name=f"{name_prefix}_block{block}",
                )
        x = BatchNormalization(epsilon=_BN_EPSILON, name="post_bn")(x)
        x = keras.layers.Activation("relu", name="post_relu")(x)
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        outputs = self._head(x, num_classes, include_top, "ResNetV2")
        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)
        self._arguments = {
            "image_size": image_size,
            "stack_blocks": list(stack_blocks),
            "stack_filters": list(stack_filters),
            "stem_filters": stem_filters,
            "num_classes": num_classes,
            "include_top": include_top,
            "preprocess": preprocess,
        }
