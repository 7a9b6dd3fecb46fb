"""Hub resolution through the real huggingface_hub client against a local HTTP stand-in of the Hub."""

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from harmonization import hub as hub_module
from harmonization import loader
from harmonization.hub import HubUnavailableError, parse_hf_uri
from harmonization.loader import load_model
from harmonization.presets import PresetError, save_preset
from harmonization.zoo import UnknownModelError

sys.path.insert(0, str(Path(__file__).parent))  # the stand-in Hub lives next to the tests
from hub_server import FakeHub, patch_zoo_entry, point_huggingface_hub_at  # noqa: E402
from test_convert import LEVIT_TINY  # noqa: E402  (the kecam LeViT fixture's config)

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
    with FakeHub() as fake:
        point_huggingface_hub_at(fake, monkeypatch, tmp_path)
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


def test_zoo_name_resolves_to_its_hub_repo(fake_hub, preset_dirs, images, monkeypatch):
    models, dirs = preset_dirs
    from harmonization.zoo import model_info

    repo_id = model_info("vgg16_harmonized")["hub"]["repo_id"]
    # Not published yet, and the original cannot be fetched (here: a 404 where the bucket would be): the error
    # names the repo and the original file.
    patch_zoo_entry(monkeypatch, "vgg16_harmonized",
                    url=fake_hub.endpoint + "/serrelab/prj_harmonization/models/vgg16_harmonized.h5")
    with pytest.raises(HubUnavailableError, match=f"{repo_id}.*does not exist.*vgg16_harmonized.h5.*HTTP 404"):
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


# --- the fallback: the published original `.h5`, converted once and cached as a preset --------------------------

FIXTURES = Path(__file__).parent / "fixtures" / "keras2"
ORIGINAL_PATH = "/serrelab/prj_harmonization/models/levit_small_harmonized.h5"


@pytest.fixture
def original_on_the_bucket(fake_hub, monkeypatch):
    """levit128_harmonized's original (a kecam LeViT fixture) served at its bucket path by the local server."""
    data = (FIXTURES / "kecam_levit_weights.h5").read_bytes()
    url = fake_hub.add_static(ORIGINAL_PATH, data)
    patch_zoo_entry(monkeypatch, "levit128_harmonized", url=url, config=LEVIT_TINY)
    expected = np.load(FIXTURES / "kecam_levit_weights.npz")
    return fake_hub, data, expected["images"].astype("float32"), expected["logits"]


def test_unpublished_zoo_model_is_converted_from_its_original_once(original_on_the_bucket, monkeypatch):
    import hashlib

    from harmonization.presets import read_metadata

    fake, data, images, logits = original_on_the_bucket
    model = load_model("levit128_harmonized")
    np.testing.assert_allclose(np.asarray(model(images)), logits, atol=1e-4)
    paths = [p for _, p in fake.requests]
    assert "/api/models/harmonization-hub/levit128_harmonized/revision/main" in paths  # the Hub is asked first
    assert paths.count(ORIGINAL_PATH) == 1
    preset = loader.resolve_preset("levit128_harmonized")
    assert preset.is_relative_to(loader.cache_dir())
    metadata = read_metadata(preset)
    assert metadata["source_sha256"] == hashlib.sha256(data).hexdigest()
    assert metadata["source_url"].endswith(ORIGINAL_PATH) and metadata["name"] == "levit128_harmonized"
    assert (preset / "README.md").is_file()
    assert paths.count(ORIGINAL_PATH) == 1 and [p for _, p in fake.requests].count(ORIGINAL_PATH) == 1  # cached
    # Offline, the conversion is served from the cache without a request.
    _go_offline(monkeypatch)
    count = len(fake.requests)
    again = load_model("levit128_harmonized", num_classes=3)
    assert again.output_shape == (None, 3) and len(fake.requests) == count


def test_truncated_original_is_never_cached(original_on_the_bucket):
    fake, data, images, logits = original_on_the_bucket
    fake.truncate.add(ORIGINAL_PATH)
    with pytest.raises(PresetError, match=f"truncated or corrupted and was deleted: received {len(data) // 2} of the "
                                          f"{len(data)} bytes"):
        load_model("levit128_harmonized")
    converted = loader.cache_dir() / "converted"
    # No partial download, no preset (only the conversion's lock file).
    assert not any(p for p in converted.rglob("*") if p.is_file() and p.suffix != ".lock")
    fake.truncate.clear()
    np.testing.assert_allclose(np.asarray(load_model("levit128_harmonized")(images)), logits, atol=1e-4)


def test_original_with_a_wrong_checksum_is_refused(original_on_the_bucket, monkeypatch):
    from harmonization import zoo

    registry = zoo._registry()
    registry["levit128_harmonized"]["source"]["sha256"] = "0" * 64
    with pytest.raises(PresetError, match="expected sha256 0000"):
        load_model("levit128_harmonized")
    assert loader._cached_conversion(registry["levit128_harmonized"]) is None


def test_offline_without_a_conversion_says_how_to_get_the_weights(original_on_the_bucket, monkeypatch):
    fake, *_ = original_on_the_bucket
    _go_offline(monkeypatch)
    with pytest.raises(HubUnavailableError, match="HF_HUB_OFFLINE is set.*harmonization download") as caught:
        load_model("levit128_harmonized")
    assert fake.requests == []
    # The advice names the zoo model, not a Hub repo that does not exist yet.
    assert "`harmonization download levit128_harmonized`" in str(caught.value) and "hf://" not in str(caught.value)


def test_a_damaged_cached_conversion_is_rebuilt(original_on_the_bucket):
    fake, data, images, logits = original_on_the_bucket
    preset = loader.resolve_preset("levit128_harmonized")
    weights = preset / "model.weights.h5"
    damaged = bytearray(weights.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    weights.write_bytes(bytes(damaged))
    np.testing.assert_allclose(np.asarray(load_model("levit128_harmonized")(images)), logits, atol=1e-4)
    assert [p for _, p in fake.requests].count(ORIGINAL_PATH) == 2  # downloaded and converted again


# --- bounded waits: a stalled or unreachable endpoint ends in a clear error ------------------------------------


@pytest.fixture
def short_timeouts(monkeypatch):
    """A 1 s network timeout and no wait between attempts, so that a stalled endpoint fails fast in tests."""
    from harmonization import network

    monkeypatch.setenv("HARMONIZATION_NETWORK_TIMEOUT", "1")
    monkeypatch.setattr(network, "_RETRY_WAIT", 0.0)


def test_a_stalled_hub_ends_in_a_clear_error(fake_hub, preset_dirs, short_timeouts):
    import httpx2

    fake_hub.add_preset(REPO, preset_dirs[1][0])
    fake_hub.stall.add("/api/models/")  # accepts the connection, never answers (measured: no return after 900 s)
    with pytest.raises(HubUnavailableError) as caught:
        load_model(f"hf://{REPO}")
    message = str(caught.value)
    assert fake_hub.endpoint in message and "HF_ENDPOINT" in message and "HF_HUB_OFFLINE" in message
    # What bounds the wait: our read timeout (1 s, the client sets none) ended the one request that was made.
    assert "TimeoutError: timed out" in message and "HARMONIZATION_NETWORK_TIMEOUT (seconds, now 1)" in message
    cause = caught.value.__cause__
    while cause is not None and not isinstance(cause, httpx2.ReadTimeout):
        cause = cause.__cause__ or cause.__context__
    assert isinstance(cause, httpx2.ReadTimeout)
    assert [p for _, p in fake_hub.requests if p.startswith("/api/")] == [f"/api/models/{REPO}/revision/main"]


def test_a_user_client_factory_is_left_alone(fake_hub, preset_dirs):
    import huggingface_hub
    from huggingface_hub.utils import _http

    from harmonization import network

    def mine():
        return _http.default_client_factory()

    huggingface_hub.set_client_factory(mine)
    try:
        assert network.bound_huggingface_hub() is False
        assert _http._GLOBAL_CLIENT_FACTORY is mine
    finally:
        huggingface_hub.set_client_factory(_http.default_client_factory)
    assert network.bound_huggingface_hub() is True
    fake_hub.add_preset(REPO, preset_dirs[1][0])
    assert load_model(f"hf://{REPO}").count_params() == preset_dirs[0][0].count_params()


def test_the_zoo_falls_back_to_the_original_when_the_hub_is_unreachable(original_on_the_bucket, short_timeouts):
    fake, data, images, logits = original_on_the_bucket
    fake.stall.add("/api/")  # the Hub stalls; the bucket answers
    np.testing.assert_allclose(np.asarray(load_model("levit128_harmonized")(images)), logits, atol=1e-4)
    assert [p for _, p in fake.requests].count(ORIGINAL_PATH) == 1


def test_hub_and_original_both_unreachable_name_both(original_on_the_bucket, short_timeouts):
    fake, *_ = original_on_the_bucket
    fake.stall.update({"/api/", ORIGINAL_PATH})
    with pytest.raises(HubUnavailableError) as caught:
        load_model("levit128_harmonized")
    message = str(caught.value)
    assert "From the Hugging Face Hub" in message and "From its published original" in message
    assert ORIGINAL_PATH in message and "HARMONIZATION_MODELS_URL" in message
    # What bounds the wait: 2 attempts at the original, each ended by the 1 s timeout; one request to the Hub.
    assert "tried 2 times, waiting up to 1 s for each answer): timed out" in message
    assert [p for _, p in fake.requests].count(ORIGINAL_PATH) == 2  # one retry, then the error
    asked = [p for _, p in fake.requests if p.startswith("/api/")]
    assert asked == ["/api/models/harmonization-hub/levit128_harmonized/revision/main"]


def test_download_file_gives_up_on_a_refused_connection(tmp_path, short_timeouts):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(HubUnavailableError, match=rf"Could not download http://127.0.0.1:{port}/x.h5 \(tried 2"):
        hub_module.download_file(f"http://127.0.0.1:{port}/x.h5", tmp_path / "x.h5")
    assert list(tmp_path.iterdir()) == []


def test_network_timeout_variable_is_checked(monkeypatch):
    from harmonization import network

    monkeypatch.setenv("HARMONIZATION_NETWORK_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="HARMONIZATION_NETWORK_TIMEOUT must be a positive number.*'soon'"):
        network.timeout()
    monkeypatch.setenv("HARMONIZATION_NETWORK_TIMEOUT", "2.5")
    assert network.timeout() == 2.5


# --- the cache of converted originals: stale work, concurrent conversions, trust on first use -----------------


def test_a_killed_conversion_leaves_nothing_forever(original_on_the_bucket):
    from harmonization import zoo

    entry = zoo.model_info("levit128_harmonized")
    converted = loader.cache_dir() / "converted"
    target = loader._conversion_dir(entry)
    download = converted / ".levit128_harmonized.k1ll3d"  # a download folder of a killed conversion
    staging = converted / f".{target.name}.x7y8.partial"  # a preset save that was killed
    other = converted / ".vgg16_harmonized.abcd"  # another model's: not ours to judge
    for folder in (download, staging, other):
        folder.mkdir(parents=True)
        (folder / "levit_small_harmonized.h5.incomplete").write_bytes(b"\0" * 1000)
    load_model("levit128_harmonized")
    assert not download.exists() and not staging.exists() and other.exists()
    assert sorted(p.name for p in converted.iterdir() if not p.name.endswith(".lock")) == [
        ".vgg16_harmonized.abcd", target.name]


_CONVERT_SCRIPT = """
import sys, json
from harmonization import loader, zoo
url, config = sys.argv[1], json.loads(sys.argv[2])
registry = {n: zoo.model_info(n) for n in zoo.list_models()}
registry["levit128_harmonized"]["source"]["url"] = url
registry["levit128_harmonized"]["architecture"]["config"] = config
zoo._registry = lambda: registry
print("PRESET", loader.resolve_preset("levit128_harmonized"), flush=True)
"""


def test_two_processes_converting_one_model_download_it_once(original_on_the_bucket, tmp_path):
    import json

    fake, *_ = original_on_the_bucket
    fake.delay[ORIGINAL_PATH] = 8.0  # the first conversion is still under way when the second asks
    env = {**os.environ, "HF_ENDPOINT": fake.endpoint, "HF_HUB_CACHE": str(tmp_path / "hf"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HARMONIZATION_CACHE": str(loader.cache_dir()),
           "HF_TOKEN_PATH": str(tmp_path / "none"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, "-c", _CONVERT_SCRIPT, fake.endpoint + ORIGINAL_PATH, json.dumps(LEVIT_TINY)]
    workers = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    results = [worker.communicate(timeout=240) for worker in workers]
    for worker, (out, err) in zip(workers, results):
        assert worker.returncode == 0, err[-2000:]
    presets_made = {line for out, _ in results for line in out.splitlines() if line.startswith("PRESET")}
    assert len(presets_made) == 1
    assert [p for _, p in fake.requests].count(ORIGINAL_PATH) == 1
    assert any("Waiting for another process converting zoo model 'levit128_harmonized'" in err for _, err in results)


def test_an_original_without_a_published_digest_is_trusted_on_first_use(original_on_the_bucket):
    import hashlib
    import json
    import shutil

    from harmonization import zoo
    from harmonization.originals import trust_store

    fake, data, images, logits = original_on_the_bucket
    assert "will be recorded" in zoo.model_info("levit128_harmonized")["source"]["verification"]
    load_model("levit128_harmonized")
    digest = hashlib.sha256(data).hexdigest()
    record = json.loads(trust_store().read_text())[fake.endpoint + ORIGINAL_PATH]
    assert record["sha256"] == digest and record["size"] == len(data)
    info = zoo.model_info("levit128_harmonized")["source"]["verification"]
    assert "trusted on first use" in info and digest in info
    # The cache is cleared, and the file on the server was replaced: refused, nothing converted.
    shutil.rmtree(loader.cache_dir() / "converted")
    fake.static[ORIGINAL_PATH] = data[:-10] + b"0123456789"
    with pytest.raises(PresetError, match=r"differs from the one first downloaded here \(expected sha256"):
        load_model("levit128_harmonized")
    assert loader._cached_conversion(zoo.model_info("levit128_harmonized")) is None
    assert json.loads(trust_store().read_text())[fake.endpoint + ORIGINAL_PATH]["sha256"] == digest
    # The original file again: accepted.
    fake.static[ORIGINAL_PATH] = data
    np.testing.assert_allclose(np.asarray(load_model("levit128_harmonized")(images)), logits, atol=1e-4)
