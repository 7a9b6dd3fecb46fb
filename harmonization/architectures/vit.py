"""Vision Transformer (Dosovitskiy et al., 2021, https://arxiv.org/abs/2010.11929), layout of vit_keras 0.1.2.

The published `vit-b16_harmonized.h5` holds the weights of `vit_keras.vit.vit_b16` (200 weights, 86,567,656
parameters; layout in tests/fixtures/reference/vit_keras-0.1.2_vit_b16_weights.tsv): a 16x16 patch embedding
convolution, a class token prepended at position 0, learned position embeddings, pre-LayerNorm encoder
blocks (epsilon 1e-6, exact GELU), a final LayerNorm and a linear head on the class token.
Keras 3 layer names cannot contain "/", so vit_keras' `Transformer/encoderblock_0` is
`Transformer_encoderblock_0` here; the variables inside keep vit_keras' names and order.
LayerNorm is `harmonization.layers.LayerNormalization` (exact second derivatives).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import keras
from keras import ops

from harmonization.architectures.base import ImageClassifier
from harmonization.layers import LayerNormalization

__all__ = ["AddPositionEmbedding", "ClassToken", "ExtractToken", "MultiHeadSelfAttention", "TransformerBlock", "ViT"]

_LN_EPSILON = 1e-6


@keras.saving.register_keras_serializable(package="harmonization")
class ClassToken(keras.layers.Layer):
    """Prepends a learned token (`cls`, zeros at init) to a (batch, tokens, hidden) sequence."""

    def build(self, input_shape):
        self.cls = self.add_weight(shape=(1, 1, input_shape[-1]), initializer="zeros", name="cls")

    def call(self, inputs):
        batch = ops.shape(inputs)[0]
        token = ops.broadcast_to(ops.cast(self.cls, inputs.dtype), (batch, 1, ops.shape(inputs)[-1]))
        return ops.concatenate([token, inputs], axis=1)

    def compute_output_shape(self, input_shape):
        tokens = None if input_shape[1] is None else input_shape[1] + 1
        return (input_shape[0], tokens, input_shape[2])


@keras.saving.register_keras_serializable(package="harmonization")
class AddPositionEmbedding(keras.layers.Layer):
    """Adds a learned (1, tokens, hidden) `pos_embedding` (normal, std 0.02 at init)."""

    def build(self, input_shape):
        if input_shape[1] is None:
            raise ValueError("AddPositionEmbedding needs a known number of tokens (a fixed image size).")
        self.pos_embedding = self.add_weight(
            shape=(1, input_shape[1], input_shape[2]),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="pos_embedding",
        )

    def call(self, inputs):
        return inputs + ops.cast(self.pos_embedding, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="harmonization")
class ExtractToken(keras.layers.Layer):
    """Returns token `index` of a (batch, tokens, hidden) sequence (vit_keras' `ExtractToken` Lambda)."""

    def __init__(self, index: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.index = int(index)

    def call(self, inputs):
        return inputs[:, self.index]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])

    def get_config(self):
        return {**super().get_config(), "index": self.index}


@keras.saving.register_keras_serializable(package="harmonization")
class MultiHeadSelfAttention(keras.layers.Layer):
    """Scaled dot-product self-attention with `query`, `key`, `value`, `out` Dense(hidden) projections.

    Args:
        num_heads: int. Number of heads; must divide the hidden size.
    """

    def __init__(self, num_heads: int, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.query = keras.layers.Dense(1, name="query")  # units set in build
        self.key = keras.layers.Dense(1, name="key")
        self.value = keras.layers.Dense(1, name="value")
        self.out = keras.layers.Dense(1, name="out")

    def build(self, input_shape):
        hidden = input_shape[-1]
        if hidden % self.num_heads:
            raise ValueError(f"MultiHeadSelfAttention: hidden size {hidden} is not divisible by num_heads={self.num_heads}.")
        for dense in (self.query, self.key, self.value, self.out):
            dense.units = hidden
            dense.build(input_shape)

    def _split(self, x, batch):
        x = ops.reshape(x, (batch, -1, self.num_heads, ops.shape(x)[-1] // self.num_heads))
        return ops.transpose(x, (0, 2, 1, 3))

    def call(self, inputs):
        batch = ops.shape(inputs)[0]
        hidden = ops.shape(inputs)[-1]
        q = self._split(self.query(inputs), batch)
        k = self._split(self.key(inputs), batch)
        v = self._split(self.value(inputs), batch)
        head_dim = inputs.shape[-1] // self.num_heads
        scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) / math.sqrt(head_dim)
        weights = ops.softmax(scores, axis=-1)
        x = ops.transpose(ops.matmul(weights, v), (0, 2, 1, 3))
        return self.out(ops.reshape(x, (batch, -1, hidden)))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads}


@keras.saving.register_keras_serializable(package="harmonization")
class TransformerBlock(keras.layers.Layer):
    """Pre-LayerNorm encoder block: x + Attention(LN(x)), then x + MLP(LN(x)) with exact GELU.

    Args:
        num_heads: int. Attention heads.
        mlp_dim: int. Hidden width of the MLP.
        dropout_rate: float. Dropout after attention and in the MLP. Defaults to 0.1 (vit_keras).
    """

    def __init__(self, num_heads: int, mlp_dim: int, dropout_rate: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.mlp_dim = int(mlp_dim)
        self.dropout_rate = float(dropout_rate)
        # Created in vit_keras' order, so the variables come out in the published order.
        self.attention = MultiHeadSelfAttention(self.num_heads, name="MultiHeadDotProductAttention_1")
        self.dense_0 = keras.layers.Dense(self.mlp_dim, name="Dense_0")
        self.dense_1 = keras.layers.Dense(1, name="Dense_1")  # units set in build
        self.layernorm_0 = LayerNormalization(epsilon=_LN_EPSILON, name="LayerNorm_0")
        self.layernorm_2 = LayerNormalization(epsilon=_LN_EPSILON, name="LayerNorm_2")
        self.dropout = keras.layers.Dropout(self.dropout_rate)

    def build(self, input_shape):
        self.attention.build(input_shape)
        self.dense_0.build(input_shape)
        self.dense_1.units = input_shape[-1]
        self.dense_1.build((*input_shape[:-1], self.mlp_dim))
        self.layernorm_0.build(input_shape)
        self.layernorm_2.build(input_shape)

    def call(self, inputs, training=None):
        x = self.attention(self.layernorm_0(inputs))
        x = self.dropout(x, training=training) + inputs
        y = keras.activations.gelu(self.dense_0(self.layernorm_2(x)), approximate=False)
        y = self.dropout(y, training=training)
        y = self.dropout(self.dense_1(y), training=training)
        return x + y

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "mlp_dim": self.mlp_dim,
            "dropout_rate": self.dropout_rate,
        }


@keras.saving.register_keras_serializable(package="harmonization")
class ViT(ImageClassifier):
    """Vision Transformer image classifier; the defaults are ViT-B/16 (86,567,656 parameters, 1000 classes).

    Args:
        image_size: int. Height and width of the input images; a multiple of `patch_size`. Defaults to 224.
        patch_size: int. Side of the square patches. Defaults to 16.
        hidden_size: int. Token width. Defaults to 768.
        num_layers: int. Encoder blocks. Defaults to 12.
        num_heads: int. Attention heads; must divide `hidden_size`. Defaults to 12.
        mlp_dim: int. MLP width in each block. Defaults to 3072.
        dropout_rate: float. Dropout in the blocks. Defaults to 0.1 (vit_keras).
        num_classes: int. Number of logits. Defaults to 1000.
        include_top: bool. Keep the `head` layer; False returns the normalised class token. Defaults to True.
        preprocess: bool or mapping. Take RGB in [0, 255] and normalise inside the model: True for the published
            ImageNet normalisation, a mapping {"scale", "mean", "std"} for another (a zoo entry's
            `preprocessing` gives it), False for the bare network. Defaults to True.
        name: str. Defaults to "vit".

    Example:
        >>> model = harmonization.architectures.ViT(image_size=32, patch_size=8, hidden_size=16,
        ...                                         num_layers=2, num_heads=2, mlp_dim=32)
    """

    classifier_name = "head"

    def __init__(
        self,
        *,
        image_size: int = 224,
        patch_size: int = 16,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        mlp_dim: int = 3072,
        dropout_rate: float = 0.1,
        num_classes: int = 1000,
        include_top: bool = True,
        preprocess: bool | Mapping[str, Any] = True,
        name: str = "vit",
        **kwargs,
    ):
        if not isinstance(image_size, int) or image_size % patch_size:
            raise ValueError(f"ViT: `image_size` ({image_size}) must be a multiple of `patch_size` ({patch_size}).")
        if hidden_size % num_heads:
            raise ValueError(f"ViT: `hidden_size` ({hidden_size}) must be divisible by `num_heads` ({num_heads}).")
        inputs, x = self._begin(image_size, preprocess, "ViT")
        x = keras.layers.Conv2D(hidden_size, patch_size, strides=patch_size, padding="valid", name="embedding")(x)
        x = keras.layers.Reshape(((image_size // patch_size) ** 2, hidden_size), name="patches")(x)
        x = ClassToken(name="class_token")(x)
        x = AddPositionEmbedding(name="Transformer_posembed_input")(x)
        for n in range(num_layers):
            x = TransformerBlock(num_heads, mlp_dim, dropout_rate, name=f"Transformer_encoderblock_{n}")(x)
        x = LayerNormalization(epsilon=_LN_EPSILON, name="Transformer_encoder_norm")(x)
        x = ExtractToken(0, name="ExtractToken")(x)
        outputs = self._head(x, num_classes, include_top, "ViT")
        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)
        self._arguments = {
            "image_size": image_size,
            "patch_size": patch_size,
            "hidden_size": hidden_size,
            "num_layers": num_layers,
            "num_heads": num_heads,
            "mlp_dim": mlp_dim,
            "dropout_rate": dropout_rate,
            "num_classes": num_classes,
            "include_top": include_top,
            "preprocess": preprocess,
        }
