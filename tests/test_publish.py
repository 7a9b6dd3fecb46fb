"""Model cards and `harmonization publish`: the real huggingface_hub upload against the local Hub stand-in.

The stand-in (tests/hub_server.py) speaks create-repo, validate-yaml, preupload, the LFS batch/upload/verify
protocol and the NDJSON commit as huggingface_hub 2.4 sends them, and requires the bearer token on writes.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from harmonization import cli, model_card, zoo
from harmonization.loader import load_model
from harmonization.presets import read_metadata, verify_preset
from harmonization.publish import PublishError, publish

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import FakeHub, patch_zoo_entry, point_huggingface_hub_at  # noqa: E402
from test_convert import LEVIT_TINY  # noqa: E402  (the kecam LeViT fixture's config)

FIXTURES = Path(__file__).parent / "fixtures" / "keras2"
NAME = "levit128_harmonized"
REPO = "test-org/levit128_harmonized"
TOKEN = "hf_test_write_token"
SOURCE = FIXTURES / "kecam_levit_weights.h5"
# The preset, its card and the card's figure.
PRESET_FILES = {"config.json", "model.weights.h5", "metadata.json", "README.md", "saliency.png"}


@pytest.fixture
def tiny_zoo(monkeypatch):
    """The zoo, with levit128_harmonized's architecture shrunk to the kecam fixture's config."""
    return patch_zoo_entry(monkeypatch, NAME, config=LEVIT_TINY)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path, tiny_zoo):
    with FakeHub() as fake:
        fake.token = TOKEN
        point_huggingface_hub_at(fake, monkeypatch, tmp_path, token=TOKEN)
        yield fake


def _expected():
    data = np.load(FIXTURES / "kecam_levit_weights.npz")
    return data["images"].astype("float32"), data["logits"]


# --- model cards ---------------------------------------------------------------------------------------------


def test_every_zoo_entry_renders_a_card_the_hub_client_parses():
    from huggingface_hub import ModelCard

    for name in zoo.list_models():
        text = model_card.render_model_card(name)
        card = ModelCard(text)
        data = card.data.to_dict()
        assert data["library_name"] == "keras" and data["license"] == "mit"
        assert data["pipeline_tag"] == "image-classification"
        assert data["datasets"] == ["imagenet-1k"] and "neural-harmonizer" in data["tags"]
        assert "{{" not in text and "{#" not in text
        entry = zoo.model_info(name)
        assert f'harmonization.load_model("{name}")' in text
        assert f"hf://{entry['hub']['repo_id']}" in text
        assert entry["source"]["url"] in text and f"{entry['parameter_count']:,} parameters" in text
        for section in ("## How to use", "## Preprocessing inside the model", "## Training recipe", "## Metrics",
                        "## Conversion check", "## Citation"):
            assert section in text


@pytest.mark.parametrize("name", zoo.list_models())
def test_cards_show_the_paper_numbers_beside_the_baseline_with_their_source(name):
    from huggingface_hub import ModelCard

    metrics = zoo.paper_metrics(name)
    card = ModelCard(model_card.render_model_card(name))

    def shown(value):
        return "not published" if value is None else f"{value:g}"

    for key, label in (("imagenet_top1", "ImageNet-1k top-1 accuracy (%)"),
                       ("clickme_alignment", "ClickMe human feature alignment (% of the human ceiling)")):
        row = f"| {label} | {shown(metrics[key])} | {shown(metrics['baseline'][key])} |"
        assert row in card.text.splitlines(), row
    assert f"Source: {metrics['source']} <{metrics['source_url']}>" in card.text
    # The model-index carries the harmonized model's published numbers only, each with the source.
    results = {r.metric_type: r for r in card.data.eval_results or []}
    expected = {t: metrics[k] for t, k in (("accuracy", "imagenet_top1"), ("clickme_alignment", "clickme_alignment"))
                if metrics[k] is not None}
    assert {t: r.metric_value for t, r in results.items()} == expected
    assert all(r.source_url == metrics["source_url"] and r.source_name == metrics["source"] and not r.verified
               for r in results.values())
    assert ("model-index" in card.content) == bool(expected)


def test_cards_hold_the_transcribed_numbers():
    text = model_card.render_model_card("vgg16_harmonized")
    assert "| ImageNet-1k top-1 accuracy (%) | 69.3 | 67.2 |" in text
    assert "| ClickMe human feature alignment (% of the human ceiling) | 61.5 | 23.3 |" in text
    text = model_card.render_model_card("convnext_tiny_harmonized")
    assert "| ImageNet-1k top-1 accuracy (%) | not published | not published |" in text
    assert "| ClickMe human feature alignment (% of the human ceiling) | 74 | not published |" in text


def test_a_changed_entry_renders_its_own_numbers_and_a_wrong_one_is_refused():
    from huggingface_hub import ModelCard

    entry = zoo.model_info("vit_b16_harmonized")
    entry["metrics"] = {"imagenet_top1": 80.5, "clickme_alignment": None,
                        "baseline": {"imagenet_top1": None, "clickme_alignment": 12.25},
                        "source": "Table 1 of a paper", "source_url": "https://example.org/paper"}
    card = ModelCard(model_card.render_model_card(entry, repo_id="org/vit"))
    (result,) = card.data.eval_results
    assert (result.metric_type, result.metric_value, result.dataset_type) == ("accuracy", 80.5, "imagenet-1k")
    assert result.source_url == "https://example.org/paper" and result.source_name == "Table 1 of a paper"
    assert card.data.model_name == "vit_b16_harmonized"
    assert "| ClickMe human feature alignment (% of the human ceiling) | not published | 12.25 |" in card.text
    entry["metrics"]["clickme_alignment"] = 0.72 * 1000
    with pytest.raises(ValueError, match=r"'metrics.clickme_alignment' must be a percentage in \[0, 100\]"):
        model_card.render_model_card(entry)


@pytest.mark.parametrize("name", zoo.list_models())
def test_the_output_row_says_what_the_original_returned(name):
    text = model_card.render_model_card(name)
    (row,) = [line for line in text.splitlines() if line.startswith("| Output |")]
    assert row.startswith("| Output | 1000 ImageNet logits (no softmax), in class-index order")
    if zoo.model_info(name)["output"]["original"] == "probabilities":
        assert "The original model returned probabilities (softmax); `keras.ops.softmax(logits)` gives them." in row
    else:
        assert row.endswith(", as the original model returned. |")


def test_template_and_renderer_cannot_drift_apart(tmp_path):
    template = Path(model_card.template_path()).read_text()
    broken = tmp_path / "MODEL_CARD.md"
    broken.write_text(template + "\n{{ training_hours }}\n")
    with pytest.raises(ValueError, match=r"does not fill: \['training_hours'\]"):
        model_card.render_model_card("vgg16_harmonized", template=broken)
    broken.write_text(template.replace("{{ metrics_table }}", ""))
    with pytest.raises(ValueError, match=r"lacks required fields \['metrics_table'\]"):
        model_card.render_model_card("vgg16_harmonized", template=broken)


# --- publish -------------------------------------------------------------------------------------------------


def test_dry_run_writes_the_checked_folder_and_touches_no_network(tiny_zoo, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard, constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: any request would fail
    result = publish(NAME, REPO, source=SOURCE, dry_run=True, folder=tmp_path / "out")
    assert result.dry_run and result.commit_oid is None
    assert result.round_trip_max_abs_diff <= 1e-6
    folder = tmp_path / "out"
    assert {p.name for p in folder.iterdir()} == PRESET_FILES
    verify_preset(folder)
    metadata = read_metadata(folder)
    assert metadata["name"] == NAME and metadata["source_file"] == SOURCE.name
    assert "class_names" not in metadata  # the tiny test head has 5 classes, not ImageNet's 1000
    card = ModelCard((folder / "README.md").read_text())
    assert card.data.library_name == "keras"
    assert f"hf://{REPO}" in card.text and "Preset round trip" in card.text and "loaded by name" in card.text
    assert "| `kecam_levit_weights.h5` |" in card.text and "](saliency.png)" in card.text  # tests/test_model_card.py
    images, logits = _expected()
    np.testing.assert_allclose(np.asarray(load_model(folder)(images)), logits, atol=1e-4)


def test_publish_uploads_one_commit_that_load_model_reads_back(fake_hub):
    result = publish(NAME, REPO, source=SOURCE)
    assert not result.dry_run and result.folder is None  # staged in a temporary directory, removed
    assert result.commit_oid == fake_hub.refs[REPO]["main"]
    assert result.commit_url.endswith(f"/{REPO}/commit/{result.commit_oid}")
    # create_repo made the repo (with .gitattributes); the upload is one commit on top of it.
    assert [c["repo_id"] for c in fake_hub.commit_log] == [REPO]
    commit = fake_hub.commit_log[0]
    # The weights and the card's figure (binary) went through the LFS protocol.
    assert commit["files"] == {"config.json": "file", "metadata.json": "file", "README.md": "file",
                               "model.weights.h5": "lfsFile", "saliency.png": "lfsFile"}
    assert set(fake_hub.files(REPO)) == PRESET_FILES | {".gitattributes"}
    # The client validates the README's metadata on the Hub before uploading (upload_folder and create_commit).
    assert fake_hub.validated_yaml and all("library_name: keras" in y for y in fake_hub.validated_yaml)
    methods = [(m, p.split("?")[0]) for m, p in fake_hub.requests]
    assert ("POST", "/api/repos/create") in methods
    assert ("POST", f"/api/models/{REPO}/preupload/main") in methods
    assert ("POST", f"/{REPO}.git/info/lfs/objects/batch") in methods
    assert ("POST", f"/api/models/{REPO}/commit/main") in methods
    images, logits = _expected()
    model = load_model(f"hf://{REPO}@{result.commit_oid}")
    np.testing.assert_allclose(np.asarray(model(images)), logits, atol=1e-4)


def test_republishing_keeps_a_card_edited_on_the_hub(fake_hub):
    first = publish(NAME, REPO, source=SOURCE)
    files = fake_hub.files(REPO)
    files["README.md"] = b"---\nlicense: mit\n---\n# Edited on the Hub\n"
    fake_hub.add_commit(REPO, files)
    second = publish(NAME, REPO, source=SOURCE, commit_message="Republish")
    assert second.kept_hub_card
    assert fake_hub.files(REPO)["README.md"].startswith(b"---\nlicense: mit\n---\n# Edited")
    third = publish(NAME, REPO, source=SOURCE, overwrite_card=True)
    assert not third.kept_hub_card and b"## Training recipe" in fake_hub.files(REPO)["README.md"]
    assert first.commit_oid != third.commit_oid


def test_without_a_valid_token_nothing_is_uploaded(fake_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(PublishError, match="hf auth login.*HF_TOKEN"):
        publish(NAME, REPO, source=SOURCE)
    assert REPO not in fake_hub.refs and fake_hub.commit_log == []


def test_without_a_token_nothing_is_built(fake_hub, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(PublishError, match=r"^No Hugging Face token: set HF_TOKEN"):
        publish(NAME, REPO, source=SOURCE, folder=tmp_path / "out")
    assert not (tmp_path / "out").exists() and fake_hub.requests == []


def test_invalid_arguments_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="`repo_id` must look like 'org/name'"):
        publish(NAME, "no-org", source=SOURCE, dry_run=True, folder=tmp_path)
    with pytest.raises(ValueError, match="needs `folder`"):
        publish(NAME, REPO, source=SOURCE, dry_run=True)
    with pytest.raises(KeyError, match="Unknown model"):
        publish("levit_harmonized", REPO, source=SOURCE, dry_run=True, folder=tmp_path)


def test_cli_publish(fake_hub, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["publish", NAME, "--repo-id", REPO, "--source", str(SOURCE), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "Dry run" in out and (tmp_path / "publish" / NAME / "README.md").is_file()
    assert fake_hub.commit_log == []
    assert cli.main(["publish", NAME, "--repo-id", REPO, "--source", str(SOURCE)]) == 0
    out = capsys.readouterr().out
    sha = fake_hub.refs[REPO]["main"]
    assert f"Uploaded to hf://{REPO} in commit {sha}" in out
    assert json.loads("{" + out.split('"hub": {')[1].split("}")[0] + "}") == {"repo_id": REPO, "revision": sha}
