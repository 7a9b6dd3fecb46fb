"""`import harmonization` lets Keras's own loader build our presets, whatever the import order, without importing
Keras itself (harmonization._keras_registration). Each case runs in a fresh interpreter: import order is the
point, and this process has long imported both."""

import subprocess
import sys
from pathlib import Path

import pytest

from harmonization import presets, zoo

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory):
    """A tiny ViT preset with a README.md and a figure beside its three Keras files, as published."""
    folder = tmp_path_factory.mktemp("preset") / "vit"
    model = zoo.build(zoo.model_info("vit_b16_harmonized"), image_size=32, patch_size=8, hidden_size=12,
                      num_layers=1, num_heads=3, mlp_dim=24, num_classes=5)
    presets.save_preset(model, folder)
    (folder / "README.md").write_text("---\nlibrary_name: keras\n---\n# card\n")
    (folder / "saliency.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return folder


@pytest.mark.parametrize("imports", [
    "import keras, harmonization",  # Keras first: registered at once
    "import harmonization, keras",  # harmonization first: registered right after Keras's import
    "import harmonization, tensorflow, keras",  # TensorFlow looks Keras up (find_spec) before importing it
])
def test_keras_load_model_builds_a_preset_after_import_harmonization(tiny_preset, imports):
    script = (f"{imports}\nimport sys\n"
              f"model = keras.saving.load_model(sys.argv[1])  # safe_mode=True\n"
              "print(type(model).__name__, model.count_params())")
    result = subprocess.run([sys.executable, "-c", script, str(tiny_preset)], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-2] == "ViT"


def test_import_harmonization_imports_no_keras():
    script = ("import sys, harmonization\n"
              "print('keras' in sys.modules, 'harmonization.architectures' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False", "False"]


def test_without_harmonization_keras_cannot_build_it(tiny_preset):
    """The registration is what makes it work: a bare Keras names the class it cannot locate."""
    script = "import keras, sys\nkeras.saving.load_model(sys.argv[1])"
    result = subprocess.run([sys.executable, "-c", script, str(tiny_preset)], capture_output=True, text=True,
                            cwd="/", timeout=300)
    assert result.returncode != 0 and "Could not locate class 'ViT'" in result.stderr
