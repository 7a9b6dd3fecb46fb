"""Every download has a deadline and every answer is checked (issue 22, section 2).

Against local stand-ins that speak the real protocols (`hub_server.FakeHub`: the Hub's API and plain files over
HTTP on 127.0.0.1), through the real clients (urllib, huggingface_hub, the TFDS ClickMe builder):

- a server that announces 10 MB and sends one byte at a time is cut off on every download path, with a sentence
  naming the URL and the rate it sent at;
- an `HF_ENDPOINT` answering a web page or redirecting in a loop is "the Hub cannot be reached": zoo models are
  served from their published original;
- a ClickMe mirror answering web pages leaves nothing that passes for a shard, and a cached shard that is not one
  is downloaded again;
- the network variables are bounded, and a bad value names the variable.

Deadlines are made small with the environment variables; the tests assert what bounds the wait (the error, the
rate it names, the attempts made), never the time it took.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

from harmonization import hub, network, tfrecord_framing
from harmonization.hub import HubUnavailableError
from harmonization.loader import load_model
from harmonization.presets import PresetError, save_preset

sys.path.insert(0, str(Path(__file__).parent))  # the stand-in Hub lives next to the tests
from hub_server import HTML_PAGE, FakeHub, patch_zoo_entry, point_huggingface_hub_at  # noqa: E402
from test_convert import LEVIT_TINY  # noqa: E402  (the kecam LeViT fixture's config)

REPO = "serre-lab/tiny_harmonized"
FIXTURES = Path(__file__).parent / "fixtures" / "keras2"
ORIGINAL_PATH = "/serrelab/prj_harmonization/models/levit_small_harmonized.h5"
TRICKLE = 0.05  # seconds between the bytes of a trickling answer: 20 B/s, far below the 1 KiB/s minimum


@pytest.fixture
def deadlines(monkeypatch):
    """A 1 s timeout (and so a 1 s rate window) and no wait between attempts: every deadline here is short."""
    monkeypatch.setenv(network.TIMEOUT_ENV, "1")
    monkeypatch.delenv(network.MIN_RATE_ENV, raising=False)
    monkeypatch.setattr(network, "_RETRY_WAIT", 0.0)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path, deadlines):
    """A FakeHub, with huggingface_hub pointed at it and at an empty cache (as HF_ENDPOINT/HF_HUB_CACHE would)."""
    with FakeHub() as fake:
        point_huggingface_hub_at(fake, monkeypatch, tmp_path)
        yield fake


@pytest.fixture
def original_on_the_bucket(fake_hub, monkeypatch):
    """levit128_harmonized's original (a kecam LeViT fixture) served at its bucket path by the local server."""
    url = fake_hub.add_static(ORIGINAL_PATH, (FIXTURES / "kecam_levit_weights.h5").read_bytes())
    patch_zoo_entry(monkeypatch, "levit128_harmonized", url=url, config=LEVIT_TINY)
    expected = np.load(FIXTURES / "kecam_levit_weights.npz")
    return fake_hub, expected["images"].astype("float32"), expected["logits"]


def _tiny_preset(directory):
    import keras

    keras.utils.set_random_seed(1)
    inputs = keras.Input((4, 4, 3))
    outputs = keras.layers.Dense(3, name="predictions")(keras.layers.Flatten()(inputs))
    return save_preset(keras.Model(inputs, outputs), directory, metadata={"name": "tiny"})


def _gets(fake, path):
    return [p for method, p in fake.requests if method == "GET"].count(path)


# --- the variables: bounded, and named when wrong ---------------------------------------------------------------


@pytest.mark.parametrize("value", ["1e300", "3601", "0", "-1", "inf", "nan", "soon"])
def test_a_timeout_out_of_range_names_the_variable_the_range_and_the_value(monkeypatch, value):
    monkeypatch.setenv(network.TIMEOUT_ENV, value)
    expected = rf"HARMONIZATION_NETWORK_TIMEOUT must be a positive number of seconds, at most 3600; got '{value}'"
    with pytest.raises(ValueError, match=expected):
        network.timeout()


@pytest.mark.parametrize("variable, value", [(network.TIMEOUT_ENV, "1e300"), (network.MIN_RATE_ENV, "0")])
def test_a_bad_variable_is_named_before_any_request(monkeypatch, tmp_path, variable, value):
    """1e300 s used to reach `socket.settimeout`: an OverflowError that named nothing."""
    monkeypatch.setenv(variable, value)
    with FakeHub() as fake:
        point_huggingface_hub_at(fake, monkeypatch, tmp_path)
        url = fake.add_static("/file.bin", b"x" * 10)
        with pytest.raises(ValueError, match=rf"{variable} must be a positive number.*; got '{value}'"):
            hub.download_file(url, tmp_path / "file.bin")
        with pytest.raises(ValueError, match=rf"{variable} must be a positive number.*; got '{value}'"):
            load_model(f"hf://{REPO}")
        assert fake.requests == [] and not list(tmp_path.glob("file.bin*"))
        monkeypatch.setenv(network.TIMEOUT_ENV, "3600")  # the largest accepted timeout is one a socket takes
        monkeypatch.delenv(network.MIN_RATE_ENV, raising=False)
        assert hub.download_file(url, tmp_path / "file.bin").read_bytes() == b"x" * 10


@pytest.mark.parametrize("value", ["0", "-5", "1e300", "inf", "fast"])
def test_a_minimum_rate_out_of_range_names_the_variable_the_range_and_the_value(monkeypatch, value):
    monkeypatch.setenv(network.MIN_RATE_ENV, value)
    expected = rf"HARMONIZATION_NETWORK_MIN_RATE must be a positive number of bytes per second, at most 1e\+09; " \
               rf"got '{value}'"
    with pytest.raises(ValueError, match=expected):
        network.min_rate()
    monkeypatch.setenv(network.MIN_RATE_ENV, "2048")
    assert network.min_rate() == 2048.0
    monkeypatch.delenv(network.MIN_RATE_ENV)
    assert network.min_rate() == network.DEFAULT_MIN_RATE == 1024.0


def test_the_rate_guard_judges_each_window_and_never_a_short_answer():
    now = [0.0]
    guard = network.RateGuard("http://x/f", minimum=100.0, window=2.0, clock=lambda: now[0])
    guard.add(10)  # 10 bytes in 1 s: the window is not over, nothing is judged
    now[0] = 1.0
    guard.add(10)
    now[0] = 2.0
    guard.add(300)  # 320 bytes in the first 2 s window: 160 B/s, fast enough; a new window starts
    now[0] = 4.5
    with pytest.raises(network.TooSlowError) as caught:
        guard.add(50)  # 50 bytes in 2.5 s: 20 B/s
    error = caught.value
    assert (error.received, error.seconds, error.rate, error.minimum) == (50, 2.5, 20.0, 100.0)
    assert str(error) == ("http://x/f sent 50 bytes in 2.5 s (20 B/s), slower than the minimum of 100 B/s "
                          "(HARMONIZATION_NETWORK_MIN_RATE)")
    assert isinstance(error, TimeoutError)  # retried as a stall is


# --- a trickling server, on every download path -----------------------------------------------------------------


def _assert_names_the_url_and_a_slow_rate(message, url):
    import re

    assert url in message and "HARMONIZATION_NETWORK_MIN_RATE" in message, message
    rate = re.search(r"\(([\d.]+) B/s\), slower than the minimum of 1 KiB/s", message)
    assert rate is not None and 0 < float(rate[1]) < 1024, message


def test_download_file_cuts_off_a_trickle_and_names_the_url_and_the_rate(fake_hub, tmp_path):
    url = fake_hub.add_static("/bucket/big.h5", b"unused")
    fake_hub.trickle["/bucket/big.h5"] = TRICKLE
    with pytest.raises(HubUnavailableError, match=r"Could not download .*big\.h5: the last of 2 tries") as caught:
        hub.download_file(url, tmp_path / "big.h5")
    _assert_names_the_url_and_a_slow_rate(str(caught.value), url)
    assert "\n" not in str(caught.value)  # one sentence
    # What bounds the wait: 2 attempts, each cut off after a 1 s window (the timeout) at below 1 KiB/s.
    assert _gets(fake_hub, "/bucket/big.h5") == network.attempts() == 2
    slow = caught.value.__cause__
    assert isinstance(slow, network.TooSlowError) and slow.minimum == 1024.0 and slow.seconds >= 1.0
    # The bytes were read as they arrived (a read waiting for a whole 1 MiB chunk sees none of them until the
    # server hangs up), and the client cut each attempt off, not the server's own time limit.
    assert slow.received > 0
    assert fake_hub.wait_for_trickles(2) == ["client hung up"] * 2
    assert list(tmp_path.iterdir()) == []  # nothing partial is kept


def test_the_progress_bar_moves_with_each_byte_of_a_trickle(fake_hub, tmp_path, monkeypatch):
    from huggingface_hub.utils import tqdm as hf_tqdm

    updates = []
    original_update = hf_tqdm.update
    monkeypatch.setattr(hf_tqdm, "update", lambda self, n=1: (updates.append(n), original_update(self, n))[1])
    url = fake_hub.add_static("/bucket/big.h5", b"unused")
    fake_hub.trickle["/bucket/big.h5"] = TRICKLE
    with pytest.raises(HubUnavailableError):
        hub.download_file(url, tmp_path / "big.h5")
    assert len(updates) > 2 and all(n >= 1 for n in updates)


def test_a_fast_download_is_not_judged(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setenv(network.MIN_RATE_ENV, "1e9")  # a 1 GB/s minimum: a small answer ends within its window
    data = bytes(range(256)) * 100
    url = fake_hub.add_static("/bucket/small.h5", data)
    assert hub.download_file(url, tmp_path / "small.h5").read_bytes() == data


def test_the_minimum_rate_variable_sets_the_deadline(fake_hub, tmp_path, monkeypatch):
    """At 20 B/s, a 1 B/s minimum lets the trickle run until the server hangs up: the variable is what decides."""
    monkeypatch.setenv(network.MIN_RATE_ENV, "1")
    fake_hub.trickle_limit = 2.0
    url = fake_hub.add_static("/bucket/big.h5", b"unused")
    fake_hub.trickle["/bucket/big.h5"] = TRICKLE
    with pytest.raises(PresetError, match=r"received \d+ of the 10000000 bytes announced"):
        hub.download_file(url, tmp_path / "big.h5")
    assert _gets(fake_hub, "/bucket/big.h5") == 1


def test_harmonization_download_from_a_trickling_models_mirror(fake_hub, monkeypatch, capsys):
    """`harmonization download NAME` with HARMONIZATION_MODELS_URL at a mirror that trickles (no Hub repo yet)."""
    from harmonization import cli

    registry = patch_zoo_entry(monkeypatch, "levit128_harmonized", config=LEVIT_TINY)
    filename = registry["levit128_harmonized"]["source"]["url"].rsplit("/", 1)[-1]
    monkeypatch.setenv("HARMONIZATION_MODELS_URL", fake_hub.endpoint + "/mirror/models")
    fake_hub.trickle["/mirror/models/"] = TRICKLE
    assert cli.main(["download", "levit128_harmonized"]) == 1
    stderr = capsys.readouterr().err
    assert "Downloading levit_small_harmonized.h5" in stderr  # the progress bar showed the bytes that came
    message = stderr[stderr.index("harmonization download: error:"):]
    url = f"{fake_hub.endpoint}/mirror/models/{filename}"
    assert message.startswith("harmonization download: error: Zoo model 'levit128_harmonized'")
    _assert_names_the_url_and_a_slow_rate(message, url)
    assert _gets(fake_hub, f"/mirror/models/{filename}") == network.attempts()


def test_a_preset_file_trickling_from_the_hub_is_cut_off(fake_hub, tmp_path):
    """huggingface_hub's own file download (HF_ENDPOINT): one attempt, not resumed again and again."""
    sha = fake_hub.add_preset(REPO, _tiny_preset(tmp_path / "preset"))
    weights = f"/{REPO}/resolve/{sha}/model.weights.h5"
    fake_hub.trickle[weights] = TRICKLE
    with pytest.raises(HubUnavailableError) as caught:
        load_model(f"hf://{REPO}")
    message = str(caught.value).split("\n", 1)[0]
    assert message.startswith(f"Could not use the Hugging Face Hub at {fake_hub.endpoint} (HF_ENDPOINT) for "
                              f"hf://{REPO}@main")
    _assert_names_the_url_and_a_slow_rate(message, fake_hub.endpoint + weights)
    # huggingface_hub resumes a timed-out download and resets its retries whenever bytes arrived: a trickle
    # reported as a timeout would be resumed for ever. Reported as a read error, it is tried once.
    assert _gets(fake_hub, weights) == 1


@pytest.mark.parametrize("fault", ["trickle", "html", "redirect_loop"])
def test_a_zoo_model_is_served_from_its_original_when_the_hub_answers_wrongly(original_on_the_bucket, fault, capsys):
    fake, images, logits = original_on_the_bucket
    if fault == "trickle":
        fake.trickle["/api/"] = TRICKLE
    else:
        getattr(fake, fault).add("/api/")
    np.testing.assert_allclose(np.asarray(load_model("levit128_harmonized")(images)), logits, atol=1e-4)
    assert _gets(fake, ORIGINAL_PATH) == 1
    said = [line for line in capsys.readouterr().err.splitlines() if "Zoo model" in line]
    assert len(said) == 1, said
    expected = {"trickle": "B/s), slower than the minimum", "html": "not the Hub's JSON",
                "redirect_loop": "redirects in a loop"}[fault]
    assert said[0].startswith("Zoo model 'levit128_harmonized' is served from its published original instead of "
                              f"the Hub: Could not use the Hugging Face Hub at {fake.endpoint} (HF_ENDPOINT)")
    assert expected in said[0]


@pytest.mark.parametrize("where", ["everywhere", "files"])
@pytest.mark.parametrize("fault", ["html", "redirect_loop"])
def test_a_hub_uri_from_an_endpoint_that_is_not_the_hub(fake_hub, tmp_path, fault, where):
    """No original to fall back on: one sentence saying what the endpoint did, not a JSON or redirect traceback."""
    fake_hub.add_preset(REPO, _tiny_preset(tmp_path / "preset"))
    getattr(fake_hub, fault).add("/" if where == "everywhere" else f"/{REPO}/resolve/")
    with pytest.raises(HubUnavailableError) as caught:
        load_model(f"hf://{REPO}")
    first = str(caught.value).split("\n", 1)[0]
    expected = {
        ("html", "everywhere"): "it answered something that is not the Hub's JSON (a web page or a proxy's answer?) "
                                "(JSONDecodeError: Expecting value: line 1 column 1 (char 0)).",
        ("html", "files"): "FileMetadataError: Response from ",  # said by huggingface_hub itself
        ("redirect_loop", "everywhere"): "it redirects in a loop (TooManyRedirects: ",
        ("redirect_loop", "files"): "it redirects in a loop (TooManyRedirects: ",
    }[fault, where]
    assert first.startswith((f"Could not use the Hugging Face Hub at {fake_hub.endpoint} (HF_ENDPOINT) for "
                             f"hf://{REPO}@main, and it is not in the Hugging Face cache",
                             f"Could not reach the Hugging Face Hub at {fake_hub.endpoint} (HF_ENDPOINT) for "
                             f"hf://{REPO}@main, and it is not in the Hugging Face cache")), first
    assert expected in first, first


def test_a_complete_cached_snapshot_serves_when_the_endpoint_answers_a_web_page(fake_hub, tmp_path):
    fake_hub.add_preset(REPO, _tiny_preset(tmp_path / "preset"))
    first = hub.download_preset(REPO)
    fake_hub.html.add("/")
    assert hub.download_preset(REPO) == first


# --- what arrived is checked before it is kept ------------------------------------------------------------------


def test_an_html_answer_is_never_kept_as_a_file(fake_hub, tmp_path):
    url = fake_hub.add_static("/bucket/model.h5", b"unused")
    fake_hub.html.add("/bucket/")
    with pytest.raises(PresetError, match=r"model\.h5 is not the file asked for and was deleted: the server "
                                          r"answered an HTML page, not the file \(it starts with b'<!DOCTYPE html>"):
        hub.download_file(url, tmp_path / "model.h5")
    assert list(tmp_path.iterdir()) == []


def test_a_callers_check_refuses_what_arrived(fake_hub, tmp_path):
    url = fake_hub.add_static("/bucket/data.bin", b"not what it should be")
    seen = []

    def check(path):
        seen.append(path.name)
        return "it is not a shard"

    with pytest.raises(PresetError, match=r"data\.bin is not the file asked for and was deleted: it is not a shard"):
        hub.download_file(url, tmp_path / "data.bin", check=check)
    assert seen == ["data.bin.incomplete"] and list(tmp_path.iterdir()) == []  # checked before it was kept


# --- ClickMe: trickles and web pages --------------------------------------------------------------------------


def _clickme():
    import tensorflow_datasets as tfds

    import tfds_clickme  # noqa: F401  (registers "clickme")
    from tfds_clickme.clickme import clickme_dataset_builder as builder_lib
    from tfds_clickme.clickme import published_shards

    return tfds, builder_lib, published_shards


def _clickme_mirror(fake, shards, scratch):
    """Serve {shard name: record count} on `fake` as the bucket lays them out; return a builder config for it."""
    tfds, builder_lib, published_shards = _clickme()
    folders = {"train": [], "val": []}
    for offset, (name, count) in enumerate(shards.items()):
        shard = scratch / f"{name}.tfrecords"
        published_shards.write_shard(shard, published_shards.synthetic_records(count, seed=10 + offset, quality=70))
        folder, index = name.split("-")
        fake.add_static(f"/click-me/{folder}/{name}.tfrecords", shard.read_bytes())
        folders[folder].append(int(index))
    return builder_lib.ClickMeConfig(
        name="local_mirror", url_template=fake.endpoint + "/click-me/{folder}/{folder}-{index}.tfrecords",
        train_shards=tuple(folders["train"]), validation_shards=tuple(folders["val"]), edges_may_be_missing=False)


def test_first_record_problem_tells_a_shard_from_what_is_not_one(tmp_path):
    _, builder_lib, published_shards = _clickme()
    good = tmp_path / "train-0.tfrecords"
    published_shards.write_shard(good, list(published_shards.synthetic_records(2, seed=1, quality=70)))
    assert tfrecord_framing.first_record_problem(good) is None
    cases = {
        "html": (HTML_PAGE, "does not start with a TFRecord header: it starts with b'<!DOCTYPE html>"),
        "empty": (b"", "the file is empty"),
        "short": (good.read_bytes()[:7], "does not start with a TFRecord header"),
        "truncated": (good.read_bytes()[:100], "its first record needs"),
    }
    for name, (data, expected) in cases.items():
        path = tmp_path / f"{name}.tfrecords"
        path.write_bytes(data)
        assert expected in (tfrecord_framing.first_record_problem(path) or ""), name


def test_a_clickme_mirror_answering_web_pages_leaves_no_shard(fake_hub, tmp_path):
    tfds, builder_lib, _ = _clickme()
    config = _clickme_mirror(fake_hub, {"train-0": 2, "val-0": 1}, tmp_path)
    fake_hub.html.add("/click-me/")
    builder = builder_lib.Builder(data_dir=str(tmp_path / "data"), config=config)
    with pytest.raises(tfds.download.DownloadError, match=r"ClickMe shard (train|val)-0 could not be downloaded "
                                                          r"(?s:.*)answered an HTML page"):
        builder.download_and_prepare(download_dir=str(tmp_path / "downloads"))
    assert not [p for p in (tmp_path / "downloads").rglob("*") if p.is_file()]
    assert not builder.is_prepared()


def test_cached_web_pages_are_downloaded_again_once_the_mirror_is_fixed(fake_hub, tmp_path, caplog):
    """What an earlier version left: 79-byte web pages kept as shards, which broke every later build."""
    _, builder_lib, _ = _clickme()
    config = _clickme_mirror(fake_hub, {"train-0": 2, "train-1": 1, "val-0": 1}, tmp_path)
    cached = tmp_path / "downloads" / "clickme_shards"
    cached.mkdir(parents=True)
    for name in ("train-0", "train-1", "val-0"):
        (cached / f"{name}.tfrecords").write_bytes(HTML_PAGE)
    builder = builder_lib.Builder(data_dir=str(tmp_path / "data"), config=config)
    builder.download_and_prepare(download_dir=str(tmp_path / "downloads"))
    assert builder.info.splits["train"].num_examples == 3 and builder.info.splits["validation"].num_examples == 1
    for name in ("train-0", "train-1", "val-0"):  # each downloaded again, once
        assert _gets(fake_hub, f"/click-me/{name.split('-')[0]}/{name}.tfrecords") == 1, name
    assert caplog.text.count("is not a TFRecord shard") == 3


def test_a_trickling_clickme_shard_is_cut_off_naming_the_shard_and_the_rate(fake_hub, tmp_path):
    tfds, builder_lib, _ = _clickme()
    config = _clickme_mirror(fake_hub, {"train-0": 1, "val-0": 1}, tmp_path)
    fake_hub.trickle["/click-me/val/val-0.tfrecords"] = TRICKLE
    builder = builder_lib.Builder(data_dir=str(tmp_path / "data"), config=config)
    with pytest.raises(tfds.download.DownloadError, match="ClickMe shard val-0 could not be downloaded") as caught:
        builder.download_and_prepare(download_dir=str(tmp_path / "downloads"))
    _assert_names_the_url_and_a_slow_rate(str(caught.value), fake_hub.endpoint + "/click-me/val/val-0.tfrecords")
    assert _gets(fake_hub, "/click-me/val/val-0.tfrecords") == network.attempts()
    assert not list((tmp_path / "downloads").rglob("val-0*"))
