"""What every zoo architecture shares: in-model preprocessing and the constructor-arguments-are-the-config model.

Each architecture is a functional `keras.Model` subclass (the keras-hub backbone pattern): `__init__` builds
the graph from its arguments, `get_config` returns exactly those arguments and `from_config` is `cls(**config)`,
so a preset's `config.json` is short, readable and rebuilt without code from the file (`safe_mode`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import keras
from keras import ops

from harmonization._numbers import is_int

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "NORMALIZATION_KEYS", "ImageClassifier", "ImageNetNormalization"]

# The published harmonized models' normalisation (serre-lab/Harmonization `preprocess_input`).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# What a normalisation is made of: the arguments of `ImageNetNormalization` (and a zoo entry's `preprocessing`).
NORMALIZATION_KEYS = ("scale", "mean", "std")


@keras.saving.register_keras_serializable(package="harmonization")
class ImageNetNormalization(keras.layers.Layer):
    """RGB in [0, 255] -> `x * scale`, then `(x - mean) / std` per channel. No weights.

    Args:
        scale: float. Multiplies the raw pixels first. Defaults to 1/255.
        mean: sequence of floats, one per channel. Defaults to the ImageNet mean.
        std: sequence of floats, one per channel. Defaults to the ImageNet std.
    """

    def __init__(
        self,
        scale: float = 1.0 / 255.0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if len(mean) != len(std):
            raise ValueError(f"`mean` and `std` need one value per channel; got {len(mean)} and {len(std)}.")
        if any(s <= 0 for s in std):
            raise ValueError(f"`std` must be positive, got {list(std)}.")
        self.scale = float(scale)
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype) * self.scale
        mean = ops.convert_to_tensor(self.mean, dtype=self.compute_dtype)
        std = ops.convert_to_tensor(self.std, dtype=self.compute_dtype)
        return (x - mean) / std

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "mean": list(self.mean), "std": list(self.std)}


class ImageClassifier(keras.Model):
    """Base of the zoo architectures: image input, optional preprocessing, optional classification head.

    Subclasses build `features` from `self._begin(...)`'s tensor and finish with `self._finish(...)`.
    `classifier_name` is the name of the head layer that `load_model(num_classes=...)` replaces.
    """

    classifier_name = "predictions"

    @staticmethod
    def _begin(image_size: int, preprocess: bool | Mapping[str, Any], name: str):
        """The input and the tensor the network starts from: normalised inside the model unless `preprocess` is off.

        `preprocess` is True (the published ImageNet normalisation), False (none: the bare network), or the
        normalisation itself, `{"scale", "mean", "std"}` — what a zoo entry's `preprocessing` block gives
        (`harmonization.zoo.build`), so that the entry, not a constant here, says how inputs are prepared.
        """
        if not is_int(image_size) or image_size < 1:
            raise ValueError(f"{name}: `image_size` must be a positive int, got {image_size!r}.")
        inputs = keras.Input((image_size, image_size, 3), name="images")
        if isinstance(preprocess, Mapping):
            unknown = sorted(set(preprocess) - set(NORMALIZATION_KEYS))
            if unknown:
                raise ValueError(
                    f"{name}: `preprocess` as a mapping takes the keys {list(NORMALIZATION_KEYS)}; got unknown "
                    f"{unknown}."
                )
            return inputs, ImageNetNormalization(name="preprocessing", **preprocess)(inputs)
        if not isinstance(preprocess, bool):
            raise ValueError(
                f"{name}: `preprocess` must be True, False or a mapping {{'scale', 'mean', 'std'}}; got {preprocess!r}."
            )
        return inputs, (ImageNetNormalization(name="preprocessing")(inputs) if preprocess else inputs)

    @classmethod
    def _head(cls, features, num_classes: int, include_top: bool, name: str):
        if not include_top:
            return features
        if not is_int(num_classes) or num_classes < 1:
            raise ValueError(f"{name}: `num_classes` must be a positive int, got {num_classes!r}.")
        return keras.layers.Dense(num_classes, name=cls.classifier_name)(features)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "trainable": self.trainable, **self._arguments}

    @classmethod
    def from_config(cls, config: dict[str, Any]):
        return cls(**config)
