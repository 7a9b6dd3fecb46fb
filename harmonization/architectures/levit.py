"""LeViT (Graham et al., 2021, https://arxiv.org/abs/2104.01136), as keras-cv-attention-models 1.3.x computes it.

The published `levit_small_harmonized.h5` holds the weights of kecam's `LeViT128(use_distillation=False)`
(330 weights, 8,876,008 parameters; layout in tests/fixtures/reference/kecam-1.3.9_levit128_weights.tsv):
a stem of four stride-2 3x3 convolutions, then stages of attention + MLP blocks on the (height, width)
token grid, joined by strided "shrink" attention, and a BatchNorm + Dense head. What matters to reproduce
kecam exactly:

- every BatchNorm has epsilon 1e-5 (momentum 0.9); the activation is hard-swish `x * relu6(x + 3) / 6`;
- the stem pads symmetrically by 1 and convolves "valid" (PyTorch style, not TensorFlow "same");
- queries, keys and values are interleaved per head in one Dense (`qkv`) and split per head into
  [key_dim, key_dim, attn_ratio * key_dim]; the attention output goes through hard-swish before `out`;
- the attention bias is a (key tokens, heads) table indexed by |key position - stride * query position|, with
  positions taken from `meshgrid` in "xy" order as kecam builds them;
- shrink attention queries the map subsampled with `[::stride, ::stride]` and has no residual.

Layer names are kecam's, so `harmonization.convert` maps the published weights by name. Normalisation layers
come from `harmonization.layers` (exact second derivatives), so the model can keep being harmonized.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import keras
import numpy as np
from keras import ops

from harmonization.architectures.base import ImageClassifier
from harmonization.layers import BatchNormalization

__all__ = ["LeViT", "LeViTAttention", "hard_swish"]

_BN_EPSILON = 1e-5
_BN_MOMENTUM = 0.9


@keras.saving.register_keras_serializable(package="harmonization")
def hard_swish(x):
    """`x * relu6(x + 3) / 6` (MobileNetV3; kecam's "hard_swish")."""
    return x * ops.relu6(x + 3.0) / 6.0


def attention_bias_index(query_height: int, query_width: int, key_blocks: int) -> np.ndarray:
    """(query tokens, key tokens) index into the (key tokens, heads) bias table, as kecam's
    `MultiHeadPositionalEmbedding` builds it (including its key-grid height search and "xy" meshgrids)."""
    query_blocks = query_height * query_width
    strides = int(math.ceil(math.sqrt(key_blocks / query_blocks)))
    blocks_h = query_height * strides
    while key_blocks % blocks_h:
        blocks_h -= 1
    blocks_w = key_blocks // blocks_h
    x1, y1 = np.meshgrid(np.arange(query_height), np.arange(query_width))
    x2, y2 = np.meshgrid(np.arange(blocks_h), np.arange(blocks_w))
    queries = np.stack([x1.reshape(-1), y1.reshape(-1)], axis=-1)
    keys = np.stack([x2.reshape(-1), y2.reshape(-1)], axis=-1)
    distance = np.abs(keys[None, :, :] - queries[:, None, :] * strides)
    return distance[..., 0] + distance[..., 1] * blocks_h


@keras.saving.register_keras_serializable(package="harmonization")
class AttentionBias(keras.layers.Layer):
    """Adds a learned bias, shared by relative offset, to (batch, heads, query tokens, key tokens) scores.

    Args:
        query_height: int. Height of the query grid (its width follows from the token count).
    """

    def __init__(self, query_height: int, **kwargs):
        super().__init__(**kwargs)
        self.query_height = int(query_height)

    def build(self, input_shape):
        _, heads, queries, keys = input_shape
        self.positional_embedding = self.add_weight(shape=(keys, heads), initializer="zeros",
                                                    name="positional_embedding")
        self._index = attention_bias_index(self.query_height, queries // self.query_height, keys).astype("int32")

    def call(self, scores):
        bias = ops.take(self.positional_embedding, ops.convert_to_tensor(self._index), axis=0)  # (q, k, heads)
        return scores + ops.cast(ops.transpose(bias, (2, 0, 1)), scores.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "query_height": self.query_height}


@keras.saving.register_keras_serializable(package="harmonization")
class LeViTAttention(keras.layers.Layer):
    """Multi-head attention over the token grid with an attention bias and BatchNorm'd projections.

    With `stride` 1 the layer is kecam's `mhsa_with_multi_head_position` (one Dense `qkv`); with `stride` > 1
    it is `mhsa_with_multi_head_position_and_strides` (queries `q` from the subsampled grid, keys and values
    `kv` from the full grid) and shrinks the grid. Every projection has no bias and is followed by BatchNorm
    (`*_bn`); the output BatchNorm starts at zero (`out_bn`, kecam's zero_gamma).

    Args:
        num_heads: int. Attention heads.
        key_dim: int. Channels per head of queries and keys.
        attn_ratio: int. Value channels per head are `attn_ratio * key_dim`.
        output_dim: int. Channels of the output.
        stride: int. Query subsampling. Defaults to 1.
    """

    def __init__(self, num_heads: int, key_dim: int, attn_ratio: int, output_dim: int, stride: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.key_dim = int(key_dim)
        self.attn_ratio = int(attn_ratio)
        self.output_dim = int(output_dim)
        self.stride = int(stride)

    def _bn(self, name, zero_gamma=False):
        return BatchNormalization(epsilon=_BN_EPSILON, momentum=_BN_MOMENTUM, name=name,
                                  gamma_initializer="zeros" if zero_gamma else "ones")

    def build(self, input_shape):
        _, height, width, channels = input_shape
        if height is None or width is None:
            raise ValueError(f"{self.name}: LeViTAttention needs a known grid size, got {input_shape}.")
        self.height, self.width = height, width
        self.query_height, self.query_width = -(-height // self.stride), -(-width // self.stride)
        embed = self.num_heads * self.key_dim
        value_dim = self.attn_ratio * embed
        # Created in kecam's order (kv before q), so the variables come out in the published order.
        if self.stride > 1:
            self.kv = keras.layers.Dense(embed + value_dim, use_bias=False, name="kv")
            self.kv.build(input_shape)
            self.q = keras.layers.Dense(embed, use_bias=False, name="q")
            self.q.build(input_shape)
            self.kv_bn = self._bn("kv_bn")
            self.kv_bn.build((None, height, width, embed + value_dim))
            self.q_bn = self._bn("q_bn")
            self.q_bn.build((None, self.query_height, self.query_width, embed))
        else:
            self.qkv = keras.layers.Dense(2 * embed + value_dim, use_bias=False, name="qkv")
            self.qkv.build(input_shape)
            self.qkv_bn = self._bn("qkv_bn")
            self.qkv_bn.build((None, height, width, 2 * embed + value_dim))
        queries, keys = self.query_height * self.query_width, height * width
        self.attn_pos = AttentionBias(self.query_height, name="attn_pos")
        self.attn_pos.build((None, self.num_heads, queries, keys))
        self.out = keras.layers.Dense(self.output_dim, use_bias=False, name="out")
        self.out.build((None, self.query_height, self.query_width, value_dim))
        self.out_bn = self._bn("out_bn", zero_gamma=True)
        self.out_bn.build((None, self.query_height, self.query_width, self.output_dim))

    def _heads(self, x, tokens):
        x = ops.reshape(x, (-1, tokens, self.num_heads, x.shape[-1] // self.num_heads))
        return ops.transpose(x, (0, 2, 1, 3))  # (batch, heads, tokens, per-head channels)

    def call(self, inputs, training=None):
        keys_n = self.height * self.width
        queries_n = self.query_height * self.query_width
        split = [self.key_dim, self.key_dim * 2] if self.stride == 1 else [self.key_dim]
        if self.stride > 1:
            kv = self._heads(self.kv_bn(self.kv(inputs), training=training), keys_n)
            key, value = kv[..., : self.key_dim], kv[..., self.key_dim:]
            subsampled = inputs[:, :: self.stride, :: self.stride, :]
            query = self._heads(self.q_bn(self.q(subsampled), training=training), queries_n)
        else:
            qkv = self._heads(self.qkv_bn(self.qkv(inputs), training=training), keys_n)
            query, key, value = qkv[..., : split[0]], qkv[..., split[0]: split[1]], qkv[..., split[1]:]
        scale = float(1.0 / np.sqrt(np.float32(self.key_dim)))
        scores = ops.matmul(query, ops.transpose(key, (0, 1, 3, 2))) * scale
        attention = ops.softmax(self.attn_pos(scores), axis=-1)
        attended = ops.transpose(ops.matmul(attention, value), (0, 2, 1, 3))
        attended = ops.reshape(attended, (-1, self.query_height, self.query_width, attended.shape[2] * attended.shape[3]))
        return self.out_bn(self.out(hard_swish(attended)), training=training)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], -(-input_shape[1] // self.stride), -(-input_shape[2] // self.stride), self.output_dim)

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "key_dim": self.key_dim,
            "attn_ratio": self.attn_ratio,
            "output_dim": self.output_dim,
            "stride": self.stride,
        }


def _batch_norm(x, name, activation=None):
    x = BatchNormalization(epsilon=_BN_EPSILON, momentum=_BN_MOMENTUM, name=f"{name}bn")(x)
    return keras.layers.Activation(hard_swish, name=f"{name}hard_swish")(x) if activation else x


def _drop_path(x, rate: float, name: str):
    return keras.layers.Dropout(rate, noise_shape=(None, 1, 1, 1), name=name)(x) if rate > 0 else x


def _mlp(x, ratio: int, drop_rate: float, name: str):
    channels = x.shape[-1]
    y = keras.layers.Dense(channels * ratio, use_bias=False, name=f"{name}1_dense")(x)
    y = _batch_norm(y, f"{name}1_", activation=True)
    y = keras.layers.Dense(channels, use_bias=False, name=f"{name}2_dense")(y)
    y = _batch_norm(y, f"{name}2_")
    y = _drop_path(y, drop_rate, f"{name}drop")
    return keras.layers.Add(name=f"{name}add")([x, y])


@keras.saving.register_keras_serializable(package="harmonization")
class LeViT(ImageClassifier):
    """LeViT image classifier without distillation head; the defaults are LeViT-128 (8,876,008 parameters).

    Args:
        image_size: int. Height and width of the input images. Defaults to 224.
        patch_channel: int. Channels after the stem (a multiple of 8). Defaults to 128.
        out_channels: sequence of ints. Channels each stage ends with (a stage whose output differs from its
            input ends with a strided shrink attention). Defaults to [256, 384, 384].
        num_heads: sequence of ints. Attention heads per stage. Defaults to [4, 8, 12].
        depths: sequence of ints. Attention + MLP blocks per stage. Defaults to [4, 4, 4].
        key_dims: sequence of ints. Query/key channels per head, per stage. Defaults to [16, 16, 16].
        attn_ratios: sequence of ints. Value/key channel ratio per stage. Defaults to [2, 2, 2].
        mlp_ratios: sequence of ints. MLP expansion per stage (0 drops the MLPs). Defaults to [2, 2, 2].
        strides: sequence of ints. Shrink-attention stride per stage. Defaults to [2, 2, 0].
        drop_connect_rate: float. Stochastic-depth rate. Defaults to 0 (kecam).
        dropout_rate: float. Dropout before the head. Defaults to 0 (kecam).
        num_classes: int. Number of logits. Defaults to 1000.
        include_top: bool. Keep the `head` layer; False returns the pooled, normalised features (`head_bn`).
            Defaults to True.
        preprocess: bool or mapping. Take RGB in [0, 255] and normalise inside the model: True for the published
            ImageNet normalisation, a mapping {"scale", "mean", "std"} for another (a zoo entry's
            `preprocessing` gives it), False for the bare network. Defaults to True.
        name: str. Defaults to "levit".

    Example:
        >>> model = harmonization.architectures.LeViT(image_size=96, patch_channel=16, out_channels=[24, 32, 32],
        ...                                           num_heads=[2, 4, 4], depths=[1, 1, 1], key_dims=[4, 4, 4])
    """

    classifier_name = "head"

    def __init__(
        self,
        *,
        image_size: int = 224,
        patch_channel: int = 128,
        out_channels: Sequence[int] = (256, 384, 384),
        num_heads: Sequence[int] = (4, 8, 12),
        depths: Sequence[int] = (4, 4, 4),
        key_dims: Sequence[int] = (16, 16, 16),
        attn_ratios: Sequence[int] = (2, 2, 2),
        mlp_ratios: Sequence[int] = (2, 2, 2),
        strides: Sequence[int] = (2, 2, 0),
        drop_connect_rate: float = 0.0,
        dropout_rate: float = 0.0,
        num_classes: int = 1000,
        include_top: bool = True,
        preprocess: bool | Mapping[str, Any] = True,
        name: str = "levit",
        **kwargs,
    ):
        stages = [out_channels, num_heads, depths, key_dims, attn_ratios, mlp_ratios, strides]
        if len({len(s) for s in stages}) != 1 or not out_channels:
            raise ValueError(
                "LeViT: `out_channels`, `num_heads`, `depths`, `key_dims`, `attn_ratios`, `mlp_ratios` and "
                f"`strides` need one entry per stage; got lengths {[len(s) for s in stages]}."
            )
        if patch_channel % 8:
            raise ValueError(f"LeViT: `patch_channel` must be a multiple of 8, got {patch_channel}.")
        inputs, x = self._begin(image_size, preprocess, "LeViT")
        for i, divisor in enumerate((8, 4, 2, 1), start=1):
            x = keras.layers.ZeroPadding2D(1, name=f"stem_{i}_pad")(x)
            x = keras.layers.Conv2D(patch_channel // divisor, 3, strides=2, use_bias=False, name=f"stem_{i}_conv")(x)
            x = _batch_norm(x, f"stem_{i}_", activation=i < 4)
        total, index = sum(depths), 0
        for stage, (out_channel, heads, depth, key_dim, attn_ratio, mlp_ratio, stride) in enumerate(
            zip(*stages), start=1
        ):
            name_prefix = f"stack{stage}_"
            embed = x.shape[-1]
            for block in range(1, depth + 1):
                prefix = f"{name_prefix}block{block}_"
                drop_rate = drop_connect_rate * index / total
                # The attention layer carries the block's name: its sublayers' paths are kecam's layer names.
                y = LeViTAttention(heads, key_dim, attn_ratio, embed, name=prefix[:-1])(x)
                y = _drop_path(y, drop_rate, f"{prefix}drop")
                x = keras.layers.Add(name=f"{prefix}add")([x, y])
                if mlp_ratio > 0:
                    x = _mlp(x, mlp_ratio, drop_rate, f"{prefix}mlp_")
                index += 1
            if embed != out_channel:
                if stride < 1:
                    raise ValueError(
                        f"LeViT: stage {stage} changes channels ({embed} -> {out_channel}) so it needs a stride "
                        f">= 1, got {stride}."
                    )
                prefix = f"{name_prefix}downsample_"
                x = LeViTAttention(embed // key_dim, key_dim, attn_ratio * stride, out_channel, stride=stride,
                                   name=prefix[:-1])(x)
                if mlp_ratio > 0:
                    x = _mlp(x, mlp_ratio, drop_connect_rate * index / total, f"{prefix}mlp_")
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        if dropout_rate > 0:
            x = keras.layers.Dropout(dropout_rate, name="head_drop")(x)
        x = BatchNormalization(epsilon=_BN_EPSILON, momentum=_BN_MOMENTUM, name="head_bn")(x)
        outputs = self._head(x, num_classes, include_top, "LeViT")
        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)
        self._arguments = {
            "image_size": image_size,
            "patch_channel": patch_channel,
            "out_channels": list(out_channels),
            "num_heads": list(num_heads),
            "depths": list(depths),
            "key_dims": list(key_dims),
            "attn_ratios": list(attn_ratios),
            "mlp_ratios": list(mlp_ratios),
            "strides": list(strides),
            "drop_connect_rate": drop_connect_rate,
            "dropout_rate": dropout_rate,
            "num_classes": num_classes,
            "include_top": include_top,
            "preprocess": preprocess,
        }
