"""The `harmonization` command, called in-process through `main(argv)`."""

import json
import sys
import types

import keras
import numpy as np
import pytest
from PIL import Image

from harmonization import cli
from harmonization.presets import save_preset
from harmonization.zoo import imagenet_class_names, list_models


def test_list(capsys):
    assert cli.main(["list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == list_models()
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in list_models())


def test_info(capsys):
    assert cli.main(["info", "vit_b16_harmonized"]) == 0
    assert json.loads(capsys.readouterr().out)["parameter_count"] == 86_567_656


def test_unknown_name_is_an_error_exit_with_the_suggestion(capsys):
    assert cli.main(["info", "vit_b16"]) == 1
    err = capsys.readouterr().err
    assert "harmonization info: error: Unknown model 'vit_b16'" in err
    assert "Did you mean 'vit_b16_harmonized'?" in err


def test_missing_subcommand_shows_usage(capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main([])
    assert caught.value.code == 2
    assert "usage: harmonization" in capsys.readouterr().err


def test_quickstart_forwards_every_argument(monkeypatch):
    received = []
    fake = types.ModuleType("harmonization.quickstart")
    fake.main = lambda argv: received.append(argv) or 0
    monkeypatch.setitem(sys.modules, "harmonization.quickstart", fake)
    import harmonization

    monkeypatch.setattr(harmonization, "quickstart", fake, raising=False)
    assert cli.main(["quickstart", "--out", "x", "--help", "-v"]) == 0
    assert received == [["--out", "x", "--help", "-v"]]


@pytest.fixture
def preset_and_images(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(2, 3, padding="same")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(4, name="predictions")(x))
    preset = save_preset(model, tmp_path / "preset")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        path = tmp_path / f"image{i}.png"
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return model, preset, paths


def test_predict_prints_the_top_classes(preset_and_images, capsys):
    model, preset, paths = preset_and_images
    assert cli.main(["predict", *paths, "--model", str(preset), "--top", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == paths[0] and out[3] == paths[1]
    image = np.asarray(Image.open(paths[0]).convert("RGB").resize((8, 8), Image.BICUBIC), dtype="float32")
    logits = model.predict(image[None], verbose=0)[0]
    assert out[1].split()[-1] == f"class_{int(np.argmax(logits))}"
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert out[1].split()[0] == f"{probs.max():.2%}"


def test_predict_uses_the_class_names_of_the_preset(preset_and_images, tmp_path, capsys):
    model, _, paths = preset_and_images
    names = ["apple", "pear", "plum", "fig"]
    preset = save_preset(model, tmp_path / "named", metadata={"class_names": names})
    assert cli.main(["predict", paths[0], "--model", str(preset), "--top", "4"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert sorted(row[-1] for row in rows) == sorted(names)
    assert all(names[int(row[1])] == row[2] for row in rows)


def test_predict_names_1000_class_heads_with_the_shipped_imagenet_names(tmp_path, monkeypatch, capsys):
    import keras.utils

    monkeypatch.setattr(keras.utils, "get_file", None)  # no download: the names ship with the package
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1000, name="predictions")(x))
    image = tmp_path / "image.png"
    Image.fromarray(np.full((8, 8, 3), 128, dtype=np.uint8)).save(image)
    assert cli.main(["predict", str(image), "--model", str(save_preset(model, tmp_path / "p")), "--top", "1"]) == 0
    _, index, name = capsys.readouterr().out.splitlines()[1].split(maxsplit=2)
    assert name == imagenet_class_names()[int(index)]
    assert cli._imagenet_labels(1000)[:2] == ["tench", "goldfish"]
    assert cli._imagenet_labels(3) == ["class_0", "class_1", "class_2"]
    assert cli._imagenet_labels(3, ["a", "b", "c"]) == ["a", "b", "c"]


def test_explain_writes_a_png(preset_and_images, tmp_path, capsys):
    _, preset, paths = preset_and_images
    out = tmp_path / "saliency.png"
    assert cli.main(["explain", paths[0], "--model", str(preset), "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > image.size[1]


@pytest.mark.parametrize("method", ["smoothgrad", "integrated_gradients"])
def test_explain_draws_the_chosen_saliency_method(preset_and_images, tmp_path, method, monkeypatch):
    from harmonization import saliency_methods

    _, preset, paths = preset_and_images
    used = []
    original = saliency_methods.get_saliency_method
    monkeypatch.setattr(saliency_methods, "get_saliency_method", lambda name: used.append(name) or original(name))
    out = tmp_path / f"{method}.png"
    assert cli.main(["explain", paths[0], "--model", str(preset), "--out", str(out), "--method", method]) == 0
    assert used == [method] and out.is_file()


def _stdout_without_tensorflow(body):
    """Run `body` after `import sys, harmonization.cli as c` in a fresh interpreter; check that it exits 0 with
    no TensorFlow or Keras module imported, and return what it printed."""
    import subprocess

    script = ("import sys, harmonization.cli as c\n" + body
              + "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras'))\n"
              "print('HEAVY', loaded)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout
    return result.stdout


def test_explain_and_evaluate_help_list_the_methods_without_tensorflow():
    stdout = _stdout_without_tensorflow(
        "for command in ('explain', 'evaluate'):\n"
        "    try:\n        c.main([command, '--help'])\n    except SystemExit:\n        pass\n")
    text = " ".join(stdout.split())  # argparse wraps the help
    for name in ("gradient_mean", "gradient_max_abs", "smoothgrad", "integrated_gradients"):
        assert text.count(name) >= 2, name  # in both commands' help


def test_sign_makes_a_hand_edited_preset_loadable(preset_and_images, capsys):
    from harmonization.loader import load_model

    _, preset, _ = preset_and_images
    record = json.loads((preset / "metadata.json").read_text())
    del record["files"]
    (preset / "metadata.json").write_text(json.dumps(record))
    assert cli.main(["predict", "--model", str(preset), preset_and_images[2][0]]) == 1
    assert f"harmonization sign {preset}" in capsys.readouterr().err
    assert cli.main(["sign", str(preset)]) == 0
    assert "model.weights.h5:" in capsys.readouterr().out
    assert load_model(preset).count_params() == preset_and_images[0].count_params()
    assert cli.main(["sign", str(preset / "nothing")]) == 1
    assert "is not a preset directory" in capsys.readouterr().err


@pytest.mark.parametrize("out, expected", [("fig", "fig.png"), ("figs/", "figs/image0_saliency.png"),
                                           ("made", "made/image0_saliency.png"), ("fig.pdf", "fig.pdf")])
def test_explain_prints_the_file_it_wrote(preset_and_images, tmp_path, capsys, out, expected):
    _, preset, paths = preset_and_images
    (tmp_path / "made").mkdir()
    target = str(tmp_path / out) + ("/" if out.endswith("/") else "")
    assert cli.main(["explain", paths[0], "--model", str(preset), "--out", target]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str(tmp_path / expected) and (tmp_path / expected).is_file()


def test_explain_refuses_an_unknown_figure_format(preset_and_images, tmp_path, capsys):
    _, preset, paths = preset_and_images
    assert cli.main(["explain", paths[0], "--model", str(preset), "--out", str(tmp_path / "x.docx")]) == 1
    assert "--out" in capsys.readouterr().err and not (tmp_path / "x.docx").exists()


@pytest.mark.parametrize("top", ["0", "-2", "two"])
def test_predict_top_must_be_a_positive_integer(preset_and_images, capsys, top):
    _, preset, paths = preset_and_images
    with pytest.raises(SystemExit) as caught:
        cli.main(["predict", paths[0], "--model", str(preset), "--top", top])
    assert caught.value.code == 2
    assert "--top" in capsys.readouterr().err


def test_convert_names_the_option_of_a_bad_config(tmp_path, capsys):
    source = tmp_path / "vgg16_harmonized.h5"
    source.write_bytes(b"x")
    assert cli.main(["convert", str(source), "--out", str(tmp_path / "p"), "--config", "{image_size: 64}"]) == 1
    assert "--config is not valid JSON" in capsys.readouterr().err


def test_download_of_a_local_preset_refuses_a_revision(preset_and_images, capsys):
    _, preset, _ = preset_and_images
    assert cli.main(["download", str(preset), "--revision", "v2"]) == 1
    assert "`revision` ('v2') applies to Hub models" in capsys.readouterr().err
    assert cli.main(["download", str(preset)]) == 0


def test_an_empty_model_name_is_a_clear_error(capsys):
    from harmonization.loader import load_model

    with pytest.raises(ValueError, match="`name_or_path_or_uri` is empty"):
        load_model("")
    assert cli.main(["download", ""]) == 1
    assert "got ''" in capsys.readouterr().err


def test_a_case_changed_zoo_name_gets_a_suggestion(capsys):
    assert cli.main(["info", "VGG16_Harmonized"]) == 1
    assert "Did you mean 'vgg16_harmonized'?" in capsys.readouterr().err


def test_help_list_and_info_answer_without_tensorflow():
    _stdout_without_tensorflow("for argv in (['list'], ['info', 'vgg16_harmonized']):\n    assert c.main(argv) == 0\n"
                               "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n")


def test_commands_do_not_print_tensorflow_start_up_noise(preset_and_images, tmp_path):
    import os
    import subprocess

    _, preset, paths = preset_and_images
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-m", "harmonization", "predict", paths[0], "--model", str(preset)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    for noise in ("absl::InitializeLog", "oneDNN", "cuInit", "cpu_feature_guard", "cudart_stub"):
        assert noise not in result.stderr
    assert paths[0] in result.stdout


def test_start_up_noise_filter_keeps_real_messages():
    from harmonization.cli_common import startup_noise_removed

    text = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
            "I0000 00:00:1.7 27841 port.cc:153] oneDNN custom operations are on. You may see ...\n"
            "E0000 00:00:1.6 27841 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\n"
            "W0000 00:00:1.8 27841 bfc_allocator.cc:291] Allocator ran out of memory\n"
            "/x.py:3: UserWarning: a real warning\n")
    assert startup_noise_removed(text) == ("W0000 00:00:1.8 27841 bfc_allocator.cc:291] Allocator ran out of memory\n"
                                           "/x.py:3: UserWarning: a real warning\n")
