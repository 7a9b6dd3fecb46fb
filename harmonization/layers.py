"""Normalisation layers with exact second derivatives, for models that will be harmonized.

Drop-in subclasses of the Keras layers (same constructor arguments, same weights, same outputs):
each call runs inside `harmonization.second_order.exact_moments()`. `HarmonizedModel` already makes
plain Keras layers exact during its training step; these classes make the property travel with the
architecture itself (the zoo builds its models from them), e.g. for custom training loops.
"""

from __future__ import annotations

import keras

from harmonization.second_order import exact_moments


@keras.saving.register_keras_serializable(package="harmonization")
class LayerNormalization(keras.layers.LayerNormalization):
    """`keras.layers.LayerNormalization` whose Hessian is exact on the TensorFlow backend."""

    def call(self, inputs):
        with exact_moments():
            return super().call(inputs)


@keras.saving.register_keras_serializable(package="harmonization")
class BatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` whose training-mode Hessian is exact on the TensorFlow backend."""

    def call(self, inputs, training=None, mask=None):
        with exact_moments():
            return super().call(inputs, training=training, mask=mask)


@keras.saving.register_keras_serializable(package="harmonization")
class GroupNormalization(keras.layers.GroupNormalization):
    """`keras.layers.GroupNormalization` whose Hessian is exact on the TensorFlow backend."""

    def call(self, inputs):
        with exact_moments():
            return super().call(inputs)
