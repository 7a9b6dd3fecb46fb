"""ConvNeXt (Liu et al., 2022, https://arxiv.org/abs/2201.03545), layer layout of keras-cv-attention-models 1.3.x.

The published `convnext_tiny_harmonized.h5` holds the weights of kecam's `ConvNeXtTiny` (182 weights,
28,589,128 parameters; layout in tests/fixtures/reference/kecam-1.3.9_convnext_tiny_weights.tsv): 7x7 depthwise
convolution, LayerNorm (epsilon 1e-6), Dense 4x -> exact GELU -> Dense, per-channel layer scale `gamma`,
residual add. LayerNorm is `harmonization.layers.LayerNormalization` (exact second derivatives).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import keras

from harmonization.architectures.base import ImageClassifier
from harmonization.layers import LayerNormalization

__all__ = ["ConvNeXt", "LayerScale"]

_LN_EPSILON = 1e-6


@keras.saving.register_keras_serializable(package="harmonization")
class LayerScale(keras.layers.Layer):
    """Multiplies the last axis by a learned vector `weight` (kecam's `ChannelAffine` without bias).

    Args:
        init_value: float. Initial value of every entry of `weight`. Defaults to 1e-6.
    """

    def __init__(self, init_value: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.init_value = float(init_value)

    def build(self, input_shape):
        self.weight = self.add_weight(
            shape=(input_shape[-1],), initializer=keras.initializers.Constant(self.init_value), name="weight"
        )

    def call(self, inputs):
        return inputs * self.weight

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "init_value": self.init_value}


def _block(x, channels: int, *, layer_scale_init: float, drop_rate: float, name: str):
    shortcut = x
    x = keras.layers.DepthwiseConv2D(7, padding="same", use_bias=True, name=f"{name}dw_conv")(x)
    x = LayerNormalization(epsilon=_LN_EPSILON, name=f"{name}ln")(x)
    x = keras.layers.Dense(4 * channels, name=f"{name}up_dense")(x)
    x = keras.layers.Activation("gelu", name=f"{name}gelu")(x)  # Keras' "gelu" is the exact (erf) GELU
    x = keras.layers.Dense(channels, name=f"{name}down_dense")(x)
    x = LayerScale(layer_scale_init, name=f"{name}gamma")(x)
    if drop_rate > 0:
        x = keras.layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"{name}drop")(x)
    return keras.layers.Add(name=f"{name}output")([shortcut, x])


@keras.saving.register_keras_serializable(package="harmonization")
class ConvNeXt(ImageClassifier):
    """ConvNeXt image classifier; the defaults are ConvNeXt-Tiny (28,589,128 parameters, 1000 classes).

    Args:
        image_size: int. Height and width of the input images. Defaults to 224.
        depths: sequence of ints. Blocks per stage. Defaults to [3, 3, 9, 3] (Tiny).
        widths: sequence of ints. Channels per stage. Defaults to [96, 192, 384, 768] (Tiny).
        layer_scale_init: float. Initial layer-scale value. Defaults to 1e-6.
        drop_connect_rate: float. Stochastic-depth rate reached at the last block. Defaults to 0.1.
        num_classes: int. Number of logits. Defaults to 1000.
        include_top: bool. Keep the `predictions` layer; False returns the pooled, normalised features
            (`head_ln`). Defaults to True.
        preprocess: bool or mapping. Take RGB in [0, 255] and normalise inside the model: True for the published
            ImageNet normalisation, a mapping {"scale", "mean", "std"} for another (a zoo entry's
            `preprocessing` gives it), False for the bare network. Defaults to True.
        name: str. Defaults to "convnext".

    Example:
        >>> model = harmonization.architectures.ConvNeXt(image_size=32, depths=[1, 1, 1, 1], widths=[8, 8, 16, 16])
    """

    def __init__(
        self,
        *,
        image_size: int = 224,
        depths: Sequence[int] = (3, 3, 9, 3),
        widths: Sequence[int] = (96, 192, 384, 768),
        layer_scale_init: float = 1e-6,
        drop_connect_rate: float = 0.1,
        num_classes: int = 1000,
        include_top: bool = True,
        preprocess: bool | Mapping[str, Any] = True,
        name: str = "convnext",
        **kwargs,
    ):
        if len(depths) != len(widths) or not depths:
            raise ValueError(
                f"ConvNeXt: `depths` and `widths` need one entry per stage; got {list(depths)} and {list(widths)}."
            )
        inputs, x = self._begin(image_size, preprocess, "ConvNeXt")
        x = keras.layers.Conv2D(widths[0], 4, strides=4, padding="valid", name="stem_conv")(x)
        x = LayerNormalization(epsilon=_LN_EPSILON, name="stem_ln")(x)
        total, index = sum(depths), 0
        for stage, (depth, width) in enumerate(zip(depths, widths), start=1):
            if stage > 1:
                x = LayerNormalization(epsilon=_LN_EPSILON, name=f"stack{stage}_downsample_ln")(x)
                x = keras.layers.Conv2D(width, 2, strides=2, name=f"stack{stage}_downsample_conv")(x)
            for block in range(1, depth + 1):
                x = _block(
                    x,
                    width,
                    layer_scale_init=layer_scale_init,
                    drop_rate=drop_connect_rate * index / total,
                    name=f"stack{stage}_block{block}_",
                )
                index += 1
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = LayerNormalization(epsilon=_LN_EPSILON, name="head_ln")(x)
        outputs = self._head(x, num_classes, include_top, "ConvNeXt")
        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)
        self._arguments = {
            "image_size": image_size,
            "depths": list(depths),
            "widths": list(widths),
            "layer_scale_init": layer_scale_init,
            "drop_connect_rate": drop_connect_rate,
            "num_classes": num_classes,
            "include_top": include_top,
            "preprocess": preprocess,
        }
