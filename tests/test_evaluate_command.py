"""`harmonization evaluate`, end to end through `cli.main` on a tiny preset and generated ClickMe shards."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from PIL import Image

import harmonization
from clickme_helpers import build_clickme, write_shards
from harmonization import cli, zoo

NUM_VALIDATION = 5
SIZE = 32
ZOO_NAME = "resnet50v2_harmonized"


@pytest.fixture(scope="module")
def clickme_dir(tmp_path_factory):
    shards = write_shards(tmp_path_factory.mktemp("evaluate_shards"), {"val-0": NUM_VALIDATION}, seed=3, quality=90)
    return build_clickme(tmp_path_factory.mktemp("evaluate_tfds"), shards)


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(1000, name="predictions")(x))


@pytest.fixture(scope="module")
def presets(tmp_path_factory, model):
    """A preset that names a zoo model in its metadata, and an anonymous one."""
    root = tmp_path_factory.mktemp("evaluate_presets")
    named = harmonization.save_preset(model, root / "named", metadata={"name": ZOO_NAME})
    return named, harmonization.save_preset(model, root / "tiny_cnn")


def test_limit_scores_exactly_n_images_beside_the_paper(clickme_dir, presets, model, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["evaluate", str(presets[0]), "--data-dir", str(clickme_dir), "--limit", "3", "--batch-size", "2",
            "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out

    results = json.loads((out / "results.json").read_text())
    assert results["data"] == {
        "dataset": "clickme", "split": "validation", "data_dir": str(clickme_dir.resolve()),
        "limit": 3, "batch_size": 2, "num_images": 3,
    }
    assert results["model"]["spec"] == str(presets[0]) and results["model"]["zoo_name"] == ZOO_NAME
    assert results["model"]["input_size"] == SIZE
    # The same numbers as the library call on the same three images.
    dataset = harmonization.data.load_clickme(
        "validation", 2, image_size=SIZE, data_dir=clickme_dir, download=False
    ).unbatch().take(3).batch(2)
    want = harmonization.evaluate_alignment(model, dataset, verbose=0)
    scores = results["scores"]
    assert scores["num_images"] == 3
    for key in ("spearman", "dice", "iou"):
        np.testing.assert_allclose(results["per_image"][key], want[key], atol=1e-6)
        assert scores[key] == pytest.approx(want[f"{key}_mean"], abs=1e-6)
    assert scores["accuracy"] == pytest.approx(want["accuracy"])
    assert scores["alignment_score"] == pytest.approx(np.mean(want["spearman"]) / 0.65753, abs=1e-6)
    assert scores["alignment_score_percent"] == pytest.approx(100 * scores["alignment_score"])

    protocol = results["protocol"]
    assert (protocol["image_size"], protocol["heatmap_resolution"], protocol["blur_size"]) == (SIZE, 64, 10)
    assert (protocol["percentile"], protocol["epsilon"], protocol["human_ceiling"]) == (10, 1e-9, 0.65753)
    assert set(results["versions"]) >= {"harmonization", "tensorflow", "keras", "numpy"}

    # The table: this run beside the paper's harmonized and baseline numbers (in %).
    paper = zoo.paper_metrics(ZOO_NAME)
    assert results["paper"] == paper
    header, *rows = [line for line in printed.splitlines() if line.startswith(" " * 20) or "(%)" in line
                     or line.startswith(("Spearman", "Dice", "IoU"))]
    assert header.split() == ["this", "run", "paper", "paper", "baseline"]
    cells = {row[:20].strip(): row[20:].split() for row in rows}
    assert cells["alignment score (%)"][0] == f"{100 * scores['alignment_score']:.1f}"

    def shown(value):
        return "-" if value is None else f"{value:.1f}"

    assert cells["alignment score (%)"][1:] == [shown(paper["clickme_alignment"]),
                                                shown(paper["baseline"]["clickme_alignment"])]
    assert cells["top-1 accuracy (%)"][1:] == [shown(paper["imagenet_top1"]), shown(paper["baseline"]["imagenet_top1"])]
    assert cells["Spearman"] == [f"{scores['spearman']:.3f}", "-", "-"]
    assert "3 images of clickme 'validation'" in printed

    with Image.open(out / results["files"]["saliency_grid"]) as grid:  # 3 rows of 3 panels, 210 px each
        assert grid.format == "PNG" and grid.size == (630, 3 * 210)


def test_every_image_is_scored_and_a_non_zoo_model_has_no_paper_column(clickme_dir, presets, tmp_path,
                                                                       monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["evaluate", str(presets[1]), "--data-dir", str(clickme_dir), "--batch-size", "2",
            "--dataset", "clickme/strict"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "harmonization_evaluate" / "tiny_cnn" / "results.json").read_text())
    assert results["scores"]["num_images"] == NUM_VALIDATION  # 2 + 2 + 1: the remainder counts
    assert len(results["per_image"]["spearman"]) == NUM_VALIDATION
    assert results["paper"] is None and results["model"]["zoo_name"] is None
    assert results["data"]["dataset"] == "clickme/strict"
    assert "paper" not in printed and "this run" in printed
    with Image.open(tmp_path / "harmonization_evaluate" / "tiny_cnn" / "saliency_grid.png") as grid:
        assert grid.size == (630, NUM_VALIDATION * 210)  # one row per image, up to six


@pytest.mark.parametrize("option,value", [("--limit", "0"), ("--limit", "-2"), ("--batch-size", "0"),
                                          ("--batch-size", "x")])
def test_bad_counts_are_usage_errors(presets, option, value, capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(["evaluate", str(presets[1]), option, value])
    assert caught.value.code == 2
    assert f"argument {option}: expected a positive integer" in capsys.readouterr().err


def test_missing_data_dir_unknown_model_and_unprepared_dataset_are_error_exits(presets, clickme_dir, tmp_path,
                                                                                capsys):
    assert cli.main(["evaluate", str(presets[1]), "--data-dir", str(tmp_path / "nowhere")]) == 1
    assert "--data-dir" in capsys.readouterr().err and not (tmp_path / "harmonization_evaluate").exists()

    assert cli.main(["evaluate", "resnet50v2_harmonised", "--data-dir", str(clickme_dir)]) == 1
    err = capsys.readouterr().err
    assert "harmonization evaluate: error: Unknown model 'resnet50v2_harmonised'" in err
    assert f"Did you mean {ZOO_NAME!r}?" in err

    (tmp_path / "empty").mkdir()
    assert cli.main(["evaluate", str(presets[1]), "--data-dir", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert "is not prepared" in err and "--download" in err


def test_method_scores_and_records_another_saliency(clickme_dir, presets, model, tmp_path, capsys):
    out = tmp_path / "ig"
    argv = ["evaluate", str(presets[1]), "--data-dir", str(clickme_dir), "--limit", "3", "--batch-size", "2",
            "--out", str(out), "--method", "integrated_gradients"]
    assert cli.main(argv) == 0
    assert "Saliency method: integrated_gradients" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["protocol"]["saliency_method"] == "integrated_gradients"
    assert results["protocol"]["saliency"].startswith("Integrated Gradients (Sundararajan et al. 2017)")
    dataset = harmonization.data.load_clickme(
        "validation", 2, image_size=SIZE, data_dir=clickme_dir, download=False
    ).unbatch().take(3).batch(2)
    want = harmonization.evaluate_alignment(model, dataset, verbose=0, saliency="integrated_gradients")
    default = harmonization.evaluate_alignment(model, dataset, verbose=0)
    for key in ("spearman", "dice", "iou"):
        np.testing.assert_allclose(results["per_image"][key], want[key], atol=1e-6)
    assert not np.allclose(want["spearman"], default["spearman"])
    with Image.open(out / results["files"]["saliency_grid"]) as grid:
        assert grid.size == (630, 3 * 210)


def test_the_default_method_is_recorded_as_the_published_map():
    from harmonization import evaluate_command

    fields = evaluate_command.protocol(SIZE)
    assert fields["saliency_method"] == "gradient_max_abs"
    assert fields["saliency"] == ("max over colour channels of |d logit[label] / d x|, x the preprocessed input "
                                  "(harmonization.evaluate_alignment; xplique Saliency in the published code)")


def test_an_unknown_method_is_a_usage_error_listing_the_methods(presets, capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(["evaluate", str(presets[1]), "--method", "gradcam"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "--method" in err and all(name in err for name in ("gradient_max_abs", "smoothgrad"))


@pytest.mark.parametrize("where", ["file", "under_a_file"])
def test_an_out_that_cannot_be_a_directory_is_refused_before_any_work(presets, clickme_dir, tmp_path, capsys, where):
    blocker = tmp_path / "results"
    blocker.write_text("an earlier result the user keeps")
    out = blocker if where == "file" else blocker / "run1"
    argv = ["evaluate", str(presets[1]), "--data-dir", str(clickme_dir), "--out", str(out)]
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert f"--out {str(out)!r} " in captured.err and "expected a directory" in captured.err
    assert "Model " not in captured.out and "Scoring" not in captured.out  # nothing loaded, nothing scored
    assert blocker.read_text() == "an earlier result the user keeps"
    # The default folder (named after the model, known once it is resolved) is checked before loading too.
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "harmonization_evaluate").write_text("not a folder")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path / "cwd")
        assert cli.main(["evaluate", str(presets[1]), "--data-dir", str(clickme_dir)]) == 1
    captured = capsys.readouterr()
    assert "is under 'harmonization_evaluate', which is a file" in captured.err and "Scoring" not in captured.out


def test_a_folder_that_is_not_a_preset_is_named_so_not_an_unknown_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "metadata.json").write_text("{}")
    for command in (["evaluate"], ["download"]):
        for spec, expected in (("empty", "'empty' is not a preset directory: it holds none of"),
                               (str(tmp_path / "empty"), "is not a preset directory"),
                               ("half", "Preset 'half' is incomplete: missing ['config.json', 'model.weights.h5']")):
            assert cli.main([*command, spec]) == 1
            err = capsys.readouterr().err
            assert expected in err and "Unknown model" not in err, (command, spec, err)


def test_a_count_tensorflow_cannot_hold_is_a_usage_error_and_the_largest_one_works(clickme_dir, presets, tmp_path,
                                                                                   capsys):
    for option in ("--limit", "--batch-size"):
        with pytest.raises(SystemExit) as caught:
            cli.main(["evaluate", str(presets[1]), option, str(10**20)])
        assert caught.value.code == 2
        assert (f"argument {option}: expected a positive integer no larger than {2**63 - 1} (TensorFlow counts in "
                f"int64), got {10**20}") in capsys.readouterr().err
    argv = ["evaluate", str(presets[1]), "--data-dir", str(clickme_dir), "--limit", str(2**63 - 1),
            "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["data"]["num_images"] == NUM_VALIDATION
