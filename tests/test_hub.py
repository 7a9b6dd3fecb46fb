"""Hub resolution through the real huggingface_hub client against a local HTTP stand-in of the Hub."""

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from harmonization import hub as hub_module
from harmonization.hub import HubUnavailableError, parse_hf_uri
from harmonization.presets import PresetError, load_model, save_preset
from harmonization.zoo import UnknownModelError

sys.path.insert(0, str(Path(__file__).parent))  # the stand-in Hub lives next to the tests
from hub_server import FakeHub  # noqa: E402

REPO = "serre-lab/tiny_harmonized"
ROOT = Path(__file__).resolve().parents[1]


def _tiny_model(seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4, 4, 3))
    x = keras.layers.Flatten()(inputs)
    outputs = keras.layers.Dense(3, name="predictions")(x)
    return keras.Model(inputs, outputs)


@pytest.fixture
def images():
    return np.random.default_rng(0).uniform(0, 255, (2, 4, 4, 3)).astype("float32")


@pytest.fixture
def preset_dirs(tmp_path):
    """Two presets of the same architecture with different weights (two commits of one repo)."""
    models = [_tiny_model(1), _tiny_model(2)]
    return models, [save_preset(m, tmp_path / f"preset{i}", metadata={"name": "tiny"}) for i, m in enumerate(models)]


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A FakeHub, with huggingface_hub pointed at it and at an empty cache (as HF_ENDPOINT/HF_HUB_CACHE would)."""
    from huggingface_hub import constants

    with FakeHub() as fake:
        monkeypatch.setattr(constants, "ENDPOINT", fake.endpoint)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"})
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield fake


def _go_offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_parse_hf_uri():
    assert parse_hf_uri("hf://org/repo") == ("org/repo", None)
    assert parse_hf_uri("hf://org/repo@v1.0") == ("org/repo", "v1.0")
    for bad in ("hf://repo", "hf://org/repo@", "hf://org/a/b", "org/repo"):
        with pytest.raises(ValueError, match="hf://org/repo"):
            parse_hf_uri(bad)


def test_download_load_and_reuse_the_cache_offline(fake_hub, preset_dirs, images, monkeypatch):
    models, dirs = preset_dirs
    sha = fake_hub.add_preset(REPO, dirs[0])
    model = load_model(f"hf://{REPO}")
    np.testing.assert_array_equal(model.predict(images, verbose=0), models[0].predict(images, verbose=0))
    paths = [p for _, p in fake_hub.requests]
    assert f"/api/models/{REPO}/revision/main" in paths
    assert any(p.startswith(f"/api/models/{REPO}/tree/{sha}") for p in paths)
    assert any(p == f"/{REPO}/resolve/{sha}/model.weights.h5" for p in paths)
    # The snapshot lives in the HF cache under the commit.
    snapshot = hub_module.download_preset(REPO)
    assert snapshot.parts[-2:] == ("snapshots", sha)
    assert Path(os.path.realpath(snapshot / "model.weights.h5")).parent.name == "blobs"

    _go_offline(monkeypatch)
    count = len(fake_hub.requests)
    again = load_model(f"hf://{REPO}")
    np.testing.assert_array_equal(again.predict(images, verbose=0), models[0].predict(images, verbose=0))
    assert len(fake_hub.requests) == count  # offline really sent nothing


def test_revision_pinning(fake_hub, preset_dirs, images):
    models, dirs = preset_dirs
    old = fake_hub.add_preset(REPO, dirs[0])
    fake_hub.tag(REPO, "v1", old)
    new = fake_hub.add_preset(REPO, dirs[1])  # main moves on
    assert old != new
    expected_old = models[0].predict(images, verbose=0)
    expected_new = models[1].predict(images, verbose=0)
    np.testing.assert_array_equal(load_model(f"hf://{REPO}").predict(images, verbose=0), expected_new)
    np.testing.assert_array_equal(load_model(f"hf://{REPO}@v1").predict(images, verbose=0), expected_old)
    np.testing.assert_array_equal(load_model(f"hf://{REPO}@{old}").predict(images, verbose=0), expected_old)
    # The keyword wins over the URI's @revision.
    np.testing.assert_array_equal(
        load_model(f"hf://{REPO}@v1", revision="main").predict(images, verbose=0), expected_new
    )
    from huggingface_hub.errors import RevisionNotFoundError

    with pytest.raises(RevisionNotFoundError):
        load_model(f"hf://{REPO}@v9")


def test_offline_with_nothing_cached_says_how_to_get_the_weights(fake_hub, monkeypatch):
    _go_offline(monkeypatch)
    with pytest.raises(HubUnavailableError) as caught:
        load_model(f"hf://{REPO}")
    message = str(caught.value)
    assert "HF_HUB_OFFLINE" in message and f"harmonization download hf://{REPO}@main" in message
    assert fake_hub.requests == []


def test_corrupted_file_is_detected_and_evicted(fake_hub, preset_dirs, images, monkeypatch):
    models, dirs = preset_dirs
    fake_hub.add_preset(REPO, dirs[0])
    good = (dirs[0] / "model.weights.h5").read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF  # same size: only the sha256 can tell
    fake_hub.tampered["model.weights.h5"] = bytes(bad)
    with pytest.raises(PresetError, match="corrupted and was removed from the cache.*expected sha256"):
        load_model(f"hf://{REPO}")
    # Nothing bad stays cached: offline, the corrupt weights are not served as good.
    _go_offline(monkeypatch)
    with pytest.raises((PresetError, HubUnavailableError)):
        load_model(f"hf://{REPO}")
    # Once the Hub serves the right bytes, the next online call downloads them afresh.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    del fake_hub.tampered["model.weights.h5"]
    model = load_model(f"hf://{REPO}")
    np.testing.assert_array_equal(model.predict(images, verbose=0), models[0].predict(images, verbose=0))


def test_truncated_download_is_not_kept(fake_hub, preset_dirs, images, monkeypatch):
    models, dirs = preset_dirs
    sha = fake_hub.add_preset(REPO, dirs[0])
    fake_hub.truncate.add("model.weights.h5")
    with pytest.raises(PresetError, match="interrupted or truncated"):
        load_model(f"hf://{REPO}")
    from huggingface_hub import constants

    snapshot = Path(constants.HF_HUB_CACHE) / "models--serre-lab--tiny_harmonized" / "snapshots" / sha
    assert not (snapshot / "model.weights.h5").exists()
    # The server recovers: the download resumes and the result is verified whole.
    fake_hub.truncate.clear()
    model = load_model(f"hf://{REPO}")
    np.testing.assert_array_equal(model.predict(images, verbose=0), models[0].predict(images, verbose=0))


def test_partial_snapshot_is_never_returned_as_complete(fake_hub, preset_dirs):
    """snapshot_download returns a cached snapshot as-is when the tree listing fails: we must not trust it."""
    from huggingface_hub import hf_hub_download

    _, dirs = preset_dirs
    fake_hub.add_preset(REPO, dirs[0])
    hf_hub_download(REPO, "config.json")  # an earlier, interrupted download left only this file
    fake_hub.tree_status = 403  # a 4xx is not retried by the client (5xx would back off for ~24 s)
    with pytest.raises(PresetError, match=r"incomplete: missing \['model.weights.h5', 'metadata.json'\]"):
        load_model(f"hf://{REPO}")


def test_missing_repo_and_unknown_names(fake_hub):
    from huggingface_hub.errors import RepositoryNotFoundError

    with pytest.raises(RepositoryNotFoundError):
        load_model("hf://nobody/nothing")
    with pytest.raises(UnknownModelError, match="Did you mean 'vgg16_harmonized'"):
        load_model("vgg_16_harmonized")
    with pytest.raises(FileNotFoundError, match="No preset directory at './nowhere'"):
        load_model("./nowhere")
    with pytest.raises(ValueError, match="Unsupported location"):
        load_model("kaggle://org/model")
    assert fake_hub.requests and all("nothing" in p for _, p in fake_hub.requests)


def test_zoo_name_resolves_to_its_hub_repo(fake_hub, preset_dirs, images):
    models, dirs = preset_dirs
    from harmonization.zoo import model_info

    repo_id = model_info("vgg16_harmonized")["hub"]["repo_id"]
    # Not published yet: the error names the repo and the original file.
    with pytest.raises(HubUnavailableError, match=f"{repo_id}.*does not exist.*vgg16_harmonized.h5"):
        load_model("vgg16_harmonized")
    fake_hub.add_preset(repo_id, dirs[0])  # published (stand-in weights: any preset serves the resolution path)
    model = load_model("vgg16_harmonized")
    np.testing.assert_array_equal(model.predict(images, verbose=0), models[0].predict(images, verbose=0))


def test_environment_variables_are_honoured_by_the_cli(preset_dirs, tmp_path):
    """HF_ENDPOINT / HF_HUB_CACHE / HF_HUB_OFFLINE set before huggingface_hub is imported (a real process)."""
    _, dirs = preset_dirs
    cache = tmp_path / "env-cache"
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0",
           "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    env.pop("HF_TOKEN", None)
    command = [sys.executable, "-m", "harmonization", "download", f"hf://{REPO}"]
    with FakeHub() as fake:
        sha = fake.add_preset(REPO, dirs[0])
        env["HF_ENDPOINT"] = fake.endpoint
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().endswith(f"snapshots/{sha}")
        assert Path(done.stdout.strip()).is_relative_to(cache)
        assert fake.requests
    # Offline, the cached copy is found without a server.
    offline = subprocess.run(command, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                             timeout=120, cwd=tmp_path)
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout.strip() == done.stdout.strip()
    # Offline with an empty cache: exit status 1 and the how-to message.
    empty = subprocess.run(command, env={**env, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")},
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert empty.returncode == 1
    assert "HF_HUB_OFFLINE is set" in empty.stderr and "harmonization download" in empty.stderr
