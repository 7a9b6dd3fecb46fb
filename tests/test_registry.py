"""Every zoo entry against the model it builds, parametrised over `list_models()`: a new entry is tested without a
test edit (as timm's tests/test_models.py runs over its registry).

Each entry is built once at full size (a module-scoped fixture; pytest runs one entry's tests together and
drops the model before the next), randomly initialised: the declared parameter count, the input shape and the
in-model preprocessing that the entry's `preprocessing` block describes, and the head that
`load_model(num_classes=...)` replaces. The published numbers themselves are pinned in tests/test_zoo.py.
"""

import gc
import importlib
import inspect

import keras
import numpy as np
import pytest

from harmonization.zoo import build_architecture, list_models, model_info
from architecture_helpers import random_images


@pytest.fixture(scope="module", params=list_models())
def built(request):
    """(entry, randomly initialised full-size model) of one zoo entry."""
    entry = model_info(request.param)
    keras.utils.set_random_seed(0)
    model = build_architecture(request.param)
    yield entry, model
    del model
    keras.backend.clear_session()
    gc.collect()


def _architecture_class(entry):
    architecture = entry["architecture"]
    return getattr(importlib.import_module(architecture["module"]), architecture["class_name"])


@pytest.mark.parametrize("name", list_models())
def test_entry_config_holds_only_constructor_arguments(name):
    entry = model_info(name)
    signature = inspect.signature(_architecture_class(entry).__init__).parameters
    unknown = sorted(set(entry["architecture"]["config"]) - set(signature))
    assert not unknown, f"{name}: {unknown} are not arguments of {entry['architecture']['class_name']}"


def test_every_architecture_defaults_to_a_published_model():
    # The class docstrings say "the defaults are <published model>": some entry spells out exactly the defaults.
    by_class = {}
    for name in list_models():
        entry = model_info(name)
        by_class.setdefault(_architecture_class(entry), []).append(entry["architecture"]["config"])
    for cls, configs in by_class.items():
        signature = inspect.signature(cls.__init__).parameters
        defaults = [{k: list(signature[k].default) if isinstance(signature[k].default, tuple) else signature[k].default
                     for k in config if k in signature} for config in configs]
        assert any(config == default for config, default in zip(configs, defaults)), (
            f"no zoo entry builds {cls.__name__}() with its defaults: {configs}")


def test_declared_parameter_count_is_the_built_one(built):
    entry, model = built
    assert model.count_params() == entry["parameter_count"], entry["name"]


def test_input_shape_is_the_declared_one(built):
    entry, model = built
    assert tuple(model.input_shape[1:]) == tuple(entry["preprocessing"]["input_shape"]), entry["name"]


def test_in_model_preprocessing_is_the_entry_preprocessing_block(built):
    entry, model = built
    block = entry["preprocessing"]
    names = [layer.name for layer in model.layers]
    if not block.get("in_model", True):
        assert "preprocessing" not in names, f"{entry['name']}: the entry says the model does not preprocess"
        return
    # The leading layer: it reads the model's input directly.
    layer = model.get_layer("preprocessing")
    assert layer.input is model.inputs[0]
    # A constant image per channel, at both ends and the middle of the declared input range.
    low, high = block["input_range"]
    values = np.array([low, (low + high) / 2, high], dtype="float64")
    image = np.broadcast_to(values, (1, 4, 4, 3)).astype("float32")
    expected = (values * block["scale"] - np.asarray(block["mean"])) / np.asarray(block["std"])
    got = np.asarray(layer(image))
    np.testing.assert_allclose(got, np.broadcast_to(expected, got.shape), rtol=1e-6, atol=1e-6)
    assert block["color_order"] == "RGB"  # the only order the zoo's preprocessing (and its images) use


def test_head_is_the_output_layer_with_one_logit_per_class(built):
    entry, model = built
    # The head that load_model(num_classes=...) replaces; an entry may name it (timm's `classifier`).
    head_name = entry.get("classifier", type(model).classifier_name)
    assert head_name == type(model).classifier_name, entry["name"]
    head = model.get_layer(head_name)
    assert isinstance(head, keras.layers.Dense)
    assert head.units == entry["architecture"]["config"]["num_classes"]
    assert model.layers[-1] is head and model.output_shape == (None, head.units)
    assert entry["output"]["native"] == "logits" and head.get_config()["activation"] == "linear"


@pytest.mark.slow
def test_one_forward_pass_at_full_size(built):
    entry, model = built
    size = entry["preprocessing"]["input_shape"][0]
    logits = np.asarray(model(random_images(size, n=1)))
    assert logits.shape == (1, entry["architecture"]["config"]["num_classes"]) and np.isfinite(logits).all()
