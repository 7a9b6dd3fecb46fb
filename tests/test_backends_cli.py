"""The `harmonization` command on the current Keras backend, run as a user runs it (`python -m harmonization`).

Under TensorFlow in the main suite; in CI also under JAX and PyTorch, in environments built without TensorFlow,
where `train`, `quickstart` and `evaluate`, and the modules that are TensorFlow code, must say so in one sentence.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend_helpers import ROOT, current_backend

pytestmark = pytest.mark.backends

FIXTURES = ROOT / "tests" / "fixtures" / "keras2"
# A tiny ResNet50V2 written by Keras 2 (tests/fixtures/keras2/manifest.json), with its original logits in the .npz.
RESNET = "resnet50v2_full_model"
RESNET_CONFIG = dict(image_size=32, stack_blocks=[2, 2, 2, 2], stack_filters=[4, 4, 8, 8], stem_filters=64,
                     num_classes=5)
TOLERANCE = 1e-4  # tests/test_convert.py's, for float32 logits of the converted model
HAS_TENSORFLOW = importlib.util.find_spec("tensorflow") is not None
NEEDS_TENSORFLOW = "needs TensorFlow, which is not installed"


def _env(backend: str | None = None) -> dict[str, str]:
    """The child's environment: this backend (the current one by default), this repository first on the path."""
    return {**os.environ, "KERAS_BACKEND": backend or current_backend(), "TF_CPP_MIN_LOG_LEVEL": "3",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def run_command(*args: str, cwd: Path, backend: str | None = None, timeout: float = 300):
    """`python -m harmonization ARGS` on `backend`; the completed process."""
    return subprocess.run([sys.executable, "-m", "harmonization", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(backend), cwd=str(cwd))


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The tiny ResNet50V2 converted by `harmonization convert` on this backend, and two PNG images."""
    folder = tmp_path_factory.mktemp("cli")
    out = folder / "resnet"
    printed = _ok(run_command("convert", str(FIXTURES / f"{RESNET}.h5"), "--arch", "resnet50v2_harmonized",
                                "--out", str(out), "--config", json.dumps(RESNET_CONFIG), cwd=folder))
    assert printed.strip().endswith(str(out))
    rng = np.random.default_rng(0)
    images = []
    for i in range(2):
        path = folder / f"image{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(path)
        images.append(str(path))
    return folder, out, images


def test_list_and_info_answer_on_this_backend(tmp_path):
    names = json.loads(_ok(run_command("list", "--json", cwd=tmp_path)))
    assert "vit_b16_harmonized" in names and len(names) == 7
    info = json.loads(_ok(run_command("info", "vit_b16_harmonized", cwd=tmp_path)))
    assert info["name"] == "vit_b16_harmonized"


def test_convert_gives_the_original_logits_on_this_backend(converted):
    folder, out, _ = converted
    # Loaded in a child on the same backend: the tests' own process may run on another one.
    result = _ok(subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import json, numpy as np, keras, harmonization
        data = np.load({str(FIXTURES / f"{RESNET}.npz")!r})
        logits = keras.ops.convert_to_numpy(harmonization.load_model({str(out)!r})(data["images"].astype("float32")))
        want = data["pre_softmax_logits"] if "pre_softmax_logits" in data else data["logits"]
        print(json.dumps({{"backend": keras.backend.backend(), "diff": float(np.max(np.abs(logits - want)))}}))
    """)], capture_output=True, text=True, timeout=300, env=_env(), cwd=str(folder)))
    answer = json.loads(result.strip().splitlines()[-1])
    assert answer["backend"] == current_backend()
    assert answer["diff"] < TOLERANCE


def test_download_of_a_preset_directory_prints_it(converted):
    folder, out, _ = converted
    assert Path(_ok(run_command("download", str(out), cwd=folder)).strip()) == out


def test_predict_prints_the_top_classes_of_each_image(converted):
    folder, out, images = converted
    printed = _ok(run_command("predict", *images, "--model", str(out), "--top", "2", cwd=folder)).splitlines()
    assert printed[0] == images[0] and printed[3] == images[1]
    for line in printed[1:3] + printed[4:6]:
        percent, index, label = line.split()
        assert 0 <= float(percent.rstrip("%")) <= 100 and 0 <= int(index) < 5 and label == f"class_{index}"


def test_explain_writes_the_figure(converted):
    folder, out, images = converted
    figure = folder / "explained.png"
    printed = _ok(run_command("explain", images[0], "--model", str(out), "--out", str(figure), cwd=folder))
    assert Path(printed.strip()) == figure
    with Image.open(figure) as picture:
        assert picture.size[0] > 100 and picture.size[1] > 100


def _refusal(result: subprocess.CompletedProcess, command: str) -> str:
    """The one line a refused command writes: exit status 2, no traceback."""
    assert result.returncode == 2, f"exit {result.returncode}:\n{result.stderr[-3000:]}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"harmonization {command}: error: ")
    return lines[0]


def _without_tensorflow(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `code` in a child that has no TensorFlow, on a backend that is not TensorFlow.

    Where TensorFlow is not installed (CI's JAX and PyTorch environments): as is, on the current backend. Where it
    is: on another installed backend, with TensorFlow hidden (`sys.modules["tensorflow"] = None` makes `find_spec`
    and `import tensorflow` fail as if it were not installed).
    """
    backend = current_backend()
    if HAS_TENSORFLOW:
        others = [b for b in ("jax", "torch") if importlib.util.find_spec(b) is not None]
        if not others:
            pytest.skip("TensorFlow is the only backend installed here: nothing to run without it")
        backend = others[0]
        code = 'import sys\nsys.modules["tensorflow"] = None\n' + code
    env = _env(backend)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=str(cwd))


@pytest.mark.parametrize("command", [
    ["train", "--recipe", "quickstart"], ["quickstart"], ["quickstart", "--quick"], ["evaluate", "vit_b16_harmonized"],
])
def test_tensorflow_commands_are_one_line_without_tensorflow(command, tmp_path):
    # The command as `python -m harmonization` runs it (harmonization/__main__.py calls cli.main).
    code = f"import sys\nfrom harmonization.cli import main\nsys.exit(main({command!r}))\n"
    line = _refusal(_without_tensorflow(code, tmp_path), command[0])
    assert NEEDS_TENSORFLOW in line and 'pip install "tensorflow>=' in line
    assert not any(tmp_path.iterdir()), "a refused command must not write anything"


def test_the_real_command_is_refused_without_tensorflow(tmp_path):
    # No stand-in: `python -m harmonization train` where TensorFlow really is missing.
    if HAS_TENSORFLOW:
        pytest.skip("TensorFlow is installed here; the stand-in above covers it, this runs in CI's environments")
    line = _refusal(run_command("train", "--recipe", "quickstart", cwd=tmp_path), "train")
    assert NEEDS_TENSORFLOW in line


def test_train_on_another_backend_is_one_line(tmp_path):
    # With TensorFlow installed, train still needs it as the backend (tf.distribute); without, the line above.
    others = [b for b in ("jax", "torch") if importlib.util.find_spec(b) is not None]
    if not HAS_TENSORFLOW or not others:
        pytest.skip("needs TensorFlow and another backend installed (the main suite's environment)")
    line = _refusal(run_command("train", "--recipe", "quickstart", "--out", str(tmp_path / "run"), cwd=tmp_path,
                                backend=others[0]), "train")
    assert f"runs on the TensorFlow backend only; the Keras backend is {others[0]!r}" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("module", [
    "harmonization.data", "harmonization.trainer", "harmonization.common", "harmonization.training", "tfds_clickme",
])
def test_tensorflow_modules_say_so_without_tensorflow(module, tmp_path):
    result = _without_tensorflow(textwrap.dedent(f"""
        import json, keras
        try:
            import {module}
        except ImportError as error:
            print(json.dumps({{"type": type(error).__name__, "message": str(error), "backend": keras.backend.backend()}}))
    """), ROOT)
    answer = json.loads(_ok(result).strip().splitlines()[-1])
    assert answer["type"] == "MissingBackendError", answer
    assert NEEDS_TENSORFLOW in answer["message"]
    assert f"the Keras backend is {answer['backend']!r}" in answer["message"]
    assert "\n" not in answer["message"]


def test_tf_data_pipelines_import_on_another_backend_with_tensorflow_installed():
    # tf.data does not depend on the Keras backend: harmonization.data imports under JAX or PyTorch too.
    others = [b for b in ("jax", "torch") if importlib.util.find_spec(b) is not None]
    if not HAS_TENSORFLOW or not others:
        pytest.skip("needs TensorFlow and another backend installed (the main suite's environment)")
    result = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import json, keras, harmonization.data
        print(json.dumps({"backend": keras.backend.backend()}))
    """)], capture_output=True, text=True, timeout=300, env=_env(others[0]), cwd=str(ROOT))
    assert json.loads(_ok(result).strip().splitlines()[-1]) == {"backend": others[0]}
