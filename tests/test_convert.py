"""Converters from the published Keras-2 formats, proved on fixtures made by the original libraries.

tests/fixtures/keras2/ holds tiny `.h5` files written by vit_keras 0.1.2, keras-cv-attention-models 1.3.9,
keras.applications (Keras 2.15) and the `efficientnet` package, in the published layouts (weights-only and
full-model), with the original model's logits on fixed images (tools/make_conversion_fixtures.py, run in a
side environment with those libraries). Each is converted into our native architecture with the matching
tiny config; the logits must agree to 1e-4.
"""

import ast
import hashlib
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from harmonization import architectures, cli, publish, zoo
from harmonization.architectures import LeViT, VGG
from harmonization.conversion_check import TOLERANCE
from harmonization.convert import ConversionError, load_keras2_weights, read_keras2_h5
from harmonization.loader import load_model
from harmonization.presets import read_metadata

FIXTURES = Path(__file__).parent / "fixtures" / "keras2"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())

# fixture -> (native class, the tiny config the original library was built with, expected layout). The configs live
# in the manifest (`native_config`, written by tools/make_conversion_fixtures.py), which the package's conversion
# check (harmonization.conversion_check) reads too.
CASES = {
    name: (getattr(architectures, record["native_config"]["class_name"]), record["native_config"]["config"],
           record["layout"])
    for name, record in MANIFEST.items() if not name.startswith("_")
}


LEVIT_TINY = CASES["kecam_levit_weights"][1]


def _expected(name):
    data = np.load(FIXTURES / f"{name}.npz")
    logits = data["pre_softmax_logits"] if "pre_softmax_logits" in data else data["logits"]
    return data["images"].astype("float32"), logits, data


def _generator_native_configs() -> dict:
    """fixture -> `native_config`, as tools/make_conversion_fixtures.py writes it (read from its source: the script
    needs the original libraries, so it cannot run here). Each `make_*` function makes one `native(...)` config and
    saves its fixtures with it."""
    tree = ast.parse((Path(__file__).parents[1] / "tools" / "make_conversion_fixtures.py").read_text())
    configs = {}
    for function in tree.body:
        if not (isinstance(function, ast.FunctionDef) and function.name.startswith("make_")):
            continue
        calls = [n for n in ast.walk(function) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
        (native,) = [c for c in calls if c.func.id == "native"]
        config = {"class_name": ast.literal_eval(native.args[0]),
                  "config": {k.arg: ast.literal_eval(k.value) for k in native.keywords}}
        for save in (c for c in calls if c.func.id == "save"):
            configs[ast.literal_eval(save.args[0])] = config
    return configs


def test_fixtures_are_the_generated_ones_and_small():
    # The native configs in the manifest are exactly the generator's, and each names one of our architectures.
    assert {name: record["native_config"] for name, record in MANIFEST.items() if not name.startswith("_")} == (
        _generator_native_configs())
    assert all(isinstance(cls, type) and issubclass(cls, architectures.ImageClassifier) for cls, _, _ in CASES.values())
    for name, record in ((k, v) for k, v in MANIFEST.items() if not k.startswith("_")):
        path = FIXTURES / record["file"]
        assert path.stat().st_size == record["size"] < 1_000_000
        assert hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"], name
    assert MANIFEST["_versions"]["keras"].startswith("2.15")
    assert MANIFEST["_versions"]["vit-keras"] == "0.1.2"
    assert MANIFEST["_versions"]["keras-cv-attention-models"] == "1.3.9"


@pytest.mark.parametrize("name", sorted(CASES))
def test_converted_model_reproduces_the_original_logits(name):
    cls, config, layout = CASES[name]
    images, logits, _ = _expected(name)
    assert logits.std() > 0.05, "the stored logits must discriminate between classes for the test to mean anything"
    source = read_keras2_h5(FIXTURES / f"{name}.h5")
    assert source.layout == layout
    # Every weight the original library saved is read, and they are exactly its parameters.
    assert source.parameter_count == MANIFEST[name]["parameter_count"]
    model = publish.convert(FIXTURES / f"{name}.h5", cls.__name__, config=config)
    assert model.count_params() == MANIFEST[name]["parameter_count"]
    ours = np.asarray(model(images))
    np.testing.assert_allclose(ours, logits, rtol=0, atol=TOLERANCE)
    assert np.abs(ours - logits).max() <= TOLERANCE


def test_efficientnet_package_head_is_probs_with_softmax():
    """The package's head is Dense('probs', softmax): our logits are the pre-softmax values, softmax matches."""
    images, pre_softmax, data = _expected("efficientnet_b0_full_model")
    source = read_keras2_h5(FIXTURES / "efficientnet_b0_full_model.h5")
    assert "probs" in source.layers and source.model_config["class_name"] in ("Functional", "Model")
    cls, config, _ = CASES["efficientnet_b0_full_model"]
    model = cls(**config)
    report = load_keras2_weights(model, source)
    assert report.renamed_layers == {"probs": "predictions"}
    ours = np.asarray(model(images), dtype="float64")
    probabilities = np.exp(ours - ours.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    np.testing.assert_allclose(probabilities, data["logits"], atol=TOLERANCE)


def test_both_vit_layouts_hold_the_same_weights():
    weights_only = read_keras2_h5(FIXTURES / "vit_keras_weights.h5")
    full_model = read_keras2_h5(FIXTURES / "vit_keras_full_model.h5")
    assert (weights_only.layout, full_model.layout) == ("weights", "full-model")
    assert full_model.model_config is not None and weights_only.model_config is None
    assert list(weights_only.layers) == list(full_model.layers)
    assert "Transformer/encoderblock_0" in weights_only.layers  # names with "/" are nested groups in the file
    for layer, weights in weights_only.layers.items():
        assert list(weights) == list(full_model.layers[layer])
        for key, value in weights.items():
            np.testing.assert_array_equal(value, full_model.layers[layer][key])


def _weights(model):
    return [np.asarray(w).copy() for w in model.weights]


def test_a_config_that_does_not_fit_names_the_weights_and_changes_nothing():
    cls, config, _ = CASES["vit_keras_weights"]
    model = cls(**{**config, "image_size": 48})  # 37 tokens instead of 17
    before = _weights(model)
    with pytest.raises(ConversionError) as caught:
        load_keras2_weights(model, FIXTURES / "vit_keras_weights.h5")
    message = str(caught.value)
    assert "1 shape mismatches" in message
    assert "Transformer_posembed_input/pos_embedding: model expects (1, 37, 12)" in message
    assert "Transformer/posembed_input/pos_embedding has (1, 17, 12)" in message
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(before, model.weights))


def test_a_file_of_another_architecture_lists_missing_and_unused_weights():
    model = VGG(**CASES["vgg16_full_model"][1])
    with pytest.raises(ConversionError) as caught:
        load_keras2_weights(model, FIXTURES / "resnet50v2_full_model.h5")
    message = str(caught.value)
    assert "model variables not in the file: block1_conv1/kernel" in message
    assert "file weights the model does not use: conv1_conv/bias" in message


def test_non_keras2_files_are_refused_clearly(tmp_path):
    keras3 = tmp_path / "model.weights.h5"
    VGG(**CASES["vgg16_full_model"][1]).save_weights(keras3)
    with pytest.raises(ConversionError, match="not a Keras-2 weights file"):
        read_keras2_h5(keras3)
    truncated = tmp_path / "truncated.h5"
    data = (FIXTURES / "vgg16_full_model.h5").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="not a readable HDF5 file"):
        read_keras2_h5(truncated)
    damaged = tmp_path / "damaged.h5"
    shutil.copy(FIXTURES / "vgg16_full_model.h5", damaged)
    with h5py.File(damaged, "a") as handle:
        del handle["model_weights/fc1/fc1/kernel:0"]
    with pytest.raises(ConversionError, match="lists weight 'fc1/kernel:0' but does not hold it"):
        read_keras2_h5(damaged)


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match="Unknown architecture 'Transformer'.*vit_b16_harmonized.*ViT"):
        zoo.build_native("Transformer")
    with pytest.raises(ValueError, match="Unknown architecture 'vit_b16_harmonised'. Did you mean 'vit_b16_harmonized'"):
        zoo.build_native("vit_b16_harmonised")
    with pytest.raises(ValueError, match="Did you mean 'EfficientNet'"):
        zoo.build_native("EfficientNett")
    # A published name is its zoo model.
    assert zoo.build_native("levit_small_harmonized", LEVIT_TINY).count_params() == MANIFEST[
        "kecam_levit_weights"]["parameter_count"]


def test_convert_to_preset_records_the_source_and_loads_safely(tmp_path):
    name = "kecam_levit_weights"
    cls, config, _ = CASES[name]
    images, logits, _ = _expected(name)
    path = publish.convert_to_preset(FIXTURES / f"{name}.h5", "LeViT", tmp_path / "levit", config=config,
                                     source_url="https://example.org/levit.h5")
    metadata = read_metadata(path)
    assert metadata["source_sha256"] == MANIFEST[name]["sha256"]
    assert metadata["source_url"] == "https://example.org/levit.h5"
    assert metadata["source_layout"] == "weights" and metadata["architecture"] == "LeViT"
    model = load_model(path)
    assert isinstance(model, LeViT)
    np.testing.assert_allclose(np.asarray(model(images)), logits, atol=TOLERANCE)


def test_zoo_conversions_record_the_imagenet_class_names_of_a_1000_class_head():
    from harmonization.zoo import imagenet_class_names

    source = FIXTURES / "kecam_levit_weights.h5"
    metadata = publish.conversion_metadata(source, "levit128_harmonized", num_classes=1000)
    assert metadata["class_names"] == imagenet_class_names() and metadata["class_names"][0] == "tench"
    assert publish.conversion_metadata(source, "levit128_harmonized")["class_names"] == imagenet_class_names()
    assert "class_names" not in publish.conversion_metadata(source, "levit128_harmonized", num_classes=5)
    assert "class_names" not in publish.conversion_metadata(source, "LeViT", num_classes=1000)  # not a zoo name


def test_cli_convert(tmp_path, capsys):
    name = "resnet50v2_full_model"
    _, config, _ = CASES[name]
    out = tmp_path / "resnet"
    assert cli.main(["convert", str(FIXTURES / f"{name}.h5"), "--arch", "resnet50v2_harmonized", "--out", str(out),
                     "--config", json.dumps(config)]) == 0
    printed = capsys.readouterr().out
    assert "full-model layout, 144 weights, 19,653 parameters" in printed
    assert printed.strip().endswith(str(out))
    metadata = read_metadata(out)
    # A zoo name records the published URL and renders the model card.
    assert metadata["name"] == "resnet50v2_harmonized"
    assert metadata["source_url"].endswith("/resnet50v2_harmonized.h5")
    assert "class_names" not in metadata  # the 5-class test head is not ImageNet's
    assert (out / "README.md").read_text().startswith("---\n")
    images, logits, _ = _expected(name)
    np.testing.assert_allclose(np.asarray(load_model(out)(images)), logits, atol=TOLERANCE)
    # Errors are one line on stderr and exit status 1.
    assert cli.main(["convert", str(FIXTURES / f"{name}.h5"), "--arch", "vgg16_harmonized", "--out",
                     str(tmp_path / "x"), "--config", json.dumps({"image_size": 32})]) == 1
    assert "harmonization convert: error: Cannot load" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert cli.main(["convert", str(FIXTURES / f"{name}.h5"), "--arch", "resnet50v2_harmonised", "--out",
                     str(tmp_path / "x")]) == 1
    assert "Did you mean 'resnet50v2_harmonized'?" in capsys.readouterr().err


def test_cli_convert_infers_the_zoo_model_from_the_published_file_name(tmp_path, capsys):
    published = tmp_path / "downloads" / "levit_small_harmonized.h5"
    published.parent.mkdir()
    shutil.copy(FIXTURES / "kecam_levit_weights.h5", published)
    out = tmp_path / "levit"
    assert cli.main(["convert", str(published), "--out", str(out), "--config", json.dumps(LEVIT_TINY)]) == 0
    assert "into levit128_harmonized." in capsys.readouterr().out
    metadata = read_metadata(out)
    assert metadata["name"] == metadata["architecture"] == "levit128_harmonized"
    images, logits, _ = _expected("kecam_levit_weights")
    np.testing.assert_allclose(np.asarray(load_model(out)(images)), logits, atol=TOLERANCE)
    # A file whose name says nothing needs --arch, and the error lists the published names.
    unnamed = tmp_path / "weights.h5"
    shutil.copy(FIXTURES / "kecam_levit_weights.h5", unnamed)
    assert cli.main(["convert", str(unnamed), "--out", str(tmp_path / "y")]) == 1
    error = capsys.readouterr().err
    assert "Cannot tell which zoo model" in error and "vit-b16_harmonized.h5" in error and "--arch" in error
