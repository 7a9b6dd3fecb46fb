"""`load_model` and `save_preset` on every backend, without TensorFlow: a preset directory, an `hf://` URI, a zoo name
served from its published `.h5`, and one clear error for a preset this backend cannot build.

Each backend runs the same scenario (`exercise`): here for the current one, in a child process for each other one
installed (one child per backend). The presets it loads are TensorFlow's: the committed preset
tests/fixtures/backends/tensorflow_preset (with TensorFlow's logits, tools/make_backend_fixtures.py) and the kecam
LeViT fixture in the published Keras-2 layout, whose logits the original library computed on TensorFlow 2.15
(tools/make_conversion_fixtures.py). The Hub is the local stand-in of tests/hub_server.py.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pytest

from backend_helpers import current_backend, other_backends
from test_backends_zoo import (
    HERE, TENSORFLOW_PRESET, TINY, TOLERANCE, build_case, child_environment, fingerprint, logits_of, on_backend,
    relative_difference,
)

pytestmark = pytest.mark.backends

KERAS2 = HERE / "fixtures" / "keras2"
#: The kecam LeViT fixture's config (as tests/test_convert.py), standing in for levit128_harmonized's original.
LEVIT_TINY = dict(image_size=96, patch_channel=16, out_channels=[24, 32, 32], num_heads=[2, 4, 4], depths=[2, 1, 1],
                  key_dims=[4, 4, 4], num_classes=5)
#: The published originals' tolerance (tests/test_convert.py): their logits come from another library.
ORIGINAL_TOLERANCE = 1e-4
REPO = "serre-lab/tiny_backend_preset"


# --- the scenario every backend runs ---------------------------------------------------------------------------


def _small_functional_preset(folder: Path) -> Path:
    """A preset of Input -> Dense('head'): the layer the error variants replace in its config."""
    import keras

    import harmonization

    inputs = keras.Input((4,), name="features")
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(inputs))
    return harmonization.save_preset(model, folder)


def _variant(preset: Path, folder: Path, edit: Callable[[dict], None],
             metadata: Mapping[str, Any] | None = None) -> Path:
    """A copy of `preset` whose 'head' layer (and metadata) `edit` changed, signed as its owner would sign it."""
    from harmonization.presets import sign_preset

    shutil.copytree(preset, folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    edit(next(layer for layer in config["config"]["layers"] if layer["name"] == "head"))
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    if metadata:
        record = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
        (folder / "metadata.json").write_text(json.dumps({**record, **metadata}), encoding="utf-8")
    sign_preset(folder)
    return folder


def _as_class(class_name: str, module: str, registered_name: str | None = None) -> Callable[[dict], None]:
    def edit(layer: dict) -> None:
        layer.update(class_name=class_name, module=module, registered_name=registered_name)
    return edit


#: Error variants: name -> (how the 'head' layer is changed, metadata added).
VARIANTS = {
    "torch_module_wrapper": (_as_class("TorchModuleWrapper", "keras.layers"), None),
    "jax_layer": (_as_class("JaxLayer", "keras.layers"), None),
    "tfsm_layer": (_as_class("TFSMLayer", "keras.layers"), None),
    "unregistered_class": (_as_class("Mine", "mylab.layers", "mylab>Mine"), None),
    "future_harmonization_class": (_as_class("FutureLayer", "harmonization.layers", "harmonization>FutureLayer"),
                                   {"harmonization_version": "99.0"}),
    "missing_keras_hub": (_as_class("Backbone", "keras_hub.src.models.backbone"), None),
}


def exercise(work: str) -> dict[str, Any]:
    """Load and save presets every way a user can, on the current backend; return what happened, as JSON.

    TensorFlow is checked (`tensorflow_imported`) after the loads and before anything is saved: saving imports it
    where it is installed (Keras's serialiser checks for `tf.TensorShape`), which would hide an import by a load.
    """
    import importlib.util

    import keras

    import harmonization
    from harmonization.loader import resolve_preset
    from harmonization.presets import PresetError, read_metadata
    from hub_server import FakeHub, patch_zoo_entry, point_huggingface_hub_at  # the local stand-in of the Hub

    work_dir = Path(work)
    backend = keras.backend.backend()
    reference = TINY["cases"]["vgg_smallest"]
    out: dict[str, Any] = {"backend": backend}
    with FakeHub() as fake, pytest.MonkeyPatch.context() as monkeypatch:
        point_huggingface_hub_at(fake, monkeypatch, work_dir)
        # A preset directory, and the same preset through an hf:// URI: TensorFlow's logits.
        out["directory"] = relative_difference(logits_of(harmonization.load_model(TENSORFLOW_PRESET), reference),
                                               reference["logits"])
        fake.add_preset(REPO, TENSORFLOW_PRESET)
        out["hf"] = relative_difference(logits_of(harmonization.load_model(f"hf://{REPO}"), reference),
                                        reference["logits"])
        out["tensorflow_imported"] = "tensorflow" in sys.modules
        # Keras's own loader (safe_mode on): our classes are registered by `import harmonization`. Keras 3.15
        # reads an "hf://" path only where TensorFlow is installed (its gfile); a downloaded folder always.
        import huggingface_hub

        out["plain_keras"] = {}
        for how, path in (("hf", f"hf://{REPO}"), ("folder", huggingface_hub.snapshot_download(REPO))):
            try:
                plain = keras.saving.load_model(path)
            except ValueError as error:
                out["plain_keras"][how] = f"error: {error}"
            else:
                out["plain_keras"][how] = [type(plain).__name__,
                                           relative_difference(logits_of(plain, reference), reference["logits"])]
        out["tensorflow_installed"] = importlib.util.find_spec("tensorflow") is not None

        # A zoo name whose Hub repo does not exist: its published Keras-2 .h5, converted with h5py and cached.
        url = fake.add_static("/bucket/levit128_harmonized.h5", (KERAS2 / "kecam_levit_weights.h5").read_bytes())
        patch_zoo_entry(monkeypatch, "levit128_harmonized", url=url, config=LEVIT_TINY)
        original = np.load(KERAS2 / "kecam_levit_weights.npz")
        model = harmonization.load_model("levit128_harmonized")
        converted = np.asarray(keras.ops.convert_to_numpy(model(original["images"].astype("float32"))))
        out["zoo"] = {
            "max_abs_difference": float(np.abs(converted - original["logits"]).max()),
            "keras_backend": read_metadata(resolve_preset("levit128_harmonized"))["keras_backend"],
            "downloads": [path for _, path in fake.requests].count("/bucket/levit128_harmonized.h5"),
        }
        from huggingface_hub import constants  # the client the loader asks whether it is offline

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        out["zoo"]["offline_head"] = list(harmonization.load_model("levit128_harmonized", num_classes=3).output_shape)

    # save_preset of a model built here, loaded back as the same model.
    built = build_case(TINY["cases"]["vit"])
    saved = harmonization.save_preset(built, work_dir / "saved")
    out["save"] = {"keras_backend": read_metadata(saved)["keras_backend"],
                   "same_model": fingerprint(harmonization.load_model(saved)) == fingerprint(built)}

    # Presets this backend cannot build: each one PresetError, whose message is recorded.
    base = _small_functional_preset(work_dir / "functional")
    out["errors"] = {}
    for name, (edit, metadata) in VARIANTS.items():
        if name == "missing_keras_hub" and importlib.util.find_spec("keras_hub") is not None:
            continue  # installed here: nothing is missing
        try:
            harmonization.load_model(_variant(base, work_dir / name, edit, metadata))
        except PresetError as error:
            out["errors"][name] = str(error)
        except Exception as error:  # noqa: BLE001 - recorded, and the test says which kind it was
            out["errors"][name] = f"not a PresetError: {type(error).__name__}: {error}"[:2000]
        else:
            out["errors"][name] = "loaded"
    return out


# --- the tests -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def observations(tmp_path_factory, pytestconfig) -> dict[str, dict[str, Any]]:
    """`exercise` on this process's backend and, in a child each, on every other one installed."""
    env = child_environment(pytestconfig, tmp_path_factory)
    return {backend: on_backend(backend, "exercise", module=__name__, env=env,
                                work=str(tmp_path_factory.mktemp(f"exercise_{backend}")))
            for backend in [current_backend(), *other_backends()]}


def test_a_preset_directory_and_an_hf_uri_load_on_every_backend(observations):
    for backend, seen in observations.items():
        assert seen["backend"] == backend
        assert seen["directory"] <= TOLERANCE and seen["hf"] <= TOLERANCE, (backend, seen["directory"], seen["hf"])
        if backend != "tensorflow":
            assert not seen["tensorflow_imported"], f"loading a preset on {backend} imported TensorFlow"


def test_plain_keras_loads_the_hub_repo_on_every_backend(observations):
    for backend, seen in observations.items():
        plain = seen["plain_keras"]
        class_name, difference = plain["folder"]
        assert class_name == "VGG" and difference <= TOLERANCE, (backend, plain)
        if seen["tensorflow_installed"] or not isinstance(plain["hf"], str):
            class_name, difference = plain["hf"]
            assert class_name == "VGG" and difference <= TOLERANCE, (backend, plain)
        else:  # Keras's own limitation (keras/src/utils/file_utils.py isdir), which the README states
            assert "Handling remote paths requires installing TensorFlow" in plain["hf"], (backend, plain)


def test_a_zoo_name_is_converted_from_its_published_h5_on_every_backend(observations):
    for backend, seen in observations.items():
        zoo = seen["zoo"]
        assert zoo["max_abs_difference"] <= ORIGINAL_TOLERANCE, (backend, zoo)
        assert zoo["keras_backend"] == backend and zoo["downloads"] == 1, (backend, zoo)
        assert zoo["offline_head"] == [None, 3], (backend, zoo)  # served from the cache, offline


def test_save_preset_on_every_backend(observations):
    for backend, seen in observations.items():
        assert seen["save"] == {"keras_backend": backend, "same_model": True}, (backend, seen["save"])


def _errors(observations: Mapping[str, Any], variant: str) -> dict[str, str]:
    found = {backend: seen["errors"][variant] for backend, seen in observations.items() if variant in seen["errors"]}
    wrong = {backend: message for backend, message in found.items() if message.startswith(("not a", "loaded"))}
    assert not wrong, f"{variant}: not one clear PresetError: {wrong}"
    return found


def test_a_torch_module_wrapper_is_one_sentence_on_every_backend(observations):
    for backend, message in _errors(observations, "torch_module_wrapper").items():
        assert "layer 'head' (TorchModuleWrapper)" in message and "runs only on the PyTorch backend" in message
        assert "never unpickles" in message and "model.load_weights(" in message, (backend, message)


def test_a_layer_for_another_backend_names_the_backend_to_use(observations):
    expected = {"jax_layer": ("JAX or TensorFlow", "KERAS_BACKEND=jax", ("torch",)),
                "tfsm_layer": ("TensorFlow", "KERAS_BACKEND=tensorflow", ("jax", "torch"))}
    for variant, (runs_on, fix, refused_on) in expected.items():
        for backend, message in _errors(observations, variant).items():
            if backend in refused_on:
                assert f"runs only on the {runs_on} backend" in message and fix in message, (backend, message)
                assert f"the Keras backend here is {backend!r}" in message


def test_an_unknown_custom_class_says_how_to_register_it(observations):
    for backend, message in _errors(observations, "unregistered_class").items():
        assert "needs the custom class 'mylab>Mine' (layer 'head' (Mine))" in message, (backend, message)
        assert "@keras.saving.register_keras_serializable" in message and "upgrade" not in message
    for backend, message in _errors(observations, "future_harmonization_class").items():
        assert "'harmonization>FutureLayer'" in message and "written by harmonization-hub 99.0" in message
        assert "pip install -U harmonization-hub" in message, (backend, message)


def test_a_missing_keras_library_names_its_install_command(observations):
    found = _errors(observations, "missing_keras_hub")
    if not found:
        pytest.skip("keras_hub is installed here, so nothing is missing")
    for backend, message in found.items():
        assert "from keras_hub, which is not installed" in message and "pip install keras-hub" in message, message
