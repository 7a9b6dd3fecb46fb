"""Cards as the Hub expects them: front matter read back by huggingface_hub's own parser, the three ways to load,
the conversion check with its numbers, and a saliency figure that is the same bytes for the same weights.

The built presets use the kecam LeViT fixture (tests/fixtures/keras2, made by keras-cv-attention-models) in its
tiny config, so each build takes a few seconds.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from harmonization import conversion_check, model_card, zoo
from harmonization.card_figure import FIGURE_FILE, draw_saliency_figure
from harmonization.loader import load_model
from harmonization.presets import verify_preset
from harmonization.publish import PublishError, build_preset

sys.path.insert(0, str(Path(__file__).parent))
from test_convert import FIXTURES, LEVIT_TINY  # noqa: E402  (the kecam LeViT fixture and its config)

SOURCE = FIXTURES / "kecam_levit_weights.h5"
PRESET_FILES = {"config.json", "model.weights.h5", "metadata.json", "README.md", FIGURE_FILE}


def _tiny_entry(name="levit128_harmonized"):
    entry = zoo.model_info(name)
    entry["architecture"]["config"] = dict(LEVIT_TINY)
    return entry


def _card(text):
    from huggingface_hub import ModelCard

    return ModelCard(text)


# --- front matter ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", zoo.list_models())
def test_front_matter_round_trips_through_the_hub_parser(name):
    from huggingface_hub import ModelCardData
    from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

    entry = zoo.model_info(name)
    card = _card(model_card.render_model_card(name))
    data = card.data.to_dict()
    assert data["library_name"] == "keras" and data["pipeline_tag"] == "image-classification"
    assert data["license"] == entry["license"] and data["datasets"] == ["imagenet-1k"]
    assert {"harmonization", "human-alignment", "clickme"} <= set(data["tags"])
    assert "base_model" not in data  # no published model names the weights it started from (model_card.py says why)
    # Parsing the rendered YAML and writing it again gives the same metadata, model-index included.
    assert ModelCardData(**data).to_dict() == data
    if card.data.eval_results is None:
        assert "model-index" not in data
        return
    model_name, results = model_index_to_eval_results(data["model-index"])
    assert model_name == name and results == card.data.eval_results
    assert eval_results_to_model_index(model_name, results) == data["model-index"]
    for result in results:
        assert result.metric_name.endswith(", as published (not re-measured here)") and not result.verified
        assert (result.source_name, result.source_url) == (entry["metrics"]["source"], entry["metrics"]["source_url"])


def test_base_model_is_written_when_an_entry_names_one():
    entry = zoo.model_info("vit_b16_harmonized")
    entry["hub"]["base_model"] = "some-org/vit-base"
    assert _card(model_card.render_model_card(entry)).data.base_model == "some-org/vit-base"
    entry["hub"]["base_model"] = ["some-org/a", "other/b"]
    assert _card(model_card.render_model_card(entry)).data.to_dict()["base_model"] == ["some-org/a", "other/b"]
    for bad in ("vit-base", ["org/a", "b"], [], 3):
        entry["hub"]["base_model"] = bad
        with pytest.raises(ValueError, match="'hub.base_model' must be a Hub model id"):
            model_card.render_model_card(entry)


# --- how to use ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", zoo.list_models())
def test_each_model_maps_to_its_published_loader(name, monkeypatch):
    import harmonization.models
    from harmonization.models import loaders

    function = model_card.published_loader(name)
    assert function in harmonization.models.__all__ and function in loaders.__all__
    monkeypatch.setattr(loaders, "load_published", lambda zoo_name: zoo_name)  # what the function asks for
    assert getattr(harmonization.models, function)() == name


def test_cards_show_three_ways_to_load():
    text = model_card.render_model_card("efficientnet_b0_harmonized", repo_id="org/effnet")
    assert 'harmonization.load_model("efficientnet_b0_harmonized")' in text and '"hf://org/effnet@<commit>"' in text
    assert 'import harmonization  # registers' in text and 'keras.saving.load_model("hf://org/effnet")' in text
    assert 'snapshot_download("org/effnet", revision="<commit>")' in text
    assert "from harmonization.models import load_EfficientNetB0, preprocess_input" in text
    assert "softmax probabilities, as 0.0.9 returned them" in text  # the published file ended in a softmax
    assert "; logits\n" in model_card.render_model_card("vgg16_harmonized")
    entry = zoo.model_info("vgg16_harmonized")
    entry["name"] = "vgg16_new_harmonized"  # not in 0.0.9
    assert "had no loader for this model" in model_card.render_model_card(entry)


# --- the conversion check --------------------------------------------------------------------------------------


def test_every_zoo_family_has_a_fixture_made_by_its_original_library():
    manifest = conversion_check.load_manifest()
    for name in zoo.list_models():
        assert conversion_check.family_fixtures(manifest, zoo.model_info(name)["architecture"]["class_name"]), name


def _fixture_copy(tmp_path, *names):
    folder = tmp_path / "fixtures"
    folder.mkdir()
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    kept = {k: v for k, v in manifest.items() if k.startswith("_") or k in names}
    (folder / "manifest.json").write_text(json.dumps(kept))
    for name in names:
        for suffix in (".h5", ".npz"):
            shutil.copy(FIXTURES / f"{name}{suffix}", folder)
    return folder


def test_the_check_fails_when_the_converter_does_not_reproduce_the_original(tmp_path):
    folder = _fixture_copy(tmp_path, "kecam_levit_weights")
    check = conversion_check.check_entry(_tiny_entry(), folder)
    (only,) = check.checks
    assert only.fixture == "kecam_levit_weights.h5" and only.images == 2 and only.max_abs_diff <= 1e-5
    with np.load(folder / "kecam_levit_weights.npz") as data:
        arrays = dict(data)
    arrays["logits"] = arrays["logits"] + 1e-3  # an original that the converter no longer matches
    np.savez(folder / "kecam_levit_weights.npz", **arrays)
    with pytest.raises(conversion_check.ConversionCheckError, match=r"max \|difference\| 0.001 > 0.0001 on 2 images"):
        conversion_check.check_entry(_tiny_entry(), folder)
    with pytest.raises(PublishError, match="does not reproduce the original library's logits"):
        build_preset(_tiny_entry(), SOURCE, tmp_path / "preset", check_round_trip=True, conversion_fixtures=folder)
    assert "no conversion fixture made by an original library exists for VGG" == conversion_check.check_entry(
        zoo.model_info("vgg16_harmonized"), folder).not_run


def test_without_fixtures_the_card_says_the_check_was_not_run(tmp_path, monkeypatch):
    assert conversion_check.default_fixtures_dir() == FIXTURES  # a checkout has them
    monkeypatch.setattr(conversion_check, "default_fixtures_dir", lambda: None)  # an installed package has none
    built = build_preset(_tiny_entry(), SOURCE, tmp_path / "preset", check_round_trip=True, require_card=True,
                         figure=False)
    assert built.conversion.checks == () and built.round_trip_max_abs_diff is not None
    text = (built.path / "README.md").read_text()
    assert "**Against the original library**: not run for this build, because the conversion fixtures" in text
    assert "Max abs logit difference |" not in text and "Preset round trip" in text
    assert built.figure is None and "## Saliency" not in text and f"]({FIGURE_FILE})" not in text
    assert not (built.path / FIGURE_FILE).exists()
    # A card rendered outside a publishing build claims no check at all.
    assert "No check was run for this rendering." in model_card.render_model_card("vgg16_harmonized")


# --- the figure ------------------------------------------------------------------------------------------------


def test_the_figure_is_the_same_bytes_for_the_same_weights(tmp_path):
    from PIL import Image

    from harmonization.convert import load_keras2_weights

    model = zoo.build(_tiny_entry(), **LEVIT_TINY)
    load_keras2_weights(model, SOURCE)
    first = draw_saliency_figure(model, tmp_path / "a.png", class_names=list("abcde"))
    second = draw_saliency_figure(model, tmp_path / "b.png", class_names=list("abcde"))
    assert first.read_bytes() == second.read_bytes()
    with Image.open(first) as image:
        assert image.format == "PNG" and "Software" not in image.info  # no matplotlib version in the bytes
    head = [w for w in model.weights if "kernel" in w.path][-1]
    head.assign(-head)  # other weights: another top class, other maps
    assert draw_saliency_figure(model, tmp_path / "c.png").read_bytes() != first.read_bytes()


def test_a_preset_built_twice_is_the_same_bytes_and_still_loads(tmp_path):
    folders = [build_preset(_tiny_entry(), SOURCE, tmp_path / name, repo_id="org/levit", check_round_trip=True,
                            require_card=True).path for name in ("a", "b")]
    for folder in folders:
        assert {p.name for p in folder.iterdir()} == PRESET_FILES
    for name in sorted(PRESET_FILES):
        assert (folders[0] / name).read_bytes() == (folders[1] / name).read_bytes(), name
    verify_preset(folders[0])
    data = np.load(FIXTURES / "kecam_levit_weights.npz")
    np.testing.assert_allclose(np.asarray(load_model(folders[0])(data["images"].astype("float32"))), data["logits"],
                               atol=1e-4)
    card = _card((folders[0] / "README.md").read_text())
    assert f"![Saliency maps of levit128_harmonized on generated images]({FIGURE_FILE})" in card.text
    assert "| `kecam_levit_weights.h5` | `keras_cv_attention_models.levit.LeViT(" in card.text
    assert "keras-cv-attention-models 1.3.9" in card.text and "| weights | 2 (96x96) |" in card.text
    # Rebuilt over itself (the figure is a preset file, not a foreign one), it stays the same.
    build_preset(_tiny_entry(), SOURCE, folders[0], repo_id="org/levit", check_round_trip=True, require_card=True)
    assert (folders[0] / FIGURE_FILE).read_bytes() == (folders[1] / FIGURE_FILE).read_bytes()
