"""Presets: save -> load round trip, integrity checks, safe loading."""

import json
import re

import keras
import numpy as np
import pytest

import harmonization.presets as presets
from harmonization._io import json_depth
from harmonization.presets import PresetError, load_model, load_preset, save_preset, verify_preset


@keras.saving.register_keras_serializable(package="harmonization")
class PresetTestAffine(keras.layers.Layer):
    """A custom layer with weights and a constructor argument, as a user's model would have."""

    def __init__(self, offset=0.5, **kwargs):
        super().__init__(**kwargs)
        self.offset = offset

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="random_normal", name="scale")

    def call(self, inputs):
        return inputs * self.scale + self.offset

    def get_config(self):
        return {**super().get_config(), "offset": self.offset}


def _small_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = PresetTestAffine(offset=0.25, name="affine")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(5, name="predictions")(x)
    return keras.Model(inputs, outputs, name="small")


@pytest.fixture
def batch():
    return np.random.default_rng(1).uniform(0, 255, (3, 8, 8, 3)).astype("float32")


def test_round_trip_gives_identical_predictions(tmp_path, batch):
    model = _small_model()
    # Non-trivial BN statistics, so that non-trainable weights are checked too.
    model.get_layer("bn").moving_mean.assign(np.arange(4, dtype="float32"))
    expected = model.predict(batch, verbose=0)
    path = save_preset(model, tmp_path / "preset", metadata={"name": "small", "source_url": "https://x/y.h5"})
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "metadata.json", "model.weights.h5"]
    restored = load_model(path)
    assert restored is not model
    assert isinstance(restored.get_layer("affine"), PresetTestAffine)
    assert restored.get_layer("affine").offset == 0.25
    np.testing.assert_array_equal(restored.predict(batch, verbose=0), expected)
    # str paths work as well as Path objects.
    np.testing.assert_array_equal(load_model(str(path)).predict(batch, verbose=0), expected)


def test_metadata_records_versions_counts_and_file_hashes(tmp_path):
    model = _small_model()
    path = save_preset(model, tmp_path / "p", metadata={"name": "small", "source_sha256": "ab" * 32})
    record = json.loads((path / "metadata.json").read_text())
    assert record["name"] == "small"
    assert record["source_sha256"] == "ab" * 32
    assert record["parameter_count"] == model.count_params() == 3 * 3 * 3 * 4 + 4 + 4 + 4 * 4 + 4 * 5 + 5
    assert record["keras_version"] == keras.__version__
    assert record["format_version"] == presets.PRESET_FORMAT_VERSION
    import hashlib

    for name in ("config.json", "model.weights.h5"):
        data = (path / name).read_bytes()
        assert record["files"][name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    config = json.loads((path / "config.json").read_text())
    assert config["class_name"] == "Functional"


def test_missing_file_is_a_clear_error(tmp_path):
    path = save_preset(_small_model(), tmp_path / "p")
    (path / "model.weights.h5").unlink()
    with pytest.raises(PresetError, match=r"missing \['model.weights.h5'\]"):
        load_model(path)


def test_truncated_weights_are_detected(tmp_path):
    path = save_preset(_small_model(), tmp_path / "p")
    data = (path / "model.weights.h5").read_bytes()
    (path / "model.weights.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(PresetError, match=f"truncated or corrupted: expected {len(data)} bytes"):
        load_model(path)


def test_flipped_byte_is_detected_by_sha256(tmp_path):
    path = save_preset(_small_model(), tmp_path / "p")
    data = bytearray((path / "model.weights.h5").read_bytes())
    data[-100] ^= 0xFF
    (path / "model.weights.h5").write_bytes(bytes(data))
    with pytest.raises(PresetError, match="expected sha256"):
        verify_preset(path)


def _edit_metadata(path, edit):
    record = json.loads((path / "metadata.json").read_text())
    edit(record)
    (path / "metadata.json").write_text(json.dumps(record))


def test_a_preset_without_its_files_record_is_refused_until_signed(tmp_path):
    # Weights replaced and the record dropped: nothing could be checked, so nothing is loaded.
    model = _small_model()
    path = save_preset(model, tmp_path / "p")
    model.set_weights([np.full_like(w, 1e6) for w in model.get_weights()])
    model.save_weights(str(path / "model.weights.h5"))
    _edit_metadata(path, lambda record: record.pop("files"))
    with pytest.raises(PresetError, match=r"cannot be verified.*harmonization sign .*p"):
        load_model(path)
    # Only one of the two files recorded: refused as well.
    presets.sign_preset(path)
    _edit_metadata(path, lambda record: record["files"].pop("config.json"))
    with pytest.raises(PresetError, match=r"cannot be verified: .*\['config.json'\]"):
        verify_preset(path)
    # The owner trusts it: signed, it loads (with the weights it holds), and a later change is detected.
    record = presets.sign_preset(path)
    assert set(record["files"]) == {"config.json", "model.weights.h5"}
    assert np.allclose(load_model(path).get_weights()[0], 1e6)
    (path / "model.weights.h5").write_bytes(b"not an hdf5 file")
    with pytest.raises(PresetError, match="truncated or corrupted"):
        load_model(path)


@pytest.mark.parametrize("entry", ["abc", None, {"size": 3}, {"size": "3", "sha256": "0" * 64},
                                   {"size": 3, "sha256": "xyz"}, {"size": True, "sha256": "0" * 64}])
def test_a_files_entry_that_is_not_a_record_is_refused(tmp_path, entry):
    path = save_preset(_small_model(), tmp_path / "p")
    _edit_metadata(path, lambda record: record["files"].__setitem__("model.weights.h5", entry))
    with pytest.raises(PresetError, match=r"record of 'model.weights.h5' must be"):
        load_model(path)
    _edit_metadata(path, lambda record: record.__setitem__("files", ["config.json"]))
    with pytest.raises(PresetError, match=r"`files` must be an object"):
        load_model(path)


@pytest.mark.parametrize("name", ["../../../../etc/hostname", "/etc/hostname", "sub/config.json", "..", ""])
def test_files_outside_the_preset_folder_are_never_read(tmp_path, name, monkeypatch):
    import builtins

    path = save_preset(_small_model(), tmp_path / "p")
    _edit_metadata(path, lambda record: record["files"].__setitem__(name, {"size": 1, "sha256": "0" * 64}))
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda file, *a, **k: opened.append(str(file)) or real_open(file, *a, **k))
    with pytest.raises(PresetError, match="not a file name inside the preset folder") as caught:
        verify_preset(path)
    assert not any("hostname" in f or f.endswith("sub/config.json") for f in opened)
    assert "expected sha256" not in str(caught.value)


class _ReadsOf:
    """Records every stat and open of a file whose real path is `target`, however it is reached (links)."""

    def __init__(self, monkeypatch, target):
        import builtins
        import io
        import os

        self.target, self.seen = os.path.realpath(target), []
        real_open, real_stat = builtins.open, os.stat

        def watch(function):
            def watched(file, *args, **kwargs):
                if isinstance(file, (str, bytes, os.PathLike)) and os.path.realpath(file) == self.target:
                    self.seen.append(function.__name__)
                return function(file, *args, **kwargs)

            return watched

        for module, name, function in ((builtins, "open", real_open), (io, "open", real_open), (os, "stat", real_stat)):
            monkeypatch.setattr(module, name, watch(function))


def _link_outside(path, name, outside):
    """Move preset file `name` out of the folder (or write a stand-in) and leave a link to it in its place."""
    target = outside / name
    if (path / name).exists():
        (path / name).replace(target)
    else:
        target.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    (path / name).symlink_to(target)
    return target


@pytest.mark.parametrize("name", ["config.json", "model.weights.h5", "metadata.json", "secret.txt"])
def test_links_leading_outside_the_preset_folder_are_never_followed(tmp_path, name, monkeypatch, capsys):
    from harmonization import cli

    path = save_preset(_small_model(), tmp_path / "p")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    if name == "secret.txt":  # an extra `files` entry, as a crafted metadata.json may list (sign keeps it)
        _edit_metadata(path, lambda record: record["files"].__setitem__(name, {"size": 1, "sha256": "0" * 64}))
    target = _link_outside(path, name, outside)
    # Without the check, these files are the preset's own: signing would print their digest and loading would work.
    reads = _ReadsOf(monkeypatch, target)
    refused = "symbolic link leading outside the preset folder"
    for attempt in (verify_preset, load_model, load_preset):
        with pytest.raises(PresetError, match=refused):
            attempt(path)
    if name != "secret.txt":  # signing records the two checked files, and always reads the metadata
        with pytest.raises(PresetError, match=refused):
            presets.sign_preset(path)
        assert cli.main(["sign", str(path)]) == 1
        captured = capsys.readouterr()
        assert refused in captured.err and "sha256" not in captured.out + captured.err
    if name == "metadata.json":
        for attempt in (presets.read_metadata, presets.class_names):
            with pytest.raises(PresetError, match=refused):
                attempt(path)
    assert reads.seen == []
    assert presets.is_preset_dir(path)  # it is meant as a preset: the refusal above says what is wrong


def test_links_inside_the_preset_folder_and_to_a_hub_cache_blob_are_read(tmp_path):
    path = save_preset(_small_model(), tmp_path / "p")
    (path / "model.weights.h5").replace(path / "weights.bin")
    (path / "model.weights.h5").symlink_to("weights.bin")
    verify_preset(path)
    # The Hugging Face cache layout: snapshots/<revision>/<file> are links into the repo's blobs/.
    repo = tmp_path / "hub" / "models--org--name"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for file in ("config.json", "model.weights.h5", "metadata.json"):
        (blobs / file.upper()).write_bytes((path / file).read_bytes())
        (snapshot / file).symlink_to(f"../../blobs/{file.upper()}")
    assert load_model(snapshot).count_params() == _small_model().count_params()
    # ... but not further: a snapshot link out of the repo folder is refused like any other.
    (snapshot / "config.json").unlink()
    (snapshot / "config.json").symlink_to(blobs.parent.parent / "elsewhere.json")
    (blobs.parent.parent / "elsewhere.json").write_bytes((path / "config.json").read_bytes())
    with pytest.raises(PresetError, match="leading outside"):
        verify_preset(snapshot)


@pytest.mark.parametrize("file, text", [
    ("config.json", "[" * 100_000 + "]" * 100_000),  # deeper than Python's json parser goes
    ("config.json", '{"class_name": "Functional", "config": ' + '{"a": ' * 500 + "1" + "}" * 501),
    ("metadata.json", '{"format_version": 1, "x": ' + "[" * 5000 + "]" * 5000 + "}"),
], ids=["config-past-the-parser", "config-past-keras", "metadata"])
def test_deeply_nested_json_is_one_sentence(tmp_path, file, text, capsys):
    from harmonization import cli

    path = save_preset(_small_model(), tmp_path / "p")
    if file == "metadata.json":
        record = json.loads((path / file).read_text())
        text = text.replace('"format_version": 1', json.dumps(record)[1:-1])
    (path / file).write_text(text)
    if file == "config.json":
        presets.sign_preset(path)  # its owner signed it: the sha256 matches, the parse is what must refuse it
    with pytest.raises(PresetError, match=rf"{file}' nests objects and lists more than 100 levels deep"):
        load_model(path)
    image = tmp_path / "image.npy"
    assert cli.main(["predict", str(image), "--model", str(path)]) == 1
    assert "nests objects and lists more than 100 levels deep" in capsys.readouterr().err


def test_real_configs_are_far_from_the_nesting_limit(tmp_path):
    from harmonization.architectures import MaxViT

    # A functional model inside a functional model inside a third, and a zoo architecture: saved and loaded.
    model = _small_model()
    for level in range(2):
        inputs = keras.Input((8, 8, 3))
        model = keras.Model(inputs, model(inputs), name=f"outer{level}")
    for model in (model, MaxViT(image_size=32, depths=[1], widths=[8], stem_width=8, head_dim=4)):
        config = keras.saving.serialize_keras_object(model)
        assert json_depth(config) < presets.MAX_JSON_DEPTH // 3, json_depth(config)
        load_model(save_preset(model, tmp_path / model.name))


def test_corrupt_metadata_json_is_a_clear_error(tmp_path):
    path = save_preset(_small_model(), tmp_path / "p")
    (path / "metadata.json").write_text('{"format_version": 1,')
    with pytest.raises(PresetError, match="metadata.json.*not valid JSON"):
        load_model(path)


def test_newer_format_version_is_refused(tmp_path):
    path = save_preset(_small_model(), tmp_path / "p")
    _edit_metadata(path, lambda record: record.__setitem__("format_version", presets.PRESET_FORMAT_VERSION + 1))
    with pytest.raises(PresetError, match="Upgrade harmonization-hub"):
        load_model(path)


@pytest.mark.parametrize("version", [True, False, 0, -1, "1", 1.0, None])
def test_a_format_version_that_is_not_a_positive_int_is_refused(tmp_path, version):
    path = save_preset(_small_model(), tmp_path / "p")
    _edit_metadata(path, lambda record: record.__setitem__("format_version", version))
    message = rf"`format_version` must be a positive integer .*; got {re.escape(repr(version))}\. The preset is not valid"
    with pytest.raises(PresetError, match=message):
        load_model(path)
    with pytest.raises(PresetError, match=message):
        presets.sign_preset(path)  # signing does not bless a bad version


def test_a_metadata_without_format_version_is_not_a_valid_preset(tmp_path):
    path = save_preset(_small_model(), tmp_path / "p")
    _edit_metadata(path, lambda record: record.pop("format_version"))
    with pytest.raises(PresetError, match=r"not a valid preset: metadata.json has no `format_version`") as caught:
        load_model(path)
    assert "Upgrade" not in str(caught.value) and f"harmonization sign {path}" in str(caught.value)
    assert presets.sign_preset(path)["format_version"] == presets.PRESET_FORMAT_VERSION
    load_model(path)


def test_safe_mode_refuses_code_in_the_config(tmp_path):
    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Lambda(lambda x: x * 2.0)(inputs)
    model = keras.Model(inputs, outputs)
    path = save_preset(model, tmp_path / "lambda")
    with pytest.raises(PresetError, match="safe_mode"):
        load_model(path)


def test_unregistered_class_is_a_clear_error(tmp_path):
    path = save_preset(_small_model(), tmp_path / "p")
    config = json.loads((path / "config.json").read_text())
    text = json.dumps(config).replace("PresetTestAffine", "NoSuchLayer")
    (path / "config.json").write_text(text)
    presets.sign_preset(path)  # a hand-edited config, signed by its owner
    with pytest.raises(PresetError, match="register_keras_serializable"):
        load_model(path)


def test_save_validates_its_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"may not set \['parameter_count'\]"):
        save_preset(_small_model(), tmp_path / "p", metadata={"parameter_count": 3})
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_preset(_small_model(), tmp_path / "p", metadata={"when": object()})
    with pytest.raises(TypeError, match="must be a keras.Model"):
        save_preset(keras.layers.Dense(2), tmp_path / "p")
    unbuilt = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="not built"):
        save_preset(unbuilt, tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_overwrite_replaces_a_preset_but_never_a_foreign_directory(tmp_path, batch):
    first, second = _small_model(0), _small_model(1)
    path = save_preset(first, tmp_path / "p")
    save_preset(second, path)
    np.testing.assert_array_equal(load_model(path).predict(batch, verbose=0), second.predict(batch, verbose=0))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_preset(first, path, overwrite=False)
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="not part of a preset"):
        save_preset(first, foreign)
    assert (foreign / "thesis.tex").read_text() == "precious"
    # No staging directories are left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "p"]


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    model = _small_model()

    def broken_save_weights(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_weights", broken_save_weights)
    with pytest.raises(OSError, match="disk full"):
        save_preset(model, tmp_path / "p")
    assert list(tmp_path.iterdir()) == []


def test_variant_arguments_need_a_zoo_architecture(tmp_path):
    path = save_preset(_small_model(), tmp_path / "p")
    with pytest.raises(ValueError, match=r"does not support \['num_classes'\]"):
        load_preset(path, num_classes=3)
    with pytest.raises(ValueError, match="positive int"):
        load_preset(path, num_classes=0)
    with pytest.raises(ValueError, match="`revision` applies to Hub models"):
        load_model(path, revision="main")


# --- class names -----------------------------------------------------------------------------------------------

NAMES = ["cat", "dog", "owl", "fox", "eel"]


def test_class_names_round_trip_through_metadata_and_the_loaded_model(tmp_path):
    path = save_preset(_small_model(), tmp_path / "p", metadata={"class_names": NAMES})
    assert json.loads((path / "metadata.json").read_text())["class_names"] == NAMES
    assert presets.class_names(path) == presets.class_names(str(path)) == NAMES
    model = load_model(path)
    assert model.class_names == tuple(NAMES)
    assert presets.class_names(model) == NAMES
    # Without recorded names there are none, on the directory and on the model.
    bare = save_preset(_small_model(), tmp_path / "bare")
    assert presets.class_names(bare) is None and presets.class_names(load_model(bare)) is None
    assert not hasattr(load_model(bare), "class_names")
    with pytest.raises(FileNotFoundError, match="no preset directory"):
        presets.class_names(tmp_path / "nowhere")
    with pytest.raises(TypeError, match="keras.Model or a preset directory, got int"):
        presets.class_names(3)


def test_class_names_set_on_a_model_are_saved_and_do_not_break_keras_saving(tmp_path, batch):
    model = _small_model()
    model.class_names = list(NAMES)  # a list: Keras wraps it in a tracked list
    expected = model.predict(batch, verbose=0)
    path = save_preset(model, tmp_path / "p")
    assert presets.class_names(path) == NAMES
    model.save(tmp_path / "model.keras")
    restored = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_array_equal(restored.predict(batch, verbose=0), expected)
    # Explicit metadata wins over the attribute.
    other = ["a", "b", "c", "d", "e"]
    assert presets.class_names(save_preset(model, tmp_path / "q", metadata={"class_names": other})) == other


@pytest.mark.parametrize(
    "names, error, message",
    [
        (NAMES[:4], ValueError, r"`metadata\['class_names'\]` must have one name per output of model 'small': "
                                r"expected 5 names, got 4"),
        ("cat dog owl fox eel", TypeError, r"`metadata\['class_names'\]` must be a list of str"),
        (["cat", "dog", "owl", "fox", 5], TypeError,
         r"`metadata\['class_names'\]` must be a list of str \(one name per class\), got \['cat', .*, 5\]"),
    ],
)
def test_save_checks_class_names(tmp_path, names, error, message):
    with pytest.raises(error, match=r"^save_preset: " + message):
        save_preset(_small_model(), tmp_path / "p", metadata={"class_names": names})
    model = _small_model()
    model.class_names = ["cat"]
    with pytest.raises(ValueError, match=r"`model.class_names` must have one name per output.*expected 5 names, got 1"):
        save_preset(model, tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_class_names_need_a_single_vector_output(tmp_path):
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(2, 3, name="maps")(inputs))
    with pytest.raises(ValueError, match=r"needs a model with one output of shape \(batch, num_classes\); model "
                                         r"'.*' has output shape \(None, 6, 6, 2\)"):
        save_preset(model, tmp_path / "p", metadata={"class_names": ["a", "b"]})


def test_class_names_that_do_not_fit_the_model_are_a_preset_error(tmp_path):
    path = save_preset(_small_model(), tmp_path / "p", metadata={"class_names": NAMES})
    # metadata.json is not hashed: editing it is allowed
    _edit_metadata(path, lambda record: record.__setitem__("class_names", NAMES + ["yak"]))
    with pytest.raises(PresetError, match=r"'class_names' in .* must have one name per output.*expected 5 names, "
                                          r"got 6") as caught:
        load_model(path)
    assert caught.value.bad_file.endswith("metadata.json")


def test_variants_keep_class_names_only_with_the_published_head(tmp_path):
    from harmonization.architectures import VGG

    keras.utils.set_random_seed(0)
    model = VGG(image_size=32, block_filters=[4, 8, 16, 32, 32], fc_units=16, num_classes=5)
    path = save_preset(model, tmp_path / "vgg", metadata={"class_names": NAMES})
    assert load_preset(path).class_names == tuple(NAMES)
    assert load_preset(path, preprocess=False).class_names == tuple(NAMES)
    assert load_preset(path, num_classes=5).class_names == tuple(NAMES)
    assert presets.class_names(load_preset(path, num_classes=3)) is None  # a new head: the names no longer apply
    assert presets.class_names(load_preset(path, include_top=False)) is None
