"""EfficientNet (Tan & Le, 2019, https://arxiv.org/abs/1905.11946) as computed by the `efficientnet` package.

The published `efficientnetB0_harmonized.h5` is a Keras-2 full-model save of `efficientnet.keras.EfficientNetB0`
(qubvel): the same layer names as `keras.applications.EfficientNetB0`, but every convolution uses "same"
padding (keras.applications pads explicitly; the two agree only when every strided layer sees an even size)
and there is no normalisation layer inside the network. Batch normalisation uses
`harmonization.layers.BatchNormalization` (exact training-mode second derivatives).
"""

from __future__ import annotations

import math
import string
from typing import Any, Mapping

import keras

from harmonization.architectures.base import ImageClassifier
from harmonization.layers import BatchNormalization

__all__ = ["EfficientNet"]

# (kernel_size, repeats, filters_in, filters_out, expand_ratio, stride) of the seven B0 stages; SE ratio 0.25.
_B0_STAGES = (
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
)
_SE_RATIO = 0.25
_CONV_INIT = keras.initializers.VarianceScaling(2.0, mode="fan_out", distribution="truncated_normal")
_DENSE_INIT = keras.initializers.VarianceScaling(1.0 / 3.0, mode="fan_out", distribution="uniform")


def _round_filters(filters: int, width_coefficient: float, divisor: int = 8) -> int:
    filters *= width_coefficient
    rounded = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * filters:
        rounded += divisor
    return int(rounded)


def _round_repeats(repeats: int, depth_coefficient: float) -> int:
    return int(math.ceil(depth_coefficient * repeats))


def _mbconv(x, *, kernel_size, filters_in, filters_out, expand_ratio, stride, drop_rate, prefix):
    inputs = x
    filters = filters_in * expand_ratio
    if expand_ratio != 1:
        x = keras.layers.Conv2D(filters, 1, padding="same", use_bias=False, kernel_initializer=_CONV_INIT,
                                name=f"{prefix}expand_conv")(x)
        x = BatchNormalization(name=f"{prefix}expand_bn")(x)
        x = keras.layers.Activation("swish", name=f"{prefix}expand_activation")(x)
    x = keras.layers.DepthwiseConv2D(kernel_size, strides=stride, padding="same", use_bias=False,
                                     depthwise_initializer=_CONV_INIT, name=f"{prefix}dwconv")(x)
    x = BatchNormalization(name=f"{prefix}bn")(x)
    x = keras.layers.Activation("swish", name=f"{prefix}activation")(x)
    reduced = max(1, int(filters_in * _SE_RATIO))
    se = keras.layers.GlobalAveragePooling2D(keepdims=True, name=f"{prefix}se_squeeze")(x)
    se = keras.layers.Conv2D(reduced, 1, padding="same", activation="swish", kernel_initializer=_CONV_INIT,
                             name=f"{prefix}se_reduce")(se)
    se = keras.layers.Conv2D(filters, 1, padding="same", activation="sigmoid", kernel_initializer=_CONV_INIT,
                             name=f"{prefix}se_expand")(se)
    x = keras.layers.Multiply(name=f"{prefix}se_excite")([x, se])
    x = keras.layers.Conv2D(filters_out, 1, padding="same", use_bias=False, kernel_initializer=_CONV_INIT,
                            name=f"{prefix}project_conv")(x)
    x = BatchNormalization(name=f"{prefix}project_bn")(x)
    if stride == 1 and filters_in == filters_out:
        if drop_rate > 0:
            # Stochastic depth: drop the whole residual branch per example.
            x = keras.layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"{prefix}drop")(x)
        x = keras.layers.Add(name=f"{prefix}add")([x, inputs])
    return x


@keras.saving.register_keras_serializable(package="harmonization")
class EfficientNet(ImageClassifier):
    """EfficientNet image classifier; the defaults are B0 (5,330,564 parameters, 1000 classes).

    Args:
        image_size: int. Height and width of the input images. Defaults to 224.
        width_coefficient: float. Scales the number of filters (B0 1.0, B1 1.0, B2 1.1, ...). Defaults to 1.0.
        depth_coefficient: float. Scales the number of blocks per stage (B0 1.0, B1 1.1, ...). Defaults to 1.0.
        dropout_rate: float. Dropout before the head. Defaults to 0.2.
        drop_connect_rate: float. Stochastic-depth rate of the last block (linear in block index).
            Defaults to 0.2.
        num_classes: int. Number of logits. Defaults to 1000.
        include_top: bool. Keep the `predictions` layer; False returns the pooled features. Defaults to True.
        preprocess: bool or mapping. Take RGB in [0, 255] and normalise inside the model: True for the published
            ImageNet normalisation, a mapping {"scale", "mean", "std"} for another (a zoo entry's
            `preprocessing` gives it), False for the bare network. Defaults to True.
        name: str. Defaults to "efficientnet".

    Example:
        >>> model = harmonization.architectures.EfficientNet(image_size=32, width_coefficient=0.25,
        ...                                                  depth_coefficient=0.5)
    """

    def __init__(
        self,
        *,
        image_size: int = 224,
        width_coefficient: float = 1.0,
        depth_coefficient: float = 1.0,
        dropout_rate: float = 0.2,
        drop_connect_rate: float = 0.2,
        num_classes: int = 1000,
        include_top: bool = True,
        preprocess: bool | Mapping[str, Any] = True,
        name: str = "efficientnet",
        **kwargs,
    ):
        if width_coefficient <= 0 or depth_coefficient <= 0:
            raise ValueError(
                f"EfficientNet: coefficients must be positive, got width_coefficient={width_coefficient}, "
                f"depth_coefficient={depth_coefficient}."
            )
        inputs, x = self._begin(image_size, preprocess, "EfficientNet")
        x = keras.layers.Conv2D(_round_filters(32, width_coefficient), 3, strides=2, padding="same",
                                use_bias=False, kernel_initializer=_CONV_INIT, name="stem_conv")(x)
        x = BatchNormalization(name="stem_bn")(x)
        x = keras.layers.Activation("swish", name="stem_activation")(x)
        total = sum(_round_repeats(stage[1], depth_coefficient) for stage in _B0_STAGES)
        index = 0
        for stage, (kernel, repeats, f_in, f_out, expand, stride) in enumerate(_B0_STAGES, start=1):
            f_in, f_out = _round_filters(f_in, width_coefficient), _round_filters(f_out, width_coefficient)
            for repeat in range(_round_repeats(repeats, depth_coefficient)):
                x = _mbconv(
                    x,
                    kernel_size=kernel,
                    filters_in=f_in if repeat == 0 else f_out,
                    filters_out=f_out,
                    expand_ratio=expand,
                    stride=stride if repeat == 0 else 1,
                    drop_rate=drop_connect_rate * index / total,
                    prefix=f"block{stage}{string.ascii_lowercase[repeat]}_",
                )
                index += 1
        x = keras.layers.Conv2D(_round_filters(1280, width_coefficient), 1, padding="same", use_bias=False,
                                kernel_initializer=_CONV_INIT, name="top_conv")(x)
        x = BatchNormalization(name="top_bn")(x)
        x = keras.layers.Activation("swish", name="top_activation")(x)
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        if include_top and dropout_rate > 0:
            x = keras.layers.Dropout(dropout_rate, name="top_dropout")(x)
        outputs = self._head(x, num_classes, include_top, "EfficientNet")
        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)
        self._arguments = {
            "image_size": image_size,
            "width_coefficient": width_coefficient,
            "depth_coefficient": depth_coefficient,
            "dropout_rate": dropout_rate,
            "drop_connect_rate": drop_connect_rate,
            "num_classes": num_classes,
            "include_top": include_top,
            "preprocess": preprocess,
        }
