"""The zoo registry: every entry is complete and consistent, look-ups fail helpfully."""

import json
from importlib import resources

import pytest

import harmonization.zoo as zoo
from harmonization.zoo import UnknownModelError, list_models, model_info

PUBLISHED = {
    "vit_b16_harmonized": "vit-b16_harmonized.h5",
    "resnet50v2_harmonized": "resnet50v2_harmonized.h5",
    "vgg16_harmonized": "vgg16_harmonized.h5",
    "efficientnet_b0_harmonized": "efficientnetB0_harmonized.h5",
    "convnext_tiny_harmonized": "convnext_tiny_harmonized.h5",
    "maxvit_tiny_harmonized": "maxvit_tiny_harmonized.h5",
    "levit128_harmonized": "levit_small_harmonized.h5",
}


def test_list_models_is_the_published_zoo():
    assert list_models() == sorted(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_entry_is_complete(name):
    info = model_info(name)
    assert info["name"] == name
    assert info["source"]["url"] == (
        "https://storage.googleapis.com/serrelab/prj_harmonization/models/" + PUBLISHED[name]
    )
    assert info["architecture"]["module"].startswith("harmonization.architectures.")
    assert info["architecture"]["config"]["num_classes"] == 1000
    assert info["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    assert info["preprocessing"]["std"] == [0.229, 0.224, 0.225]
    assert info["preprocessing"]["input_range"] == [0, 255]
    assert info["hub"]["repo_id"].count("/") == 1
    assert isinstance(info["parameter_count"], int) and info["parameter_count"] > 1_000_000
    assert info["license"] == "mit"


def test_published_parameter_counts():
    counts = {name: model_info(name)["parameter_count"] for name in PUBLISHED}
    assert counts["vit_b16_harmonized"] == 86_567_656
    assert counts["resnet50v2_harmonized"] == 25_613_800
    assert counts["vgg16_harmonized"] == 138_357_544
    assert counts["convnext_tiny_harmonized"] == 28_589_128
    assert counts["maxvit_tiny_harmonized"] == 30_964_144
    assert counts["levit128_harmonized"] == 8_876_008


def test_entries_are_package_data_named_after_the_model():
    files = sorted(p.name for p in resources.files("models").iterdir() if p.name.endswith(".json"))
    assert files == sorted(f"{name}.json" for name in PUBLISHED)
    for name in files:
        json.loads(resources.files("models").joinpath(name).read_text())  # valid JSON


def test_model_info_returns_a_copy():
    info = model_info("vit_b16_harmonized")
    info["architecture"]["config"]["num_classes"] = 3
    assert model_info("vit_b16_harmonized")["architecture"]["config"]["num_classes"] == 1000


def test_unknown_name_lists_the_zoo_and_the_closest_match():
    with pytest.raises(UnknownModelError) as caught:
        model_info("vit_b16_harmonised")
    message = str(caught.value)
    assert "Did you mean 'vit_b16_harmonized'?" in message
    for name in PUBLISHED:
        assert name in message
    assert isinstance(caught.value, KeyError)


def test_unknown_name_without_close_match_has_no_suggestion():
    with pytest.raises(UnknownModelError, match="Unknown model 'xyz'. The zoo has: convnext_tiny_harmonized"):
        model_info("xyz")


def test_invalid_entries_are_rejected():
    with pytest.raises(ValueError, match="lacks required keys"):
        zoo._validate({"name": "a"}, "a.json")
    entry = model_info("vgg16_harmonized")
    with pytest.raises(ValueError, match="the file must be vgg16_harmonized.json"):
        zoo._validate(entry, "other.json")
    entry["architecture"]["module"] = "os"
    with pytest.raises(ValueError, match="outside harmonization.architectures"):
        zoo._validate(entry, "vgg16_harmonized.json")


def test_entries_have_a_display_name_and_cite_their_metrics():
    for name in PUBLISHED:
        info = model_info(name)
        assert isinstance(info["display_name"], str) and info["display_name"]
        metrics = info["metrics"]
        assert {"imagenet_top1", "clickme_alignment_spearman", "source", "source_url"} <= set(metrics)
        for key in ("imagenet_top1", "clickme_alignment_spearman"):
            assert metrics[key] is None or isinstance(metrics[key], (int, float))
        # A number is only ever filled in together with where it was read.
        assert isinstance(metrics["source"], str) and metrics["source"]
        assert metrics["source_url"].startswith("https://")
