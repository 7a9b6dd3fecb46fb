"""clickme_synthetic: a generated ClickMe-format dataset with a planted shortcut, for offline demos."""

from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from harmonization import synthetic
from harmonization._validation import is_int, is_number

_HOMEPAGE = "https://arxiv.org/abs/2211.04533"


@dataclasses.dataclass(eq=False)
class BuilderConfig(tfds.core.BuilderConfig):
    """Size, seed and shortcut strength of the generated data.

    Attributes:
        seed: int >= 0. Examples are a pure function of (seed, split, index).
        image_size: int >= 32. Side of the square images and heatmaps.
        num_train: int >= 1. Examples in "train".
        num_test: int >= 1. Examples in "test".
        shortcut_agreement: float in [0, 1]. Probability that a train image's corner mark names its
            label; the test split's mark is always uniformly random.
    """

    seed: int = 0
    image_size: int = 64
    num_train: int = 3000
    num_test: int = 1000
    shortcut_agreement: float = 0.9

    def __post_init__(self):
        for name, minimum in (("seed", 0), ("image_size", synthetic.MIN_IMAGE_SIZE), ("num_train", 1), ("num_test", 1)):
            value = getattr(self, name)
            if not is_int(value) or value < minimum:
                raise ValueError(f"BuilderConfig `{name}` must be an integer >= {minimum}; got {value!r}.")
        value = self.shortcut_agreement
        if not (is_number(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"BuilderConfig `shortcut_agreement` must be a number in [0, 1]; got {value!r}.")


class Builder(tfds.core.GeneratorBasedBuilder):
    """DatasetBuilder for clickme_synthetic."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: 10 shape classes, corner-texture shortcut, PNG images and maps."}
    BUILDER_CONFIGS = [
        BuilderConfig(
            name="default",
            description="3,000 train / 1,000 test examples at 64x64; the quickstart's data.",
        ),
        BuilderConfig(
            name="quick",
            num_train=200,
            num_test=100,
            description="200 train / 100 test examples at 64x64, for tests and smoke runs.",
        ),
    ]
    DEFAULT_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                    "heatmap": tfds.features.Image(shape=(size, size, 1), encoding_format="png"),
                    "label": tfds.features.ClassLabel(names=synthetic.CLASS_NAMES),
                    "id": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage=_HOMEPAGE,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        """Nothing to download: both splits are generated from the config's seed."""
        config = self.builder_config
        return {
            "train": self._generate_examples("train", config.num_train),
            "test": self._generate_examples("test", config.num_test),
        }

    def _generate_examples(self, split: str, num_examples: int):
        """Yields (id, example); the split decides only how the shortcut is drawn (see synthetic)."""
        config = self.builder_config
        for example in synthetic.generate_split(
            config.seed, split, num_examples, config.image_size, config.shortcut_agreement
        ):
            yield example.id, {
                "image": example.image,
                "heatmap": example.heatmap,
                "label": example.label,
                "id": example.id,
            }
