"""MaxViT (Tu et al., 2022, https://arxiv.org/abs/2204.01697), as keras-cv-attention-models 1.3.x computes it.

The published `maxvit_tiny_harmonized.h5` holds the weights of kecam's `MaxViT_Tiny` (526 weights,
30,964,144 parameters; layout in tests/fixtures/reference/kecam-1.3.9_maxvit_tiny_weights.tsv). Each block is
an MBConv (pre-activation BatchNorm, 1x1 expand, 3x3 depthwise, squeeze-excite, 1x1 project, average-pool
shortcut when strided), then attention inside non-overlapping windows ("block"), then attention across a
dilated grid ("grid"), each followed by an MLP. What matters to reproduce kecam exactly:

- GELU is the tanh approximation everywhere; SE uses swish; LayerNorm epsilon is 1e-5, BatchNorm 1e-3;
- padding is TensorFlow "same" (asymmetric for stride 2), the strided shortcut an average pool ("same");
- windows are `ceil(image_size / 32)` pixels, clipped to the feature map; a map that is not a multiple of the
  window is zero-padded at the bottom/right before partitioning and cropped after, with no attention mask;
- the relative position bias table is (heads, (2h-1)(2w-1)), indexed as kecam builds its index (from
  `meshgrid` in "xy" order, which transposes the token grid), and queries/keys/values come from one 1x1 conv;
- the head is avg-pool, LayerNorm, Dense(width) + tanh ("features"), Dense(classes).

Layer names are kecam's with "/" replaced by "_" (Keras 3 forbids "/" in names), so `harmonization.convert`
maps the published weights by name. Normalisation layers come from `harmonization.layers` (exact second
derivatives), so the model can keep being harmonized.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import keras
import numpy as np
from keras import ops

from harmonization._numbers import is_int
from harmonization.architectures.base import ImageClassifier
from harmonization.layers import BatchNormalization, LayerNormalization

__all__ = ["MaxViT", "RelativePositionalBias", "WindowAttention", "gelu_approximate"]

_LN_EPSILON = 1e-5  # kecam LAYER_NORM_EPSILON
_BN_EPSILON = 1e-3  # kecam MaxViT without torch mode
_BN_MOMENTUM = 0.99


@keras.saving.register_keras_serializable(package="harmonization")
def gelu_approximate(x):
    """GELU, tanh approximation (kecam's "gelu/app", TensorFlow's `gelu(approximate=True)`)."""
    return keras.activations.gelu(x, approximate=True)


def _make_divisible(value: float, divisor: int = 8, limit_round_down: float = 0.9) -> int:
    """Round `value` to a multiple of `divisor`, never below 90% of it (kecam's SE width rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < limit_round_down * value:
        rounded += divisor
    return rounded


def relative_position_index(height: int, width: int) -> np.ndarray:
    """(tokens, tokens) index into the (2h-1)(2w-1) bias table, built as kecam builds it.

    kecam takes `meshgrid(range(height), range(width))` in "xy" order, so token `t` of the flattened
    (height, width) window is given the coordinates (t % height, t // height).
    """
    hh, ww = np.meshgrid(np.arange(height), np.arange(width))
    coords = np.stack([hh, ww], axis=-1).reshape(-1, 2)
    relative = coords[:, None, :] - coords[None, :, :]
    return (relative[..., 0] + height - 1) + (relative[..., 1] + width - 1) * (2 * height - 1)


@keras.saving.register_keras_serializable(package="harmonization")
class RelativePositionalBias(keras.layers.Layer):
    """Adds a learned per-head relative position bias to (batch, heads, tokens, tokens) attention scores.

    Args:
        height: int. Window height in tokens.
        width: int. Window width in tokens.
    """

    def __init__(self, height: int, width: int, **kwargs):
        super().__init__(**kwargs)
        self.height = int(height)
        self.width = int(width)
        self._index = relative_position_index(self.height, self.width).astype("int32")

    def build(self, input_shape):
        heads = input_shape[1]
        self.positional_embedding = self.add_weight(
            shape=(heads, (2 * self.height - 1) * (2 * self.width - 1)), initializer="zeros",
            name="positional_embedding",
        )

    def call(self, scores):
        bias = ops.take(self.positional_embedding, ops.convert_to_tensor(self._index), axis=1)
        return scores + ops.cast(bias, scores.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "height": self.height, "width": self.width}


@keras.saving.register_keras_serializable(package="harmonization")
class WindowAttention(keras.layers.Layer):
    """Multi-head self-attention inside windows ("block") or across a dilated grid ("grid") of a feature map.

    The map is zero-padded to a multiple of the window, partitioned, attended with a relative position bias
    (queries, keys and values from one 1x1 convolution `qkv_conv`, output projection `output`), merged back
    and cropped, as kecam's `window_attention` with `mhsa_with_multi_head_relative_position_embedding`.

    Args:
        window_size: int. Side of a window (or of the grid), clipped to the feature map.
        head_dim: int. Channels per head; the number of heads is channels // head_dim.
        grid: bool. Attend across a grid of stride map_size / window_size instead of inside windows.
    """

    def __init__(self, window_size: int, head_dim: int, grid: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.window_size = int(window_size)
        self.head_dim = int(head_dim)
        self.grid = bool(grid)

    def build(self, input_shape):
        _, height, width, channels = input_shape
        if height is None or width is None:
            raise ValueError(f"{self.name}: WindowAttention needs a known feature-map size, got {input_shape}.")
        if channels % self.head_dim:
            raise ValueError(f"{self.name}: {channels} channels are not divisible by head_dim={self.head_dim}.")
        self.num_heads = channels // self.head_dim
        self.window_height = min(self.window_size, height)
        self.window_width = min(self.window_size, width)
        self.patches_height = math.ceil(height / self.window_height)
        self.patches_width = math.ceil(width / self.window_width)
        window_shape = (None, self.window_height, self.window_width, channels)
        # Created in kecam's order, so the variables come out in the published order.
        self.qkv_conv = keras.layers.Conv2D(3 * channels, 1, use_bias=True, name="qkv_conv")
        self.qkv_conv.build(window_shape)
        tokens = self.window_height * self.window_width
        self.pos_emb = RelativePositionalBias(self.window_height, self.window_width, name="pos_emb")
        self.pos_emb.build((None, self.num_heads, tokens, tokens))
        self.output_dense = keras.layers.Dense(channels, use_bias=True, name="output")
        self.output_dense.build(window_shape)

    def _partition(self, x, channels):
        ph, pw, wh, ww = self.patches_height, self.patches_width, self.window_height, self.window_width
        if self.grid:  # rows are (window row, patch row): tokens of one window are `patches` apart
            x = ops.reshape(x, (-1, wh, ph, ww, pw, channels))
            x = ops.transpose(x, (0, 2, 4, 1, 3, 5))
        else:
            x = ops.reshape(x, (-1, ph, wh, pw, ww, channels))
            x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
        return ops.reshape(x, (-1, wh * ww, channels))

    def _merge(self, x, channels):
        ph, pw, wh, ww = self.patches_height, self.patches_width, self.window_height, self.window_width
        x = ops.reshape(x, (-1, ph, pw, wh, ww, channels))
        if self.grid:
            x = ops.transpose(x, (0, 3, 1, 4, 2, 5))
        else:
            x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
        return ops.reshape(x, (-1, ph * wh, pw * ww, channels))

    def call(self, inputs):
        _, height, width, channels = inputs.shape
        pad_h = self.patches_height * self.window_height - height
        pad_w = self.patches_width * self.window_width - width
        x = ops.pad(inputs, ((0, 0), (0, pad_h), (0, pad_w), (0, 0))) if pad_h or pad_w else inputs
        windows = self._partition(x, channels)  # (batch * windows, tokens, channels)
        qkv = self.qkv_conv(ops.reshape(windows, (-1, self.window_height, self.window_width, channels)))
        qkv = ops.reshape(qkv, (-1, self.window_height * self.window_width, 3 * channels))
        query, key, value = ops.split(qkv, 3, axis=-1)

        def heads(t):
            t = ops.reshape(t, (-1, self.window_height * self.window_width, self.num_heads, self.head_dim))
            return ops.transpose(t, (0, 2, 1, 3))

        query, key, value = heads(query), heads(key), heads(value)
        scale = float(1.0 / np.sqrt(np.float32(self.head_dim)))
        scores = ops.matmul(query, ops.transpose(key, (0, 1, 3, 2))) * scale
        attention = ops.softmax(self.pos_emb(scores), axis=-1)
        attended = ops.transpose(ops.matmul(attention, value), (0, 2, 1, 3))
        attended = ops.reshape(attended, (-1, self.window_height, self.window_width, channels))
        attended = self.output_dense(attended)
        merged = self._merge(ops.reshape(attended, (-1, self.window_height * self.window_width, channels)), channels)
        return merged[:, :height, :width, :] if pad_h or pad_w else merged

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "window_size": self.window_size, "head_dim": self.head_dim,
                "grid": self.grid}


def _batch_norm(x, name, activation=None):
    x = BatchNormalization(epsilon=_BN_EPSILON, momentum=_BN_MOMENTUM, name=f"{name}bn")(x)
    return keras.layers.Activation(activation, name=f"{name}gelu")(x) if activation else x


def _drop_path(x, rate: float, name: str):
    return keras.layers.Dropout(rate, noise_shape=(None, 1, 1, 1), name=name)(x) if rate > 0 else x


def _mbconv(x, width: int, *, stride: int, conv_shortcut: bool, expansion: int, se_ratio: float, drop_rate: float,
            name: str):
    shortcut = x
    if stride > 1:
        shortcut = keras.layers.AveragePooling2D(stride, strides=stride, padding="same",
                                                 name=f"{name}shortcut_pool")(shortcut)
    if conv_shortcut:
        shortcut = keras.layers.Conv2D(width, 1, use_bias=True, name=f"{name}shortcut_conv")(shortcut)
    y = _batch_norm(x, f"{name}preact_")
    y = keras.layers.Conv2D(width * expansion, 1, use_bias=False, name=f"{name}expand_conv")(y)
    y = _batch_norm(y, f"{name}expand_", gelu_approximate)
    y = keras.layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False, name=f"{name}MB_dw_conv")(y)
    y = _batch_norm(y, f"{name}MB_dw_", gelu_approximate)
    if se_ratio:
        channels = width * expansion
        reduced = _make_divisible(channels * se_ratio / expansion)
        se = keras.layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}se_squeeze")(y)
        se = keras.layers.Conv2D(reduced, 1, use_bias=True, activation="swish", name=f"{name}se_1_conv")(se)
        se = keras.layers.Conv2D(channels, 1, use_bias=True, activation="sigmoid", name=f"{name}se_2_conv")(se)
        y = keras.layers.Multiply(name=f"{name}se_out")([y, se])
    y = keras.layers.Conv2D(width, 1, use_bias=True, name=f"{name}MB_pw_conv")(y)
    y = _drop_path(y, drop_rate, f"{name}drop")
    return keras.layers.Add(name=f"{name}output")([shortcut, y])


def _attention_ffn(x, *, window_size: int, head_dim: int, expansion: int, grid: bool, drop_rate: float, name: str):
    channels = x.shape[-1]
    y = LayerNormalization(epsilon=_LN_EPSILON, name=f"{name}attn_preact_ln")(x)
    y = WindowAttention(window_size, head_dim, grid=grid, name=f"{name}window_mhsa")(y)
    y = _drop_path(y, drop_rate, f"{name}attn_drop")
    x = keras.layers.Add(name=f"{name}attn_output")([x, y])
    y = LayerNormalization(epsilon=_LN_EPSILON, name=f"{name}ffn_preact_ln")(x)
    y = keras.layers.Dense(channels * expansion, name=f"{name}ffn_1_dense")(y)
    y = keras.layers.Activation(gelu_approximate, name=f"{name}gelu")(y)
    y = keras.layers.Dense(channels, name=f"{name}ffn_2_dense")(y)
    y = _drop_path(y, drop_rate, f"{name}ffn_drop")
    return keras.layers.Add(name=f"{name}ffn_output")([x, y])


@keras.saving.register_keras_serializable(package="harmonization")
class MaxViT(ImageClassifier):
    """MaxViT image classifier; the defaults are MaxViT-Tiny (30,964,144 parameters, 1000 classes).

    Args:
        image_size: int. Height and width of the input images. Defaults to 224.
        depths: sequence of ints. Blocks per stage. Defaults to [2, 2, 5, 2] (Tiny).
        widths: sequence of ints. Channels per stage. Defaults to [64, 128, 256, 512] (Tiny).
        stem_width: int. Channels of the two stem convolutions. Defaults to 64.
        head_dim: int. Channels per attention head. Defaults to 32.
        window_size: int or None. Side of the attention windows and grid; None takes kecam's
            `ceil(image_size / 32)` (7 at 224). Defaults to None.
        expansion: int. MBConv and MLP expansion. Defaults to 4.
        se_ratio: float. Squeeze-excite ratio of the MBConv input (0 disables it). Defaults to 0.25.
        drop_connect_rate: float. Stochastic-depth rate reached at the last block. Defaults to 0 (kecam).
        dropout_rate: float. Dropout before the classifier. Defaults to 0 (kecam).
        num_classes: int. Number of logits. Defaults to 1000.
        include_top: bool. Keep the `predictions` layer; False returns the tanh pre-logits (`features`).
            Defaults to True.
        preprocess: bool or mapping. Take RGB in [0, 255] and normalise inside the model: True for the published
            ImageNet normalisation, a mapping {"scale", "mean", "std"} for another (a zoo entry's
            `preprocessing` gives it), False for the bare network. Defaults to True.
        name: str. Defaults to "maxvit".

    Example:
        >>> model = harmonization.architectures.MaxViT(image_size=64, depths=[1, 1, 1], widths=[8, 8, 16],
        ...                                            stem_width=8, head_dim=4, window_size=6)
    """

    def __init__(
        self,
        *,
        image_size: int = 224,
        depths: Sequence[int] = (2, 2, 5, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        stem_width: int = 64,
        head_dim: int = 32,
        window_size: int | None = None,
        expansion: int = 4,
        se_ratio: float = 0.25,
        drop_connect_rate: float = 0.0,
        dropout_rate: float = 0.0,
        num_classes: int = 1000,
        include_top: bool = True,
        preprocess: bool | Mapping[str, Any] = True,
        name: str = "maxvit",
        **kwargs,
    ):
        if len(depths) != len(widths) or not depths or min(depths) < 1:
            raise ValueError(
                f"MaxViT: `depths` (each >= 1) and `widths` need one entry per stage; got {list(depths)} and "
                f"{list(widths)}."
            )
        bad = [w for w in widths if w % head_dim]
        if bad:
            raise ValueError(f"MaxViT: every width must be divisible by `head_dim` ({head_dim}); got {list(widths)}.")
        inputs, x = self._begin(image_size, preprocess, "MaxViT")
        window = window_size if window_size is not None else math.ceil(image_size / 32)
        if not is_int(window) or window < 1:
            raise ValueError(f"MaxViT: `window_size` must be a positive int or None, got {window_size!r}.")
        x = keras.layers.Conv2D(stem_width, 3, strides=2, padding="same", use_bias=True, name="stem_1_conv")(x)
        x = _batch_norm(x, "stem_1_", gelu_approximate)
        x = keras.layers.Conv2D(stem_width, 3, strides=1, padding="same", use_bias=True, name="stem_2_conv")(x)
        total, index = sum(depths), 0
        for stage, (depth, width) in enumerate(zip(depths, widths), start=1):
            for block in range(1, depth + 1):
                prefix = f"stack_{stage}_block_{block}_"
                drop_rate = drop_connect_rate * index / total
                x = _mbconv(x, width, stride=2 if block == 1 else 1,
                            conv_shortcut=block == 1 and x.shape[-1] != width, expansion=expansion,
                            se_ratio=se_ratio, drop_rate=drop_rate, name=f"{prefix}mbconv_")
                for grid, kind in ((False, "block"), (True, "grid")):
                    x = _attention_ffn(x, window_size=window, head_dim=head_dim, expansion=expansion, grid=grid,
                                       drop_rate=drop_rate, name=f"{prefix}{kind}_")
                index += 1
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = LayerNormalization(epsilon=_LN_EPSILON, name="post_ln")(x)
        x = keras.layers.Dense(widths[-1], name="features")(x)
        x = keras.layers.Activation("tanh", name="features_tanh")(x)
        if include_top and dropout_rate > 0:
            x = keras.layers.Dropout(dropout_rate, name="head_drop")(x)
        outputs = self._head(x, num_classes, include_top, "MaxViT")
        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)
        self._arguments = {
            "image_size": image_size,
            "depths": list(depths),
            "widths": list(widths),
            "stem_width": stem_width,
            "head_dim": head_dim,
            "window_size": window_size,
            "expansion": expansion,
            "se_ratio": se_ratio,
            "drop_connect_rate": drop_connect_rate,
            "dropout_rate": dropout_rate,
            "num_classes": num_classes,
            "include_top": include_top,
            "preprocess": preprocess,
        }
