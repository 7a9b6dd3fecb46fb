"""Tests for the ClickMe builder: the TFDS harness on dummy data, the download path against a local
HTTP server, bad records, interrupted builds and the manual directory."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import os
import re
import socket
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from harmonization import tfrecord_framing
from tfds_clickme.clickme import clickme_dataset_builder as builder_lib
from tfds_clickme.clickme import published_shards

REPO_ROOT = Path(__file__).resolve().parents[2]


class ClickMeBuilderTest(tfds.testing.DatasetBuilderTestCase):
    """The standard TFDS checks on `dummy_data/` (tools/make_clickme_dummy_data.py), both configs."""

    DATASET_CLASS = builder_lib.Builder
    SPLITS = {"train": 9, "validation": 3}


# ------------------------------------------------------------------------------------------------
# Static properties.
# ------------------------------------------------------------------------------------------------


def test_version_is_the_highest_release_note():
    versions = [tfds.core.Version(v) for v in builder_lib.Builder.RELEASE_NOTES]
    assert builder_lib.Builder.VERSION == max(versions)


def test_published_shard_list():
    urls = builder_lib.ClickMeConfig(name="published").shard_urls()
    base = "https://storage.googleapis.com/serrelab/prj_harmonization/dataset/click-me"
    assert len(urls["train"]) == 319 and len(urls["validation"]) == 18
    # Both the published loader's shards (0..317, 0..16) and its tests' shards (318, 17).
    assert urls["train"]["train-0"] == f"{base}/train/train-0.tfrecords"
    assert urls["train"]["train-318"] == f"{base}/train/train-318.tfrecords"
    assert urls["validation"]["val-17"] == f"{base}/val/val-17.tfrecords"


def test_label_names_are_the_imagenet_classes():
    names = builder_lib.Builder(data_dir="/tmp/unused").info.features["label"].names
    imagenet = tfds.core.tfds_path("datasets/imagenet2012/labels.txt").read_text().split()
    assert names == imagenet and len(names) == 1000


def test_dummy_data_is_what_the_script_writes():
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    try:
        import make_clickme_dummy_data
    finally:
        sys.path.remove(str(REPO_ROOT / "tools"))
    dummy = Path(builder_lib.__file__).parent / "dummy_data"
    counts = {
        path.name[: -len(".tfrecords")]: sum(1 for _ in tf.data.TFRecordDataset(str(path)))
        for path in dummy.glob("*.tfrecords")
    }
    assert counts == make_clickme_dummy_data.DUMMY_SHARDS
    assert ClickMeBuilderTest.SPLITS == {
        "train": sum(v for k, v in counts.items() if k.startswith("train")),
        "validation": sum(v for k, v in counts.items() if k.startswith("val")),
    }


def test_manual_instructions_say_what_goes_where():
    text = builder_lib.Builder.MANUAL_DOWNLOAD_INSTRUCTIONS
    for needle in ("train-*.tfrecords", "val-*.tfrecords", "manual_dir", "validation", "train-318", "val-17"):
        assert needle in text


# ------------------------------------------------------------------------------------------------
# Helpers: shards, a local HTTP server speaking the bucket's layout, builds.
# ------------------------------------------------------------------------------------------------


def good_records(count: int, seed: int) -> list[bytes]:
    return list(published_shards.synthetic_records(count, seed=seed, quality=70))


def write_published_layout(root: Path, shards: dict[str, list[bytes]]) -> None:
    """Shards as on the bucket: <root>/click-me/train/train-0.tfrecords, .../val/val-0.tfrecords."""
    for name, records in shards.items():
        folder = name.split("-")[0]
        published_shards.write_shard(root / "click-me" / folder / f"{name}.tfrecords", records)


class _Handler(http.server.SimpleHTTPRequestHandler):
    requested: list[str]
    probed: list[str]
    truncate_once: set[str]
    stall: set[str]
    released: threading.Event

    def do_HEAD(self):  # noqa: N802 (http.server's naming)
        self.probed.append(self.path)
        super().do_HEAD()

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.requested.append(self.path)
        if self.path in self.stall:  # Accept, send the headers, then never a byte of the body.
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.flush()
            self.released.wait()
            return
        if self.path in self.truncate_once:  # Promise the whole file, send half, hang up.
            self.truncate_once.discard(self.path)
            payload = Path(self.translate_path(self.path)).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(root: Path, truncate_once: tuple[str, ...] = (), probed: list[str] | None = None,
          stall: tuple[str, ...] = ()):
    """An HTTP server on 127.0.0.1 serving `root`; yields (base url, list of requested paths).

    GET requests are listed in the yielded list, HEAD requests in `probed` when given. A GET of a
    path in `stall` gets its headers and then no body until the server stops.
    """
    requested: list[str] = []
    released = threading.Event()
    attributes = {
        "requested": requested,
        "probed": [] if probed is None else probed,
        "truncate_once": set(truncate_once),
        "stall": set(stall),
        "released": released,
    }
    handler = type("Handler", (_Handler,), attributes)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requested
    finally:
        released.set()
        server.shutdown()
        server.server_close()


def mirror_config(base_url: str, train=(0, 1), validation=(0,), **kwargs) -> builder_lib.ClickMeConfig:
    return builder_lib.ClickMeConfig(
        name="local_mirror",
        url_template=base_url + "/click-me/{folder}/{folder}-{index}.tfrecords",
        train_shards=tuple(train),
        validation_shards=tuple(validation),
        **kwargs,
    )


def assert_not_prepared(data_dir: Path, config=None):
    """Nothing in `data_dir` passes for a complete dataset: TFDS refuses to load it."""
    builder = builder_lib.Builder(data_dir=str(data_dir), config=config)
    assert not builder.is_prepared()
    with pytest.raises(AssertionError, match="could not find data"):
        tfds.load(
            "clickme", split="train", data_dir=str(data_dir), download=False, builder_kwargs={"config": config}
        )


@pytest.fixture(autouse=True)
def _no_proxy_for_localhost(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


# ------------------------------------------------------------------------------------------------
# Automatic download.
# ------------------------------------------------------------------------------------------------


def test_download_builds_from_the_published_layout(tmp_path):
    shards = {"train-0": good_records(3, 1), "train-1": good_records(2, 2), "val-0": good_records(2, 3)}
    write_published_layout(tmp_path / "bucket", shards)
    with serve(tmp_path / "bucket") as (base_url, requested):
        config = mirror_config(base_url)
        builder = builder_lib.Builder(data_dir=str(tmp_path / "data"), config=config)
        builder.download_and_prepare(download_dir=str(tmp_path / "downloads"))
    assert sorted(requested) == [
        "/click-me/train/train-0.tfrecords",
        "/click-me/train/train-1.tfrecords",
        "/click-me/val/val-0.tfrecords",
    ]
    assert builder.info.splits["train"].num_examples == 5
    assert builder.info.splits["validation"].num_examples == 2
    # Original JPEG bytes, labels and stable ids, readable with tfds.load.
    loaded = tfds.load(
        "clickme",
        split="train",
        data_dir=str(tmp_path / "data"),
        download=False,
        builder_kwargs={"config": config},
        decoders={"image": tfds.decode.SkipDecoding(), "heatmap": tfds.decode.SkipDecoding()},
    )
    by_id = {example["id"].numpy().decode(): example for example in loaded}
    assert sorted(by_id) == ["train-0_00000", "train-0_00001", "train-0_00002", "train-1_00000", "train-1_00001"]
    original = tf.train.Example.FromString(shards["train-1"][1]).features.feature
    stored = by_id["train-1_00001"]
    assert stored["image"].numpy() == original["image"].bytes_list.value[0]
    assert stored["heatmap"].numpy() == original["heatmap"].bytes_list.value[0]
    assert int(stored["label"]) == original["label"].int64_list.value[0]


def test_http_error_names_the_url_and_leaves_no_dataset(tmp_path):
    write_published_layout(tmp_path / "bucket", {"train-0": good_records(2, 1)})  # No val-0.
    with serve(tmp_path / "bucket") as (base_url, _):
        config = mirror_config(base_url, train=(0,))
        builder = builder_lib.Builder(data_dir=str(tmp_path / "data"), config=config)
        with pytest.raises(tfds.download.DownloadError, match=r"val/val-0\.tfrecords.*404(?s:.*)manual_dir"):
            builder.download_and_prepare(download_dir=str(tmp_path / "downloads"))
    assert_not_prepared(tmp_path / "data", config)


def test_truncated_download_is_never_taken_for_a_complete_file(tmp_path):
    shards = {"train-0": good_records(3, 1), "val-0": good_records(2, 2)}
    write_published_layout(tmp_path / "bucket", shards)
    downloads = str(tmp_path / "downloads")
    with serve(tmp_path / "bucket", truncate_once=("/click-me/train/train-0.tfrecords",)) as (base_url, requested):
        config = mirror_config(base_url, train=(0,))
        with pytest.raises(tfds.download.DownloadError, match=r"train-0(?s:.*)the connection dropped"):
            builder_lib.Builder(data_dir=str(tmp_path / "data"), config=config).download_and_prepare(
                download_dir=downloads
            )
        assert_not_prepared(tmp_path / "data", config)
        kept = sorted(p.name for p in Path(downloads).rglob("*") if p.is_file())
        assert not any(name.startswith("train-0") for name in kept), kept  # neither whole nor partial
        # Same URLs again: the half file must not be reused.
        builder = builder_lib.Builder(data_dir=str(tmp_path / "data"), config=config)
        builder.download_and_prepare(download_dir=downloads)
    assert requested.count("/click-me/train/train-0.tfrecords") == 2
    assert builder.info.splits["train"].num_examples == 3


def test_a_shard_that_stalls_mid_download_ends_in_a_clear_error(tmp_path, monkeypatch):
    from harmonization import network

    monkeypatch.setenv("HARMONIZATION_NETWORK_TIMEOUT", "1")
    monkeypatch.setattr(network, "_RETRY_WAIT", 0.0)
    write_published_layout(tmp_path / "bucket", {"train-0": good_records(2, 1), "val-0": good_records(2, 2)})
    with serve(tmp_path / "bucket", stall=("/click-me/val/val-0.tfrecords",)) as (base_url, requested):
        config = mirror_config(base_url, train=(0,))
        builder = builder_lib.Builder(data_dir=str(tmp_path / "data"), config=config)
        with pytest.raises(tfds.download.DownloadError, match=r"ClickMe shard val-0 could not be downloaded") as caught:
            builder.download_and_prepare(download_dir=str(tmp_path / "downloads"))
    # What bounds the wait: each of the 2 attempts ended by the 1 s read timeout.
    assert "(tried 2 times, waiting up to 1 s for each answer): timed out" in str(caught.value)
    assert requested.count("/click-me/val/val-0.tfrecords") == network.attempts() == 2
    assert_not_prepared(tmp_path / "data", config)


# ------------------------------------------------------------------------------------------------
# Bad records.
# ------------------------------------------------------------------------------------------------


def _jpeg(shape, seed=0) -> bytes:
    array = np.random.default_rng(seed).integers(0, 255, size=shape, dtype=np.uint8)
    return published_shards.encode_jpeg(array)


def _png(shape) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros(shape, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


_IMAGE, _HEATMAP = _jpeg((256, 256, 3)), _jpeg((256, 256), seed=1)
_EXAMPLE_WITHOUT_HEATMAP = tf.train.Example(
    features=tf.train.Features(
        feature={
            "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[_IMAGE])),
            "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[3])),
        }
    )
).SerializeToString()

BAD_RECORDS = {
    "not_an_example": (b"\xff\xff\xff\xff", "not a serialized tf.train.Example"),
    "missing_heatmap": (_EXAMPLE_WITHOUT_HEATMAP, "missing feature 'heatmap'"),
    "label_as_bytes": (
        tf.train.Example(
            features=tf.train.Features(
                feature={
                    "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[_IMAGE])),
                    "heatmap": tf.train.Feature(bytes_list=tf.train.BytesList(value=[_HEATMAP])),
                    "label": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"3"])),
                }
            )
        ).SerializeToString(),
        "'label' must hold exactly one int64_list value; got bytes_list",
    ),
    "png_image": (published_shards.serialize_record(_png((256, 256, 3)), _HEATMAP, 1), "'image' is not JPEG data"),
    "corrupt_jpeg": (
        published_shards.serialize_record(_IMAGE[: len(_IMAGE) // 3], _HEATMAP, 1),
        "'image' does not decode",
    ),
    "small_image": (
        published_shards.serialize_record(_jpeg((128, 256, 3)), _HEATMAP, 1),
        r"'image' has shape \(128, 256, 3\)",
    ),
    "rgb_heatmap": (
        published_shards.serialize_record(_IMAGE, _jpeg((256, 256, 3)), 1),
        r"'heatmap' has shape \(256, 256, 3\)",
    ),
    "label_1000": (published_shards.serialize_record(_IMAGE, _HEATMAP, 1000), "label 1000 is outside 0..999"),
    "label_negative": (published_shards.serialize_record(_IMAGE, _HEATMAP, -1), "label -1 is outside 0..999"),
}


@pytest.mark.parametrize("kind", sorted(BAD_RECORDS))
def test_each_kind_of_bad_record_is_reported(kind):
    record, reason = BAD_RECORDS[kind]
    with pytest.raises(builder_lib._InvalidRecord, match=reason):
        builder_lib._decode_record(record)


def test_a_good_record_decodes_to_its_original_bytes():
    record = good_records(1, 9)[0]
    example = builder_lib._decode_record(record)
    feature = tf.train.Example.FromString(record).features.feature
    assert example["image"] == feature["image"].bytes_list.value[0]
    assert example["label"] == feature["label"].int64_list.value[0]


def build_from_manual(manual_dir: Path, data_dir: Path, config="strict"):
    builder = tfds.builder(f"clickme/{config}", data_dir=str(data_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return builder


def test_bad_record_fails_the_build_naming_shard_and_index(tmp_path):
    records = good_records(4, 1)
    records[2] = BAD_RECORDS["label_1000"][0]
    published_shards.write_shard(tmp_path / "manual" / "train-0.tfrecords", good_records(3, 2))
    published_shards.write_shard(tmp_path / "manual" / "train-1.tfrecords", records)
    published_shards.write_shard(tmp_path / "manual" / "val-0.tfrecords", good_records(2, 3))
    with pytest.raises(builder_lib.ClickMeRecordError, match=r"train-1\.tfrecords, record 2: label 1000"):
        build_from_manual(tmp_path / "manual", tmp_path / "data")
    assert_not_prepared(tmp_path / "data")


def test_truncated_shard_fails_the_build_naming_shard_and_index(tmp_path):
    published_shards.write_shard(tmp_path / "manual" / "train-0.tfrecords", good_records(3, 1))
    path = tmp_path / "manual" / "val-0.tfrecords"
    published_shards.write_shard(path, good_records(3, 2))
    path.write_bytes(path.read_bytes()[: -200])  # The third record is cut short.
    match = r"val-0\.tfrecords, record 2: the shard is corrupted"
    with pytest.raises(builder_lib.ClickMeRecordError, match=match):
        build_from_manual(tmp_path / "manual", tmp_path / "data")
    assert_not_prepared(tmp_path / "data")


def test_skip_bad_records_counts_them(tmp_path):
    train = good_records(5, 1)
    train[1] = BAD_RECORDS["corrupt_jpeg"][0]
    train[4] = BAD_RECORDS["rgb_heatmap"][0]
    published_shards.write_shard(tmp_path / "manual" / "train-0.tfrecords", train)
    published_shards.write_shard(tmp_path / "manual" / "val-0.tfrecords", good_records(2, 2))
    builder = build_from_manual(tmp_path / "manual", tmp_path / "data", config="skip_bad_records")
    assert builder.info.splits["train"].num_examples == 3
    # Recorded in the dataset's metadata, and still there when the dataset is reloaded from disk.
    reloaded = tfds.builder("clickme/skip_bad_records", data_dir=str(tmp_path / "data"))
    for info in (builder.info, reloaded.info):
        skipped = info.metadata["skipped_records"]
        assert skipped["train"]["count"] == 2 and skipped["validation"]["count"] == 0
        assert [(s["shard"], s["record"]) for s in skipped["train"]["first"]] == [("train-0", 1), ("train-0", 4)]
        assert "does not decode" in skipped["train"]["first"][0]["reason"]
    ids = sorted(e["id"].numpy().decode() for e in reloaded.as_dataset(split="train"))
    assert ids == ["train-0_00000", "train-0_00002", "train-0_00003"]
    # The strict default build of the same shards fails.
    with pytest.raises(builder_lib.ClickMeRecordError, match=r"train-0\.tfrecords, record 1"):
        build_from_manual(tmp_path / "manual", tmp_path / "data")


# ------------------------------------------------------------------------------------------------
# Interrupted builds.
# ------------------------------------------------------------------------------------------------


_KILLED_BUILD = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    import tensorflow_datasets as tfds
    import tfds_clickme
    from tfds_clickme.clickme import clickme_dataset_builder as builder_lib

    original = builder_lib.Builder._generate_examples

    def generate_then_die(self, split, shards):
        for count, item in enumerate(original(self, split, shards)):
            if count == 2:  # Examples are being written: the process is killed, no cleanup runs.
                os.kill(os.getpid(), signal.SIGKILL)
            yield item

    builder_lib.Builder._generate_examples = generate_then_die
    builder = tfds.builder("clickme", data_dir={data!r})
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir={manual!r}))
    """
)


def test_killed_build_is_not_taken_for_complete_and_rebuilds(tmp_path):
    published_shards.write_shard(tmp_path / "manual" / "train-0.tfrecords", good_records(4, 1))
    published_shards.write_shard(tmp_path / "manual" / "val-0.tfrecords", good_records(2, 2))
    script = _KILLED_BUILD.format(
        repo=str(REPO_ROOT), data=str(tmp_path / "data"), manual=str(tmp_path / "manual")
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300)
    assert result.returncode == -9, result.stderr.decode()[-2000:]
    leftovers = [p.name for p in (tmp_path / "data" / "clickme" / "strict").iterdir()]
    assert any(name.startswith("incomplete.") for name in leftovers), leftovers  # Half-written files...
    assert_not_prepared(tmp_path / "data")  # ...that TFDS does not take for a dataset.
    builder = build_from_manual(tmp_path / "manual", tmp_path / "data")
    assert builder.info.splits["train"].num_examples == 4
    assert len(list(tfds.load("clickme", split="train", data_dir=str(tmp_path / "data")))) == 4


# ------------------------------------------------------------------------------------------------
# Manual directory.
# ------------------------------------------------------------------------------------------------


def test_manual_directory_without_shards_says_what_is_expected(tmp_path):
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "clickme_train_0").write_bytes(b"x")  # The published loader's cache name.
    with pytest.raises(FileNotFoundError, match=r"train-\*\.tfrecords(?s:.*)clickme_train_0"):
        build_from_manual(tmp_path / "manual", tmp_path / "data")


def test_manual_directory_in_bucket_layout_with_one_split(tmp_path, caplog):
    shards = {"val-0": good_records(2, 1), "val-10": good_records(1, 2), "val-2": good_records(1, 3)}
    write_published_layout(tmp_path / "manual", shards)
    builder = build_from_manual(tmp_path / "manual" / "click-me", tmp_path / "data")
    assert list(builder.info.splits) == ["validation"]
    assert builder.info.splits["validation"].num_examples == 4
    assert "train' split will be missing" in caplog.text
    # Shards are found in numeric order, whatever their number.
    found = builder_lib._find_shards(tfds.core.Path(tmp_path / "manual" / "click-me"), "val")
    assert [name for name, _ in found] == ["val-0", "val-2", "val-10"]


# ------------------------------------------------------------------------------------------------
# TFRecord framing: bad CRCs, bad length fields and truncated ends, record by record.
# ------------------------------------------------------------------------------------------------


def record_offsets(path: Path) -> list[int]:
    """Byte offset of each record of a well-formed TFRecord file (uint64 length, 4 + 4 bytes of CRC)."""
    raw, offsets, offset = path.read_bytes(), [], 0
    while offset < len(raw):
        offsets.append(offset)
        offset += 16 + struct.unpack("<Q", raw[offset : offset + 8])[0]
    return offsets


def flip_byte(path: Path, position: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[position] ^= 0x40
    path.write_bytes(bytes(raw))


def test_masked_crc32c_matches_what_tensorflow_writes(tmp_path):
    path = tmp_path / "shard.tfrecords"
    published_shards.write_shard(path, [b"", b"a", b"clickme" * 1000])
    raw = path.read_bytes()
    for offset in record_offsets(path):
        (length,) = struct.unpack("<Q", raw[offset : offset + 8])
        stored = struct.unpack("<II", raw[offset + 8 : offset + 12] + raw[offset + 12 + length : offset + 16 + length])
        computed = (
            tfrecord_framing.masked_crc32c(raw[offset : offset + 8]),
            tfrecord_framing.masked_crc32c(raw[offset + 12 : offset + 12 + length]),
        )
        assert computed == stored
    # The CRC-32C check value of "123456789" is 0xE3069283; masked as TFRecord does: rotate right 15, add.
    rotated = ((0xE3069283 >> 15) | (0xE3069283 << 17)) & 0xFFFFFFFF
    assert tfrecord_framing.masked_crc32c(b"123456789") == (rotated + 0xA282EAD8) & 0xFFFFFFFF


def test_skip_bad_records_skips_exactly_the_record_with_a_bad_crc(tmp_path):
    shard = tmp_path / "manual" / "train-0.tfrecords"
    published_shards.write_shard(shard, good_records(5, 1))
    published_shards.write_shard(tmp_path / "manual" / "val-0.tfrecords", good_records(2, 2))
    start = record_offsets(shard)[2]
    flip_byte(shard, start + 12 + 100)  # One byte inside the data of record 2.
    builder = build_from_manual(tmp_path / "manual", tmp_path / "data", config="skip_bad_records")
    assert builder.info.splits["train"].num_examples == 4
    skipped = builder.info.metadata["skipped_records"]["train"]
    assert skipped["count"] == 1
    assert [(s["shard"], s["record"]) for s in skipped["first"]] == [("train-0", 2)]
    assert f"data of the record at byte {start} fails its CRC" in skipped["first"][0]["reason"]
    ids = sorted(e["id"].numpy().decode() for e in builder.as_dataset(split="train"))
    assert ids == ["train-0_00000", "train-0_00001", "train-0_00003", "train-0_00004"]
    # The shards built from are identified by their sha256, as read from the manual directory.
    assert builder.info.metadata["shard_sha256"] == {
        "train-0": hashlib.sha256(shard.read_bytes()).hexdigest(),
        "val-0": hashlib.sha256((tmp_path / "manual" / "val-0.tfrecords").read_bytes()).hexdigest(),
    }
    # Without skip_bad_records the first bad record still fails the build, naming shard and record.
    with pytest.raises(builder_lib.ClickMeRecordError, match=r"train-0\.tfrecords, record 2: .*fails its CRC"):
        build_from_manual(tmp_path / "manual", tmp_path / "strict_data")


def _corrupt_length(path: Path) -> None:
    flip_byte(path, record_offsets(path)[2] + 1)  # The length field of record 2.


def _cut_inside_last_record(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _partial_header_at_end(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\x05\x00\x00")  # tf.data takes this for a clean end.


@pytest.mark.parametrize(
    "damage,good,reason",
    [
        (
            _corrupt_length,
            [0, 1],
            r"length field of the record at byte \d+ fails its CRC, so the records after it cannot be located",
        ),
        (_cut_inside_last_record, [0, 1, 2, 3], r"truncated here: the record at byte \d+ needs \d+ bytes"),
        (_partial_header_at_end, [0, 1, 2, 3, 4], r"truncated here: it ends 3 bytes into a record header"),
    ],
    ids=["bad_length_field", "cut_inside_a_record", "partial_header_at_the_end"],
)
def test_unlocatable_or_truncated_records_end_the_shard_as_one_bad_record(tmp_path, damage, good, reason):
    path = tmp_path / "train-0.tfrecords"
    records = good_records(5, 1)
    published_shards.write_shard(path, records)
    damage(path)
    read = list(builder_lib._read_records(path))
    assert [(index, record) for index, record, _ in read[:-1]] == [(i, records[i]) for i in good]
    index, record, why = read[-1]
    assert (index, record) == (len(good), None)  # One bad record, and nothing after it.
    assert why.startswith("the shard is corrupted or truncated here") and re.search(reason, why), why


# ------------------------------------------------------------------------------------------------
# A manual directory that the user named must hold shards.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["missing", "empty"])
def test_named_manual_directory_that_is_missing_or_empty_is_an_error(tmp_path, monkeypatch, state):
    manual = tmp_path / "manual"
    if state == "empty":
        manual.mkdir()
    (tmp_path / "bucket").mkdir()
    with serve(tmp_path / "bucket") as (base_url, requested):  # Any download attempt gets a 404 here.
        monkeypatch.setenv("HARMONIZATION_CLICKME_URL", base_url)
        expected = "does not exist" if state == "missing" else "is empty"
        match = rf"manual directory {manual} \(`manual_dir`\) {expected}(?s:.*)train-\*\.tfrecords and val-\*"
        with pytest.raises(FileNotFoundError, match=match):
            build_from_manual(manual, tmp_path / "data")
    assert requested == []
    assert_not_prepared(tmp_path / "data")


def test_empty_default_manual_directory_still_downloads(tmp_path):
    write_published_layout(tmp_path / "bucket", {"train-0": good_records(1, 1), "val-0": good_records(1, 2)})
    (tmp_path / "downloads" / "manual").mkdir(parents=True)  # TFDS's default manual directory, empty.
    with serve(tmp_path / "bucket") as (base_url, requested):
        builder = builder_lib.Builder(data_dir=str(tmp_path / "data"), config=mirror_config(base_url, train=(0,)))
        builder.download_and_prepare(download_dir=str(tmp_path / "downloads"))
    assert len(requested) == 2 and builder.info.splits["validation"].num_examples == 1


# ------------------------------------------------------------------------------------------------
# Uncertain published numbering: the edges are probed, the shards that exist are downloaded.
# ------------------------------------------------------------------------------------------------


NUMBERINGS = {  # name -> (train indices, validation indices) on the server
    "as_guessed": (range(0, 319), range(0, 18)),
    "published_loader": (range(0, 318), range(0, 17)),
    "from_one": (range(1, 319), range(1, 18)),
}


@pytest.mark.parametrize("numbering", sorted(NUMBERINGS))
def test_probe_finds_either_published_numbering(tmp_path, monkeypatch, numbering):
    train, validation = NUMBERINGS[numbering]
    edges = {0, 1, 16, 17, 317, 318}  # Only the edges are probed: only they need to exist here.
    for folder, indices in (("train", train), ("val", validation)):
        for index in edges & set(indices):
            (tmp_path / folder).mkdir(exist_ok=True)
            (tmp_path / folder / f"{folder}-{index}.tfrecords").write_bytes(b"x")
    probed: list[str] = []
    with serve(tmp_path, probed=probed) as (base_url, requested):
        monkeypatch.setenv("HARMONIZATION_CLICKME_URL", base_url)
        urls = builder_lib.ClickMeConfig(name="published").shard_urls()
        kept = builder_lib._probe_edges(urls, True, "instructions")
    assert list(kept["train"]) == [f"train-{i}" for i in train]
    assert list(kept["validation"]) == [f"val-{i}" for i in validation]
    assert kept["train"]["train-1"] == f"{base_url}/train/train-1.tfrecords"
    assert sorted(probed) == sorted(
        [f"/train/train-{i}.tfrecords" for i in (0, 1, 317, 318)] + [f"/val/val-{i}.tfrecords" for i in (0, 1, 16, 17)]
    )
    assert requested == []  # Nothing downloaded by the probe.


@pytest.mark.parametrize(
    "train,validation", [((0, 1, 2, 3), (0, 1, 2)), ((0, 1, 2), (0, 1)), ((1, 2, 3), (1, 2))],
    ids=["as_guessed", "last_missing", "first_missing"],
)
def test_download_fetches_exactly_the_shards_that_exist(tmp_path, caplog, train, validation):
    shards = {f"train-{i}": good_records(1, i) for i in train}
    shards |= {f"val-{i}": good_records(1, 10 + i) for i in validation}
    write_published_layout(tmp_path / "bucket", shards)
    with serve(tmp_path / "bucket") as (base_url, requested):
        config = mirror_config(base_url, train=range(4), validation=range(3))
        builder = builder_lib.Builder(data_dir=str(tmp_path / "data"), config=config)
        builder.download_and_prepare(download_dir=str(tmp_path / "downloads"))
    assert sorted(requested) == sorted(f"/click-me/{name.split('-')[0]}/{name}.tfrecords" for name in shards)
    assert builder.info.splits["train"].num_examples == len(train)
    assert builder.info.splits["validation"].num_examples == len(validation)
    # Not verified against known digests: said at download time, and each shard's sha256 recorded.
    assert "downloaded without verifying their checksums" in caplog.text
    served = {name: tmp_path / "bucket" / "click-me" / name.split("-")[0] / f"{name}.tfrecords" for name in shards}
    expected = {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in served.items()}
    reloaded = builder_lib.Builder(data_dir=str(tmp_path / "data"), config=config)
    assert builder.info.metadata["shard_sha256"] == reloaded.info.metadata["shard_sha256"] == expected


def test_missing_inner_edge_shard_is_an_error_before_any_download(tmp_path):
    shards = {"train-0": good_records(1, 1), "train-2": good_records(1, 2), "train-3": good_records(1, 3)}
    write_published_layout(tmp_path / "bucket", shards | {"val-0": good_records(1, 4)})
    with serve(tmp_path / "bucket") as (base_url, requested):
        config = mirror_config(base_url, train=range(4))
        builder = builder_lib.Builder(data_dir=str(tmp_path / "data"), config=config)
        match = r"ClickMe shard train-1 is not on the server: .*train-1\.tfrecords answered HTTP 404"
        with pytest.raises(tfds.download.DownloadError, match=match):
            builder.download_and_prepare(download_dir=str(tmp_path / "downloads"))
    assert requested == []


def test_gap_in_the_middle_names_the_missing_shard(tmp_path):
    shards = {f"train-{i}": good_records(1, i) for i in (0, 1, 2, 4, 5)}  # No train-3.
    write_published_layout(tmp_path / "bucket", shards | {"val-0": good_records(1, 9)})
    with serve(tmp_path / "bucket") as (base_url, _):
        config = mirror_config(base_url, train=range(6))
        builder = builder_lib.Builder(data_dir=str(tmp_path / "data"), config=config)
        with pytest.raises(tfds.download.DownloadError, match=r"ClickMe shard train-3 could not be downloaded"):
            builder.download_and_prepare(download_dir=str(tmp_path / "downloads"))
    assert_not_prepared(tmp_path / "data", config)


def test_readme_says_the_shards_are_not_verified():
    readme = (Path(builder_lib.__file__).parent / "README.md").read_text()
    assert "not verified" in readme and "shard_sha256" in readme


# ------------------------------------------------------------------------------------------------
# An unreachable server: our message, quickly, and the process exits.
# ------------------------------------------------------------------------------------------------


def closed_port() -> int:
    """A port on 127.0.0.1 with nothing listening: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def silent_server():
    """A server on 127.0.0.1 that accepts connections and never answers; yields (base url, accepted connections)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(sock.accept()[0])  # held open, never read, never answered
            except OSError:  # the listening socket was closed
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", accepted
    finally:
        sock.close()
        for connection in accepted:
            connection.close()


def assert_offline_message(message: str) -> None:
    needles = ("Cannot reach the ClickMe shard server", "manual_dir", "HARMONIZATION_CLICKME_URL", "train-*.tfrecords")
    for needle in (*needles, "val-*.tfrecords"):
        assert needle in message, (needle, message)


def test_server_that_never_answers_fails_after_the_probe_timeout(tmp_path, monkeypatch):
    from harmonization import network

    monkeypatch.setenv("HARMONIZATION_NETWORK_TIMEOUT", "1")
    monkeypatch.setattr(network, "_RETRY_WAIT", 0.0)
    outcome: dict = {}

    def build(base_url):
        builder = builder_lib.Builder(data_dir=str(tmp_path / "data"), config=mirror_config(base_url))
        try:
            builder.download_and_prepare(download_dir=str(tmp_path / "downloads"))
        except BaseException as error:  # noqa: BLE001 (handed to the test thread)
            outcome["error"] = error

    with silent_server() as (base_url, accepted):
        thread = threading.Thread(target=build, args=(base_url,), daemon=True)
        thread.start()
        thread.join(timeout=300)  # only keeps a broken build from hanging the suite; the bounds are asserted below
        assert not thread.is_alive(), "the build still waits for a server that never answers"
        connections = len(accepted)
    error = outcome.get("error")
    assert isinstance(error, builder_lib.ClickMeDownloadError) and isinstance(error, ConnectionError), repr(error)
    assert_offline_message(str(error))
    # What bounds the wait: the first probe, tried 2 times, each ended by the 1 s read timeout; nothing else asked.
    assert "timed out" in str(error) and "failed 2 time(s), with a 1 s timeout" in str(error)
    assert connections == network.attempts() == 2
    assert not (tmp_path / "downloads").exists() or not any((tmp_path / "downloads").rglob("*.tfrecords*"))


_OFFLINE_LOAD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {repo!r})
    import tensorflow_datasets as tfds
    import tfds_clickme

    tfds.load("clickme", split="validation", data_dir={data!r})
    """
)


def test_unreachable_server_fails_after_two_refused_probes_and_the_process_exits(tmp_path):
    script = _OFFLINE_LOAD.format(repo=str(REPO_ROOT), data=str(tmp_path / "data"))
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "NO_PROXY": "127.0.0.1,localhost",
        "HARMONIZATION_CLICKME_URL": f"http://127.0.0.1:{closed_port()}",
    }
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "ClickMeDownloadError" in result.stderr and "Connection" in result.stderr
    assert_offline_message(result.stderr)
    # What bounds the wait: the first probe, refused twice (no backoff of urllib3's own), then the error.
    assert "failed 2 time(s), with a 20 s timeout (ConnectionError:" in result.stderr
    assert result.stderr.count("Retrying") == 0
