"""The README's main job, `harmonization quickstart`, run as a user runs it (reduced size, seeded)."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

import tfds_clickme  # noqa: F401  (registers the builders)
from harmonization import quickstart, synthetic
from harmonization.presets import class_names, load_model


@pytest.mark.slow
def test_quickstart_shows_the_harmonization_effect(tmp_path, capsys):
    out, data_dir = tmp_path / "out", tmp_path / "tfds"
    summary = quickstart.run(quickstart.parse_args(["--quick", "--out", str(out), "--data-dir", str(data_dir), "--verbose", "0"]))
    printed = capsys.readouterr().out

    base, harm = summary["results"]["baseline"], summary["results"]["harmonized"]
    # The harmonized model looks at the object and so generalises to the shortcut-free test split.
    assert harm["alignment_score"] > base["alignment_score"] + 0.1
    assert harm["accuracy"] > base["accuracy"] + 0.1
    assert json.loads((out / "results.json").read_text())["results"] == summary["results"]
    for figure in ("saliency_grid.png", "accuracy_vs_alignment.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert str(out / figure) in printed
    assert summary["preset_max_abs_difference"] <= 1e-5
    assert (out / "harmonized_preset" / "model.weights.h5").is_file()
    assert "accuracy" in printed and "alignment" in printed
    assert "saliency taken at the output of the preprocessing 'preprocessing' (Rescaling)" in printed

    # The preset stands on its own: raw [0, 255] test images in, the printed accuracy out, class names kept.
    model = load_model(out / "harmonized_preset")
    names = tfds.builder("clickme_synthetic/default", data_dir=data_dir).info.features["label"].names
    assert class_names(model) == names
    test = tfds.load("clickme_synthetic/default", split="test[:300]", data_dir=data_dir, batch_size=-1)
    predicted = np.argmax(model.predict(np.asarray(test["image"], np.float32), verbose=0), axis=-1)
    assert np.mean(predicted == test["label"]) == pytest.approx(harm["accuracy"], abs=1e-6)


def test_the_dataset_is_built_once_and_an_interrupted_build_is_never_trusted(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = synthetic.generate_example

    def failing_midway(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 50:
            raise KeyboardInterrupt("interrupted")
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "generate_example", failing_midway)
    with pytest.raises(KeyboardInterrupt):
        quickstart.build_dataset("quick", tmp_path)
    with pytest.raises(Exception):  # nothing half-built is loadable
        tfds.builder("clickme_synthetic/quick", data_dir=tmp_path).as_dataset(split="train")

    monkeypatch.setattr(synthetic, "generate_example", real)
    builder = quickstart.build_dataset("quick", tmp_path)
    count = sum(1 for _ in builder.as_dataset(split="train"))
    assert count == builder.info.splits["train"].num_examples

    # A second run reads the cache: it generates nothing.
    monkeypatch.setattr(synthetic, "generate_example", failing_midway)
    calls["n"] = -(10**9)
    quickstart.build_dataset("quick", tmp_path)
    assert calls["n"] == -(10**9)


def test_bad_options_are_refused(capsys):
    with pytest.raises(SystemExit):
        quickstart.parse_args(["--steps", "0"])
    assert "--steps must be a positive integer" in capsys.readouterr().err
    for seed in ("-1", str(2**31)):
        with pytest.raises(SystemExit) as caught:
            quickstart.parse_args(["--seed", seed])
        assert caught.value.code == 2
        assert f"--seed must be an integer in [0, 2**31); got {seed}" in capsys.readouterr().err


def test_an_unwritable_out_folder_is_a_clear_error_before_any_work(tmp_path, capsys, monkeypatch):
    import os

    if os.geteuid() == 0:  # root writes anywhere: make the folder's parent a file instead
        blocker = tmp_path / "file"
        blocker.write_text("")
        out = blocker / "out"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        out = locked / "out"
    monkeypatch.setattr(quickstart, "run", lambda args: pytest.fail("the run started"))
    assert quickstart.main(["--out", str(out)]) == 1
    assert f"--out '{out}' cannot be written" in capsys.readouterr().err
