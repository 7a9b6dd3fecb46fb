"""The zoo registry: every entry is complete and consistent, look-ups fail helpfully."""

import json
from importlib import resources
from pathlib import Path

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


def test_entries_are_the_repository_models_folder_named_after_the_model():
    folder = zoo._entries_folder()  # package data when installed (tests/test_packaging.py), else the checkout's
    files = sorted(p.name for p in folder.iterdir() if p.name.endswith(".json") and not p.name.startswith("_"))
    assert files == sorted(f"{name}.json" for name in PUBLISHED)
    for name in files:
        assert json.loads(folder.joinpath(name).read_text())["name"] == name.removesuffix(".json")


def test_published_names_are_aliases_of_the_zoo_names():
    # serre-lab/Harmonization 0.0.9 cached its files under these names (models/*.py, get_file's first argument).
    published_cache_names = {
        "resnet50v2_harmonized": "resnet50v2_harmonized", "efficientnetB0_harmonized": "efficientnet_b0_harmonized",
        "vgg16_harmonized": "vgg16_harmonized", "vit-b16_harmonized": "vit_b16_harmonized",
        "tiny_convnext_harmonized": "convnext_tiny_harmonized", "maxvit_tiny_harmonized": "maxvit_tiny_harmonized",
        "levit_small_harmonized": "levit128_harmonized",
    }
    for alias, name in published_cache_names.items():
        assert zoo.canonical_name(alias) == name
        assert model_info(alias)["name"] == name
        assert zoo.model_for_file(f"/home/me/.keras/models/{alias}") == name
    for name in PUBLISHED:
        filename = model_info(name)["source"]["url"].rsplit("/", 1)[-1]
        assert zoo.model_for_file(Path("downloads") / filename) == name
        assert zoo.model_for_file(filename.upper()) == name  # case does not matter for file names
    assert zoo.list_models() == sorted(PUBLISHED)  # aliases are not listed as models
    assert zoo.model_for_file("my_model.h5") is None and zoo.canonical_name("nope") is None
    with pytest.raises(UnknownModelError, match="Did you mean 'levit_small_harmonized'"):
        model_info("levit_smal_harmonized")


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
        zoo.validate_entry({"name": "a"}, "a.json")
    entry = model_info("vgg16_harmonized")
    with pytest.raises(ValueError, match="the file must be vgg16_harmonized.json"):
        zoo.validate_entry(entry, "other.json")
    entry["architecture"]["module"] = "os"
    with pytest.raises(ValueError, match="outside harmonization.architectures"):
        zoo.validate_entry(entry, "vgg16_harmonized.json")


def test_entries_have_a_display_name_and_cite_their_metrics():
    for name in PUBLISHED:
        info = model_info(name)
        assert isinstance(info["display_name"], str) and info["display_name"]
        metrics = info["metrics"]
        assert set(metrics) == {"imagenet_top1", "clickme_alignment", "baseline", "source", "source_url"}
        assert set(metrics["baseline"]) == {"imagenet_top1", "clickme_alignment"}
        assert isinstance(metrics["source"], str) and metrics["source"]
        assert metrics["source_url"].startswith("https://github.com/serre-lab/Harmonization/")


# The paper's numbers (harmonized top-1, alignment; baseline top-1, alignment), in %. Read off the plot of
# arXiv 2211.04533 (serre-lab/Harmonization docs/assets/imagenet_results.png, ±0.5 points); ConvNeXt's alignment
# from serre-lab/Harmonization PR #11; MaxViT and LeViT have none.
PAPER = {
    "vit_b16_harmonized": (75.7, 72.5, 73.3, 31.5),
    "resnet50v2_harmonized": (77.2, 45.0, 76.0, 32.7),
    "vgg16_harmonized": (69.3, 61.5, 67.2, 23.3),
    "efficientnet_b0_harmonized": (77.8, 44.8, 77.7, 25.2),
    "convnext_tiny_harmonized": (None, 74.0, None, None),
    "maxvit_tiny_harmonized": (None, None, None, None),
    "levit128_harmonized": (None, None, None, None),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_paper_metrics_are_the_published_numbers_with_their_source(name):
    metrics = zoo.paper_metrics(name)
    baseline = metrics["baseline"]
    assert (metrics["imagenet_top1"], metrics["clickme_alignment"], baseline["imagenet_top1"],
            baseline["clickme_alignment"]) == PAPER[name]
    if name == "convnext_tiny_harmonized":
        assert "PR #11" in metrics["source"] and metrics["source_url"].endswith("/pull/11")
    elif metrics["imagenet_top1"] is None:
        assert metrics["source"].startswith("not published")
    else:
        assert "read off" in metrics["source"] and "±0.5 points" in metrics["source"]
        assert metrics["source_url"].endswith("docs/assets/imagenet_results.png")
    assert ("~30-33" in metrics["source"]) == (name == "vit_b16_harmonized")


def test_paper_metrics_returns_a_copy_of_the_entry_block():
    metrics = zoo.paper_metrics("vgg16_harmonized")
    assert metrics == model_info("vgg16_harmonized")["metrics"]
    metrics["baseline"]["imagenet_top1"] = 0.0
    assert zoo.paper_metrics("vgg16_harmonized")["baseline"]["imagenet_top1"] == 67.2
    with pytest.raises(UnknownModelError):
        zoo.paper_metrics("vgg_harmonized")


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_entries_say_what_the_original_returned(name):
    output = model_info(name)["output"]
    assert output["native"] == "logits"  # converted models never end in a softmax
    # Only the `efficientnet` package's EfficientNetB0 ends in Dense('probs', activation='softmax').
    assert output["original"] == ("probabilities" if name == "efficientnet_b0_harmonized" else "logits")
    assert "serre-lab/Harmonization harmonization/models/" in output["evidence"]


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("metrics", "imagenet_top1"), 101.0, r"'metrics.imagenet_top1' must be a percentage in \[0, 100\] or null, "
                                              r"got 101.0"),
        (("metrics", "clickme_alignment"), 0.44, None),  # a fraction is a valid number: only the range is checked
        (("metrics", "clickme_alignment"), "44.8", r"'metrics.clickme_alignment' must be a percentage.*got '44.8'"),
        (("metrics", "baseline", "imagenet_top1"), -1, r"'metrics.baseline.imagenet_top1' must be a percentage"),
        (("metrics", "baseline", "clickme_alignment"), True, r"'metrics.baseline.clickme_alignment'.*got True"),
        (("metrics", "baseline"), None, r"'metrics.baseline' must be an object with the keys"),
        (("metrics", "source"), " ", r"'metrics.source' must say where the numbers come from"),
        (("metrics", "source_url"), None, r"'metrics.source_url' must say where"),
        (("metrics", "clickme_alignment_spearman"), 0.5,
         r"'metrics' must have exactly the keys .*unknown \['clickme_alignment_spearman'\]"),
        (("output", "original"), "softmax", r"'output.original' must be one of \['logits', 'probabilities'\], "
                                            r"got 'softmax'"),
        (("output", "native"), None, r"'output.native' must be one of"),
        (("output", "evidence"), "", r"'output.evidence' must say how"),
    ],
)
def test_invalid_metrics_and_output_are_rejected_naming_file_and_key(path, value, message):
    entry = model_info("vgg16_harmonized")
    block = entry
    for key in path[:-1]:
        block = block[key]
    block[path[-1]] = value
    if message is None:
        assert zoo.validate_entry(entry, "vgg16_harmonized.json") is entry
        return
    with pytest.raises(ValueError, match=r"^Zoo entry vgg16_harmonized.json: " + message):
        zoo.validate_entry(entry, "vgg16_harmonized.json")


def test_metrics_without_baseline_or_with_a_missing_key_are_rejected():
    entry = model_info("vgg16_harmonized")
    del entry["metrics"]["baseline"]
    with pytest.raises(ValueError, match=r"vgg16_harmonized.json: 'metrics' must have exactly the keys .*"
                                         r"missing \['baseline'\]"):
        zoo.validate_entry(entry, "vgg16_harmonized.json")
    entry = model_info("vgg16_harmonized")
    del entry["metrics"]
    with pytest.raises(ValueError, match=r"lacks required keys \['metrics'\]"):
        zoo.validate_entry(entry, "vgg16_harmonized.json")


def test_imagenet_class_names_ship_with_the_package():
    names = zoo.imagenet_class_names()
    assert len(names) == 1000 and all(isinstance(n, str) and n.strip() == n and n for n in names)
    assert names[0] == "tench" and names[1] == "goldfish" and names[999] == "toilet tissue"
    assert names[207] == "golden retriever" and names[281] == "tabby"
    text = resources.files("harmonization").joinpath(zoo.IMAGENET_CLASSES_FILE).read_text(encoding="utf-8")
    assert text.splitlines() == names
    names.append("extra")  # a copy: callers cannot change the zoo's list
    assert len(zoo.imagenet_class_names()) == 1000


# --- family defaults and build(entry) ---------------------------------------------------------------------------


def test_entries_hold_only_what_differs_from_the_family_defaults():
    folder = zoo._entries_folder()
    defaults = json.loads(folder.joinpath(zoo.FAMILY_DEFAULTS_FILE).read_text())
    for name in PUBLISHED:
        raw = json.loads(folder.joinpath(f"{name}.json").read_text())
        assert "preprocessing" not in raw and "paper" not in raw and "license" not in raw
        entry = model_info(name)
        assert entry["hub"]["repo_id"] == f"{zoo.default_namespace()}/{name}"  # "{name}" filled in
        assert entry["preprocessing"] == defaults["preprocessing"]
        assert entry["architecture"]["config"] == {**defaults["architecture"]["config"],
                                                   **raw["architecture"]["config"]}


def test_an_entry_overrides_the_defaults_object_by_object_and_replaces_lists():
    defaults = {"hub": {"repo_id": "org/{name}", "revision": None}, "aliases": ["x"], "license": "mit",
                "description": "{display_name}!"}
    entry = model_info("vgg16_harmonized")
    raw = {key: value for key, value in entry.items() if key not in ("hub", "license", "description", "aliases")}
    raw["hub"] = {"revision": "abc"}
    raw["aliases"] = ["vgg"]
    merged = zoo.with_family_defaults(raw, "vgg16_harmonized.json", defaults)
    assert merged["hub"] == {"repo_id": "org/vgg16_harmonized", "revision": "abc"}
    assert merged["aliases"] == ["vgg"] and merged["license"] == "mit" and merged["description"] == "VGG16!"
    with pytest.raises(ValueError, match="lacks required keys"):
        zoo.with_family_defaults({"name": "vgg16_harmonized"}, "vgg16_harmonized.json", {})


def test_the_entry_preprocessing_is_the_normalisation_inside_the_built_model():
    import numpy as np

    entry = model_info("vgg16_harmonized")
    entry["preprocessing"].update(scale=1.0, mean=[10.0, 20.0, 30.0], std=[2.0, 4.0, 5.0])
    small = dict(image_size=32, block_filters=[2, 2, 2, 2, 2], fc_units=4, num_classes=3)
    model = zoo.build(entry, **small)
    layer = model.get_layer("preprocessing")
    x = np.full((1, 32, 32, 3), 50.0, "float32")
    np.testing.assert_allclose(np.asarray(layer(x))[0, 0, 0], [20.0, 7.5, 4.0], rtol=1e-6)
    assert model.get_config()["preprocess"] == {"scale": 1.0, "mean": [10.0, 20.0, 30.0], "std": [2.0, 4.0, 5.0]}
    bare = zoo.build(entry, preprocess=False, **small)
    assert "preprocessing" not in [lay.name for lay in bare.layers]
    entry["preprocessing"]["in_model"] = False
    assert "preprocessing" not in [lay.name for lay in zoo.build(entry, **small).layers]
