"""The shared architecture test harness and helpers (imported by name: pytest puts tests/ on sys.path).

As keras-hub's `run_backbone_test`: each family's test file (tests/test_architectures_<module>.py) supplies
data, a tiny `INIT_KWARGS` and the feature shape it expects, and these functions do the work:

- `run_architecture_test(cls, init_kwargs, expected_feature_shape=...)`: logits on random images, every
  constructor argument in `get_config()` with the value passed, the config round trip compared as JSON,
  `include_top=False` returning the features the head reads, and normalisation layers with exact second
  derivatives;
- `run_preset_test(cls, init_kwargs, tmp_path)`: `save_preset` -> `load_model` gives the same logits, and the
  `num_classes`, `include_top=False` and `preprocess=False` variants of the preset are what they claim;
- `run_harmonized_training_test(cls, init_kwargs)`: one `HarmonizedModel.fit` epoch trains it.

tests/test_architectures.py checks that every architecture has such a file. What only one family needs
(independent references, `read_reference_layout` of the published weight layouts) stays in its file.
"""

from __future__ import annotations

import csv
import inspect
import json
from pathlib import Path

import keras
import numpy as np

import harmonization.layers as hlayers
from harmonization.architectures import ImageNetNormalization
from published_reference import MEAN, STD  # the published constants, written out, not our package's

#: Weight layouts printed by the original libraries (provenance in its README.md).
REFERENCE = Path(__file__).parent / "fixtures" / "reference"
# Keras normalisation layers and the `harmonization.layers` subclass that each must be in a zoo architecture.
_EXACT_NORMS = {
    keras.layers.LayerNormalization: hlayers.LayerNormalization,
    keras.layers.BatchNormalization: hlayers.BatchNormalization,
    keras.layers.GroupNormalization: hlayers.GroupNormalization,
}


def random_images(size, n=2, seed=0):
    """RGB images in [0, 255], what the zoo models take."""
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def perturb_weights(model, seed=1):
    """Non-trivial values for every weight (zeros for class tokens and unit BN stats would hide bugs)."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        value = rng.normal(0, 0.3, variable.shape)
        if "variance" in variable.path:
            value = np.abs(value) + 0.5
        variable.assign(value.astype("float32"))
    return model


def build(cls, init_kwargs, **overrides):
    """`cls(**init_kwargs)` with a fixed seed, `overrides` replacing entries of `init_kwargs`."""
    keras.utils.set_random_seed(0)
    return cls(**{**init_kwargs, **overrides})


def _json(value):
    """`value` as the JSON text a preset's config.json holds (tuples become lists, keys sorted)."""
    return json.dumps(value, sort_keys=True)


def weight_layout(model):
    """(variable path, shape) of every weight of `model`, in order."""
    return [(w.path, tuple(w.shape)) for w in model.weights]


def transfer_weights_by_name(source, target):
    """Copy the weights of every layer of `source` into the layer of `target` with its name; returns how many."""
    mine = {layer.name: layer for layer in target.layers}
    copied = 0
    for layer in source.layers:
        if layer.weights and layer.name in mine:
            mine[layer.name].set_weights(layer.get_weights())
            copied += len(layer.weights)
    return copied


def constructor_arguments(cls):
    """The named arguments of `cls.__init__` (what `get_config` must return, besides `trainable`)."""
    return sorted(p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs"))


def normalisation_layers(model):
    """Every Keras normalisation layer inside `model`, nested ones included."""
    return [layer for layer in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, tuple(_EXACT_NORMS))]


def read_reference_layout(name):
    """Rows of `tests/fixtures/reference/<name>`, a tab-separated weight layout (see its README.md)."""
    with open(REFERENCE / name, newline="") as handle:
        return [row for row in csv.reader(handle, delimiter="\t") if row]


def kecam_weight_layout(name):
    """(variable path, shape) of each weight in kecam layout `name`, spelt as our Keras 3 models spell them.

    kecam's "/" becomes "_" (Keras 3 layer names cannot hold "/"), and Keras 3 calls depthwise kernels "kernel".
    """
    return [(weight.removesuffix(":0").replace("depthwise_kernel", "kernel").replace("/", "_"), eval(shape))
            for _, _, weight, shape in read_reference_layout(name)]


def run_architecture_test(cls, init_kwargs, *, expected_feature_shape, num_images=2, expect_norms=True):
    """The shared behaviour of a zoo architecture, on the tiny config `init_kwargs`.

    Args:
        cls: the architecture class (a `harmonization.architectures.ImageClassifier` subclass).
        init_kwargs: constructor arguments of a tiny model; must include `image_size` and `num_classes`.
        expected_feature_shape: what `include_top=False` returns, e.g. `(None, 8)`.
        num_images: batch size of the forward pass.
        expect_norms: whether the architecture has normalisation layers at all (VGG has none).
    """
    size, num_classes = init_kwargs["image_size"], init_kwargs["num_classes"]
    model = perturb_weights(build(cls, init_kwargs))
    x = random_images(size, n=num_images)

    # A forward pass: one logit per class, all finite.
    logits = np.asarray(model(x))
    assert logits.shape == (num_images, num_classes) and np.isfinite(logits).all(), logits

    # Every constructor argument is in get_config with the value passed (a round trip alone cannot catch a
    # key that was never written).
    config = model.get_config()
    assert constructor_arguments(cls) == sorted(k for k in config if k != "trainable"), (
        f"{cls.__name__}: constructor arguments {constructor_arguments(cls)} vs get_config keys {sorted(config)}"
    )
    for key, value in init_kwargs.items():
        assert _json(config[key]) == _json(value), (
            f"{cls.__name__}.get_config()[{key!r}] is {config[key]!r}, passed {value!r}")

    # The config round trip, compared as the JSON a preset stores; the clone has the same weights layout.
    clone = cls.from_config(json.loads(_json(config)))
    assert _json(clone.get_config()) == _json(config)
    assert weight_layout(clone) == weight_layout(model)

    # No head: the features that the head reads, and no head layer.
    head = model.get_layer(cls.classifier_name)
    assert tuple(head.input.shape) == tuple(expected_feature_shape), (head.input.shape, expected_feature_shape)
    features = build(cls, init_kwargs, include_top=False)
    assert features.output_shape == tuple(expected_feature_shape)
    assert cls.classifier_name not in [layer.name for layer in features.layers]
    assert transfer_weights_by_name(model, features) == len(features.weights)
    inner = keras.Model(model.input, head.input)
    np.testing.assert_allclose(np.asarray(features(x)), np.asarray(inner(x)), rtol=1e-5, atol=1e-5)

    # Normalisation layers have exact second derivatives (the harmonization loss differentiates twice).
    norms = normalisation_layers(model)
    inexact = [f"{n.name} ({type(n).__module__}.{type(n).__name__})" for n in norms
               if not any(isinstance(n, exact) for exact in _EXACT_NORMS.values())]
    assert not inexact, f"{cls.__name__}: normalisation layers without exact second derivatives: {inexact}"
    assert bool(norms) == expect_norms, (
        f"{cls.__name__}: {len(norms)} normalisation layers, expected {'some' if expect_norms else 'none'}")
    return model


def run_preset_test(cls, init_kwargs, tmp_path, *, atol=1e-5):
    """`save_preset` -> `load_model` and its variants, on the tiny config `init_kwargs`.

    `atol` bounds the bare network (`preprocess=False`) on inputs normalised here; the head-less variant is held
    to `atol / 10`. The restored model itself must give identical logits.
    """
    from harmonization.presets import load_model, save_preset

    model = perturb_weights(build(cls, init_kwargs))
    x = random_images(init_kwargs["image_size"])
    assert isinstance(model.get_layer("preprocessing"), ImageNetNormalization)
    path = save_preset(model, tmp_path / cls.__name__.lower())
    restored = load_model(path)
    assert type(restored) is type(model)
    np.testing.assert_array_equal(np.asarray(restored(x)), np.asarray(model(x)))

    # A new head for fine-tuning: everything but the head keeps the published weights.
    swapped = load_model(path, num_classes=3)
    assert swapped.output_shape == (None, 3)
    head = model.classifier_name
    for layer in swapped.layers:
        if layer.weights and layer.name != head:
            for a, b in zip(layer.get_weights(), model.get_layer(layer.name).get_weights()):
                np.testing.assert_array_equal(a, b)

    # No head: the features the head reads.
    features = load_model(path, include_top=False)
    inner = keras.Model(model.input, model.get_layer(head).input)
    np.testing.assert_allclose(np.asarray(features(x)), np.asarray(inner(x)), rtol=atol / 10, atol=atol / 10)

    # The bare network expects normalised inputs.
    bare = load_model(path, preprocess=False)
    assert "preprocessing" not in [layer.name for layer in bare.layers]
    normalised = ((x / 255.0 - MEAN) / STD).astype("float32")
    np.testing.assert_allclose(np.asarray(bare(normalised)), np.asarray(model(x)), rtol=atol, atol=atol)


def run_harmonized_training_test(cls, init_kwargs, *, num_images=2):
    """One `HarmonizedModel.fit` epoch on random images and maps: finite logs, and the weights move.

    Tracing the second-order training step is the slow part, so `init_kwargs` should be as small as the
    architecture allows (one stage).
    """
    from harmonization import HarmonizedModel

    model = build(cls, init_kwargs)
    size, num_classes = init_kwargs["image_size"], init_kwargs["num_classes"]
    rng = np.random.default_rng(0)
    harmonized = HarmonizedModel(model)
    harmonized.compile(optimizer="adam")
    before = [np.asarray(w).copy() for w in model.trainable_weights]
    data = {"image": random_images(size, n=num_images), "heatmap": rng.uniform(0, 1, (num_images, size, size, 1)),
            "label": rng.integers(0, num_classes, num_images)}
    history = harmonized.fit(data, epochs=1, batch_size=num_images, verbose=0)
    assert all(np.isfinite(v).all() for v in history.history.values()), history.history
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(before, model.trainable_weights))
