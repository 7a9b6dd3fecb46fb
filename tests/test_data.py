"""Tests for `harmonization.data`: the published heatmap processing against scipy/numpy, the batched
pipeline against the published per-example one, paired augmentation, determinism, mixing, errors.

Everything runs offline on tiny generated shards in the published format.
"""

from __future__ import annotations

import io
import re
import struct
import tarfile

import numpy as np
import pytest
import scipy.signal
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

import tfds_clickme  # noqa: F401  (registers "clickme")
from harmonization import data
from tfds_clickme.clickme import published_shards
from clickme_helpers import build_clickme, write_shards

SHARDS = {"train-0": 7, "train-1": 6, "val-0": 5}


# ------------------------------------------------------------------------------------------------
# Fixtures: tiny published-format shards, and the TFDS dataset built from them.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("clickme_shards"), SHARDS)


@pytest.fixture(scope="module")
def clickme_dir(tmp_path_factory, shard_dir):
    return build_clickme(tmp_path_factory.mktemp("clickme_tfds"), shard_dir)


def published_example(image, heatmap, image_size=224):
    """The published per-example processing (decode already done), written with plain TF ops."""
    kernel = tf.constant(data.gaussian_kernel()[:, :, None, None], tf.float32)
    image = tf.image.resize(tf.cast(image, tf.float32), (image_size, image_size), method="bilinear")
    heatmap = tf.image.resize(tf.cast(heatmap, tf.float32), (64, 64), method="bilinear")
    heatmap = tf.nn.conv2d(heatmap[None], kernel, [1, 1, 1, 1], "SAME")[0]
    heatmap = tf.image.resize(heatmap, (image_size, image_size), method="bilinear")
    return image.numpy(), heatmap.numpy()


# ------------------------------------------------------------------------------------------------
# Independent references: scipy windows and correlation, numpy bilinear resampling (float64).
# ------------------------------------------------------------------------------------------------


def reference_kernel(size: int, sigma: float) -> np.ndarray:
    """The published kernel from scipy's Gaussian window.

    Published grid: column offsets -(size-1)//2 .. (size-1)//2 (floor division), row offsets
    reversed. For an even size that is -5..4 for columns and 4..-5 (i.e. -4..5) for rows.
    """
    if size % 2:
        window = scipy.signal.windows.gaussian(size, sigma)
        rows = cols = window
    else:
        window = scipy.signal.windows.gaussian(size + 1, sigma)  # offsets -size/2 .. size/2
        rows, cols = window[1:], window[:-1]
    kernel = np.outer(rows, cols)
    return kernel / kernel.sum()


def reference_blur(maps: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Zero-padded SAME correlation (TensorFlow puts the odd padding pixel after)."""
    size = kernel.shape[0]
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    return np.stack(
        [
            scipy.signal.correlate2d(np.pad(m, ((before, after), (before, after))), kernel, mode="valid")
            for m in maps
        ]
    )


def reference_sample_1d(length_in: int, positions: np.ndarray) -> np.ndarray:
    """(len(positions), length_in) bilinear weights at continuous pixel coordinates, edges clamped."""
    weights = np.zeros((len(positions), length_in))
    for i, p in enumerate(positions):
        p = min(max(p, 0.0), length_in - 1.0)
        low = int(np.floor(p))
        high = min(low + 1, length_in - 1)
        weights[i, low] += 1.0 - (p - low)
        weights[i, high] += p - low
    return weights


def reference_resize(maps: np.ndarray, out: int) -> np.ndarray:
    """Half-pixel bilinear resize of (N, H, W) maps, as tf.image.resize (no antialiasing)."""
    n, h, w = maps.shape
    rows = reference_sample_1d(h, (np.arange(out) + 0.5) * h / out - 0.5)
    cols = reference_sample_1d(w, (np.arange(out) + 0.5) * w / out - 0.5)
    return np.einsum("ij,njk,lk->nil", rows, maps, cols)


# ------------------------------------------------------------------------------------------------
# The published heatmap processing.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,sigma", [(10, 10.0), (10, 2.0), (5, 1.5), (4, 3.0)])
def test_gaussian_kernel_matches_scipy_window(size, sigma):
    kernel = data.gaussian_kernel(size, sigma)
    assert kernel.shape == (size, size)
    assert kernel.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(kernel, reference_kernel(size, sigma), rtol=1e-12)


def test_published_kernel_is_off_centre_as_published():
    kernel = data.gaussian_kernel()  # size 10, sigma 10
    # Peak at row 4 (row offset 0) and column 5 (column offset 0).
    assert np.unravel_index(np.argmax(kernel), kernel.shape) == (4, 5)
    expected = np.exp(-((np.arange(10)[:, None] - 4) ** 2 + (np.arange(10)[None, :] - 5) ** 2) / 200.0)
    np.testing.assert_allclose(kernel, expected / expected.sum(), rtol=1e-12)


@pytest.mark.parametrize("size,sigma", [(10, 10.0), (5, 1.0)])
def test_blur_matches_scipy_correlation(size, sigma):
    rng = np.random.default_rng(0)
    maps = rng.uniform(0, 255, size=(3, 64, 48))
    blurred = data.blur_heatmaps(maps[..., None].astype(np.float32), size, sigma).numpy()[..., 0]
    expected = reference_blur(maps, reference_kernel(size, sigma))
    np.testing.assert_allclose(blurred, expected, rtol=1e-5, atol=1e-3)
    # One map without the batch axis.
    single = data.blur_heatmaps(maps[0, ..., None].astype(np.float32), size, sigma).numpy()[..., 0]
    np.testing.assert_allclose(single, expected[0], rtol=1e-5, atol=1e-3)


def test_preprocess_heatmaps_matches_numpy_reference():
    rng = np.random.default_rng(1)
    maps = rng.uniform(0, 255, size=(2, 256, 256))
    out = data.preprocess_heatmaps(maps[..., None], image_size=224).numpy()[..., 0]
    expected = reference_resize(reference_blur(reference_resize(maps, 64), reference_kernel(10, 10.0)), 224)
    assert out.shape == (2, 224, 224)
    np.testing.assert_allclose(out, expected, atol=2e-3)


def test_batched_heatmap_transform_matches_published_ops_and_reference():
    rng = np.random.default_rng(2)
    maps = rng.uniform(0, 255, size=(4, 64, 64)).astype(np.float32)
    whole = np.tile([[0.0, 1.0, 0.0, 1.0]], (4, 1)).astype(np.float32)
    no_flip = np.zeros(4, np.float32)
    # Whole field of view: exactly the published blur then tf.image.resize.
    out = data._transform_heatmaps(tf.constant(maps), whole, no_flip, 224, blur=True).numpy()
    published = tf.image.resize(data.blur_heatmaps(maps[..., None]), (224, 224)).numpy()
    np.testing.assert_allclose(out, published, atol=2e-3)

    # Crops and flips: bilinear sampling of the blurred map at the output pixel centres.
    crops = np.array([[0.1, 0.5, 0.2, 0.6], [0.0, 1.0, 0.5, 0.5], [0.3, 0.2, 0.0, 0.9], [0.25, 0.7, 0.05, 0.3]])
    flips = np.array([0.0, 1.0, 1.0, 0.0], np.float32)
    out = data._transform_heatmaps(tf.constant(maps), crops.astype(np.float32), flips, 40, blur=True).numpy()
    blurred = reference_blur(maps.astype(np.float64), reference_kernel(10, 10.0))
    centres = (np.arange(40) + 0.5) / 40
    for b in range(4):
        top, height, left, width = crops[b]
        rows = reference_sample_1d(64, (top + centres * height) * 64 - 0.5)
        cols = reference_sample_1d(64, (left + centres * width) * 64 - 0.5)
        expected = rows @ blurred[b] @ cols.T
        if flips[b]:
            expected = expected[:, ::-1]
        np.testing.assert_allclose(out[b, ..., 0], expected, atol=2e-3, err_msg=f"example {b}")


# ------------------------------------------------------------------------------------------------
# The pipelines.
# ------------------------------------------------------------------------------------------------


def test_evaluation_pipeline_equals_published_processing(clickme_dir):
    batches = list(data.load_clickme("validation", 2, data_dir=clickme_dir, download=False))
    assert [b["image"].shape[0] for b in batches] == [2, 2, 1]  # The last partial batch is kept.
    reference = tfds.load("clickme", split="validation", data_dir=str(clickme_dir), download=False)
    images = np.concatenate([b["image"].numpy() for b in batches])
    heatmaps = np.concatenate([b["heatmap"].numpy() for b in batches])
    labels = np.concatenate([b["label"].numpy() for b in batches])
    for i, example in enumerate(reference):
        image, heatmap = published_example(example["image"], example["heatmap"])
        np.testing.assert_allclose(images[i], image, atol=1e-3)
        np.testing.assert_allclose(heatmaps[i], heatmap, atol=2e-3)
        assert labels[i] == int(example["label"])
    assert i == SHARDS["val-0"] - 1


def test_from_tfrecords_evaluation_equals_published_processing(shard_dir):
    batch = next(iter(data.from_tfrecords(shard_dir / "val-0.tfrecords", 8)))
    raw = tf.data.TFRecordDataset(str(shard_dir / "val-0.tfrecords"))
    for i, record in enumerate(raw):
        example = tf.io.parse_single_example(record, data.PUBLISHED_FEATURES)
        image, heatmap = published_example(
            tf.io.decode_jpeg(example["image"]), tf.io.decode_jpeg(example["heatmap"])
        )
        np.testing.assert_allclose(batch["image"][i], image, atol=1e-3)
        np.testing.assert_allclose(batch["heatmap"][i], heatmap, atol=2e-3)
        assert batch["label"][i] == int(example["label"])


def test_training_batches_have_the_fit_format_and_keep_every_example(clickme_dir):
    dataset = data.load_clickme("train", 4, 96, training=True, data_dir=clickme_dir, seed=0, drop_remainder=False)
    spec = dataset.element_spec
    assert spec["image"].dtype == tf.float32 and spec["heatmap"].dtype == tf.float32
    assert spec["label"].dtype == tf.int32 and spec["token"].dtype == tf.float32
    labels = []
    for batch in dataset:
        n = batch["image"].shape[0]
        assert batch["image"].shape == (n, 96, 96, 3) and batch["heatmap"].shape == (n, 96, 96, 1)
        assert float(tf.reduce_min(batch["image"])) >= 0 and float(tf.reduce_max(batch["image"])) <= 255
        assert float(tf.reduce_min(batch["heatmap"])) >= 0
        np.testing.assert_array_equal(batch["token"], np.ones(n))
        labels.extend(batch["label"].numpy().tolist())
    expected = [int(e["label"]) for e in tfds.load("clickme", split="train", data_dir=str(clickme_dir))]
    assert sorted(labels) == sorted(expected)  # One epoch: every example once.
    # Training batches are static-shaped by default (drop_remainder=True).
    default = data.load_clickme("train", 4, 96, training=True, data_dir=clickme_dir, seed=0)
    assert default.element_spec["image"].shape == (4, 96, 96, 3)
    assert sum(1 for _ in default) == (SHARDS["train-0"] + SHARDS["train-1"]) // 4


def _epochs(dataset, count):
    return [[b["image"].numpy() for b in dataset] for _ in range(count)]


def test_training_is_reproducible_with_a_seed_and_differs_per_epoch(clickme_dir):
    def make(seed):
        return data.load_clickme("train", 4, 48, training=True, data_dir=clickme_dir, seed=seed)

    first, again, other = _epochs(make(3), 2), _epochs(make(3), 2), _epochs(make(4), 1)
    for epoch_a, epoch_b in zip(first, again):
        for a, b in zip(epoch_a, epoch_b):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0][0], first[1][0])  # New shuffle and crops every epoch.
    assert not np.array_equal(first[0][0], other[0][0])


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_augmentation_moves_image_and_heatmap_together(tmp_path):
    # Lossless 64x64 records whose map is the image's first channel: after the same crop, flip and
    # resize, and without blur, the output map must equal the output image's first channel.
    rng = np.random.default_rng(5)
    y, x = np.mgrid[0:64, 0:64] / 64.0
    records = []
    for _ in range(12):
        a, b, c = rng.uniform(0.5, 3.0, size=3)
        pattern = 127.5 + 127.5 * np.sin(a * x**2 + b * y + c * x * y)  # Asymmetric: flips matter.
        pattern = np.clip(pattern, 0, 255).astype(np.uint8)
        image = np.stack([pattern, 255 - pattern, np.full_like(pattern, 7)], axis=-1)
        records.append(published_shards.serialize_record(_png(image), _png(pattern), int(rng.integers(10))))
    published_shards.write_shard(tmp_path / "train-0.tfrecords", records)

    dataset = data.from_tfrecords(tmp_path / "train-0.tfrecords", 12, 56, training=True, seed=1, blur=False)
    batch = next(iter(dataset))
    image, heatmap = batch["image"][..., 0].numpy(), batch["heatmap"][..., 0].numpy()
    # The first and last two rows/columns may sample just outside the crop window; the image
    # decoder clamps there, the map does not. Training images are rounded to 8 bits (<= 0.5).
    inner = (slice(None), slice(2, -2), slice(2, -2))
    np.testing.assert_allclose(heatmap[inner], image[inner], atol=0.51)
    # The crops really differ from the whole image, so the check above is not vacuous.
    whole = next(iter(data.from_tfrecords(tmp_path / "train-0.tfrecords", 12, 56, blur=False)))
    assert np.abs(whole["image"].numpy() - batch["image"].numpy()).max() > 50


def test_random_crops_and_flips_follow_their_distributions():
    preprocessor = data._Preprocessor(32, training=True, with_heatmaps=True, crop_scale=(0.25, 0.5))
    jpeg = tf.constant(published_shards.encode_jpeg(np.zeros((64, 96, 3), np.uint8)))
    heatmap = tf.constant(published_shards.encode_jpeg(np.zeros((64, 96, 1), np.uint8)))
    flips, areas, ratios = [], [], []
    for seed in range(200):
        out = preprocessor.example({"image": jpeg, "heatmap": heatmap, "label": 0}, tf.constant(seed, tf.int64))
        top, height, left, width = out["crop"].numpy()
        assert 0 <= top and top + height <= 1 + 1e-6 and 0 <= left and left + width <= 1 + 1e-6
        flips.append(float(out["flip"]))
        areas.append(height * width)
        ratios.append(width * 96 / (height * 64))
    assert 0.35 < np.mean(flips) < 0.65
    assert min(areas) >= 0.25 - 0.02 and max(areas) <= 0.5 + 0.02
    assert min(ratios) >= 0.75 - 0.05 and max(ratios) <= 4 / 3 + 0.05


def test_load_clickme_reads_another_builder_with_clickme_features(tmp_path):
    # A 64x64, 10-class dataset with PNG images, like `clickme_synthetic`: nothing is hard-coded.
    class HarmonizationTestPngMaps(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        pkg_dir_path = epath.Path(tmp_path)  # No README/CITATIONS: a test module is no package.

        def _info(self):
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(64, 64, 3)),
                        "heatmap": tfds.features.Image(shape=(64, 64, 1)),
                        "label": tfds.features.ClassLabel(num_classes=10),
                        "id": tfds.features.Text(),
                    }
                )
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(6), "test": self._generate_examples(3)}

        def _generate_examples(self, count):
            rng = np.random.default_rng(count)
            for i in range(count):
                image, heatmap = published_shards.synthetic_picture(rng, size=64)
                yield f"{count}_{i}", {"image": image, "heatmap": heatmap, "label": i % 10, "id": str(i)}

    builder = HarmonizationTestPngMaps(data_dir=str(tmp_path))
    builder.download_and_prepare()
    batch = next(iter(data.load_clickme("test", 3, 64, data_dir=tmp_path, name=builder.name)))
    assert batch["image"].shape == (3, 64, 64, 3) and batch["heatmap"].shape == (3, 64, 64, 1)
    reference = tfds.load(builder.name, split="test", data_dir=str(tmp_path))
    for i, example in enumerate(reference):
        image, heatmap = published_example(example["image"], example["heatmap"], image_size=64)
        np.testing.assert_allclose(batch["image"][i], image, atol=1e-3)
        np.testing.assert_allclose(batch["heatmap"][i], heatmap, atol=2e-3)
    train = next(iter(data.load_clickme("train", 6, 32, training=True, data_dir=tmp_path, name=builder.name)))
    assert train["image"].shape == (6, 32, 32, 3)


# ------------------------------------------------------------------------------------------------
# Errors.
# ------------------------------------------------------------------------------------------------


def test_wrong_split_names_the_available_ones(clickme_dir):
    with pytest.raises(ValueError, match=r"'val'.*\['train', 'validation'\].*'validation'"):
        data.load_clickme("val", 2, data_dir=clickme_dir)
    with pytest.raises(ValueError, match="'test'"):
        data.load_clickme("test", 2, data_dir=clickme_dir)
    # TFDS slicing syntax is accepted.
    assert next(iter(data.load_clickme("train[:4]", 4, 32, data_dir=clickme_dir)))["image"].shape[0] == 4


def test_a_slice_that_selects_nothing_says_where_it_starts_and_ends(clickme_dir):
    with pytest.raises(ValueError, match=r"selects no examples: its 'train' slice starts at example \d+ and ends at "
                                         r"\d+ \(of \d+\)"):
        data.load_clickme("train[50%:10%]", 2, data_dir=clickme_dir)
    with pytest.raises(ValueError, match=r"`split` 'train\[:100000\]' of dataset 'clickme'.*incompatible"):
        data.load_clickme("train[:100000]", 2, data_dir=clickme_dir)


@pytest.mark.parametrize("state", ["missing", "empty"])
def test_a_named_manual_directory_that_is_missing_or_empty_is_an_error_not_a_download(tmp_path, monkeypatch, state):
    import socket

    manual = tmp_path / "manual"
    if state == "empty":
        manual.mkdir()
    with socket.socket() as probe:  # a port nobody listens on: a download attempt would fail differently
        probe.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HARMONIZATION_CLICKME_URL", f"http://127.0.0.1:{probe.getsockname()[1]}")
    expected = "does not exist" if state == "missing" else "is empty"
    with pytest.raises(FileNotFoundError, match=rf"{manual} \(`manual_dir`\) {expected}(?s:.*)train-\*\.tfrecords"):
        data.load_clickme("validation", 8, data_dir=tmp_path / "data", manual_dir=manual)


def test_wrong_split_is_caught_before_any_download(tmp_path):
    with pytest.raises(ValueError, match="Unknown split 'trian'"):
        data.load_clickme("trian", 2, data_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # Nothing was downloaded.


@pytest.mark.parametrize("image_size", [0, -3, 2.5, True])
def test_bad_image_size(clickme_dir, image_size):
    with pytest.raises(ValueError, match="`image_size` must be a positive integer"):
        data.load_clickme("train", 2, image_size=image_size, data_dir=clickme_dir)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"batch_size": 0}, "`batch_size`"),
        ({"crop_scale": (0.5, 0.2)}, "`crop_scale`"),
        ({"crop_scale": (0.0, 1.0)}, "`crop_scale`"),
        ({"crop_ratio": 3}, "`crop_ratio`"),
        ({"shuffle_buffer": 0}, "`shuffle_buffer`"),
    ],
)
def test_bad_arguments_are_named(clickme_dir, kwargs, match):
    arguments = {"split": "train", "batch_size": 2, "data_dir": clickme_dir, **kwargs}
    with pytest.raises(ValueError, match=match):
        data.load_clickme(**arguments)


def test_missing_data_dir_content(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_clickme("train", 2, data_dir=tmp_path / "nowhere", download=False)
    with pytest.raises(FileNotFoundError, match="not prepared"):
        data.load_clickme("train", 2, data_dir=tmp_path, download=False)


def test_from_tfrecords_without_matching_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-"):
        data.from_tfrecords(str(tmp_path / "train-*.tfrecords"), 2)
    with pytest.raises(ValueError, match="empty"):
        data.from_tfrecords([], 2)


def _record_start(path, index: int) -> int:
    """Byte offset of record `index` of a TFRecord file (uint64 length + 4 bytes CRC, data, 4 bytes CRC)."""
    raw, offset = path.read_bytes(), 0
    for _ in range(index):
        offset += 16 + struct.unpack("<Q", raw[offset : offset + 8])[0]
    return offset


def _flip_data_byte(path):
    raw = bytearray(path.read_bytes())
    raw[_record_start(path, 2) + 12 + 50] ^= 0x40  # Inside the data of record 2: its CRC fails.
    path.write_bytes(bytes(raw))


def _cut_inside_record_2(path):
    path.write_bytes(path.read_bytes()[: _record_start(path, 2) + 30])


def _partial_header_at_end(path):
    path.write_bytes(path.read_bytes()[: _record_start(path, 3)] + b"\x07\x00")  # tf.data ends there silently.


@pytest.mark.parametrize("damage", [_flip_data_byte, _cut_inside_record_2, _partial_header_at_end])
@pytest.mark.parametrize("training", [False, True])
def test_from_tfrecords_errors_name_the_broken_shard(tmp_path, damage, training):
    write_shards(tmp_path, {"train-0": 3, "train-1": 4, "train-2": 2}, quality=50)
    broken = tmp_path / "train-1.tfrecords"
    damage(broken)
    record = 3 if damage is _partial_header_at_end else 2
    where = rf"record {record} \(at byte {_record_start(broken, record)} of {broken.stat().st_size}\)"
    match = rf"ClickMe shard {re.escape(str(broken))} is corrupted or truncated: {where}"
    dataset = data.from_tfrecords(str(tmp_path / "train-*.tfrecords"), 2, 16, training=training, seed=0)
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
        for _ in dataset:
            pass


def test_from_tfrecords_reads_every_record_of_sound_shards(shard_dir):
    # The end-of-shard check passes on sound shards, in both orders.
    for training in (False, True):
        dataset = data.from_tfrecords(str(shard_dir / "*.tfrecords"), 4, 16, training=training, drop_remainder=False)
        assert sum(int(batch["label"].shape[0]) for batch in dataset) == sum(SHARDS.values())


@pytest.mark.parametrize("label", [-1, 1000])
def test_from_tfrecords_rejects_labels_outside_the_imagenet_classes(tmp_path, label):
    records = list(published_shards.synthetic_records(3, seed=0, size=32))
    example = tf.train.Example.FromString(records[1])
    example.features.feature["label"].int64_list.value[:] = [label]
    records[1] = example.SerializeToString()
    path = tmp_path / "val-0.tfrecords"
    published_shards.write_shard(path, records)
    match = rf"ClickMe `label` {label} of record 1 in {re.escape(str(path))} is outside \[0, 1000\)"
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
        list(data.from_tfrecords(path, 3, 16))
    # Records given as a dataset have no file name: the error names their position.
    records_dataset = tf.data.TFRecordDataset(str(path))
    with pytest.raises(tf.errors.InvalidArgumentError, match=rf"`label` {label} of record 1 in the `paths` dataset"):
        list(data.from_tfrecords(records_dataset, 3, 16))


def _with_feature(record: bytes, key: str, feature: tf.train.Feature) -> bytes:
    example = tf.train.Example.FromString(record)
    example.features.feature[key].CopyFrom(feature)
    return example.SerializeToString()


_FLOAT_MAP = np.linspace(0, 1, 32 * 32, dtype=np.float32)
BAD_RECORDS = {  # what a record holds instead of the published features -> what the error says of it
    "image-not-encoded": (lambda r: _with_feature(r, "image", tf.train.Feature(
        bytes_list=tf.train.BytesList(value=[b"not an image at all"]))), r"ClickMe `image` of record 1 in {where} is "
        r"not an encoded image \(JPEG, PNG, GIF, BMP or WebP; the published ones are RGB JPEGs\): its 19 bytes"),
    "heatmap-float-bytes": (lambda r: _with_feature(r, "heatmap", tf.train.Feature(
        bytes_list=tf.train.BytesList(value=[_FLOAT_MAP.tobytes()]))), r"ClickMe `heatmap` of record 1 in {where} is "
        r"not an encoded image .*single-channel JPEGs\): its 4096 bytes have no image header"),
    "heatmap-float-list": (lambda r: _with_feature(r, "heatmap", tf.train.Feature(
        float_list=tf.train.FloatList(value=_FLOAT_MAP))), r"ClickMe record 1 in {where} is not a published ClickMe "
        r"example: expected a tf.train.Example with bytes features `image` and `heatmap`"),
    "not-an-example": (lambda r: b"\xff\xff\xff\xff", r"ClickMe record 1 in {where} is not a published ClickMe example"),
}


@pytest.mark.parametrize("kind", sorted(BAD_RECORDS))
@pytest.mark.parametrize("training", [False, True])
def test_from_tfrecords_names_the_shard_and_record_that_cannot_be_decoded(tmp_path, kind, training):
    damage, message = BAD_RECORDS[kind]
    records = list(published_shards.synthetic_records(3, seed=0, size=32))
    records[1] = damage(records[1])
    path = tmp_path / "train-0.tfrecords"
    published_shards.write_shard(path, records)
    published_shards.write_shard(tmp_path / "train-1.tfrecords", published_shards.synthetic_records(2, seed=1, size=32))
    dataset = data.from_tfrecords(str(tmp_path / "train-*.tfrecords"), 2, 16, training=training, seed=0)
    with pytest.raises(tf.errors.InvalidArgumentError, match=message.format(where=re.escape(str(path)))):
        list(dataset)
    # Records given as a dataset have no file name: the error names their position.
    with pytest.raises(tf.errors.InvalidArgumentError, match=message.format(where="the `paths` dataset")):
        list(data.from_tfrecords(tf.data.TFRecordDataset(str(path)), 3, 16))


def test_from_tfrecords_reads_every_encoding_tensorflow_decodes(tmp_path):
    # The header check lets through each encoding tf.io.decode_image reads, not only the published JPEGs.
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    encodings = [tf.io.encode_png(pixels).numpy(), tf.io.encode_jpeg(pixels).numpy()]
    for format in ("GIF", "BMP", "WEBP"):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=format)
        encodings.append(buffer.getvalue())
    heatmap = tf.io.encode_png(pixels[..., :1]).numpy()
    path = tmp_path / "val-0.tfrecords"
    published_shards.write_shard(path, [published_shards.serialize_record(image, heatmap, 7) for image in encodings])
    batch = next(iter(data.from_tfrecords(path, len(encodings), 16)))
    assert batch["image"].shape == (len(encodings), 16, 16, 3) and batch["label"].numpy().tolist() == [7] * 5
    np.testing.assert_array_equal(batch["image"][0], batch["image"][3])  # PNG and BMP: lossless, the same pixels


def test_from_tfrecords_refuses_a_count_tensorflow_cannot_hold(shard_dir):
    with pytest.raises(ValueError, match=rf"`batch_size` must be a positive integer no larger than {2**63 - 1}; "
                                         rf"got {10**20}"):
        data.from_tfrecords(str(shard_dir / "*.tfrecords"), 10**20)


def test_load_clickme_rejects_a_dataset_without_maps(tmp_path):
    class HarmonizationTestNoMaps(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        pkg_dir_path = epath.Path(tmp_path)

        def _info(self):
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(8, 8, 3)),
                        "label": tfds.features.ClassLabel(num_classes=2),
                    }
                )
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            yield 0, {"image": np.zeros((8, 8, 3), np.uint8), "label": 0}

    HarmonizationTestNoMaps(data_dir=str(tmp_path)).download_and_prepare()
    with pytest.raises(ValueError, match=r"lacks the ClickMe features \['heatmap'\]"):
        data.load_clickme("train", 1, data_dir=tmp_path, name="harmonization_test_no_maps")


# ------------------------------------------------------------------------------------------------
# Mixing with ImageNet (TFDS imagenet2012, built from archives in the published layout).
# ------------------------------------------------------------------------------------------------


def _jpeg_file(colour, size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _add_to_tar(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    archive.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def imagenet_dirs(tmp_path_factory):
    """A tiny imagenet2012 manual directory: the train tar of per-class tars, the flat val tar."""
    manual = tmp_path_factory.mktemp("imagenet_manual")
    with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as train:
        for wnid, colour in (("n01440764", (200, 30, 30)), ("n01443537", (30, 200, 30))):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as class_tar:
                for i in range(3):
                    _add_to_tar(class_tar, f"{wnid}_{i}.JPEG", _jpeg_file(colour))
            _add_to_tar(train, f"{wnid}.tar", inner.getvalue())
    with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as val:
        for i in range(1, 4):
            _add_to_tar(val, f"ILSVRC2012_val_{i:08d}.JPEG", _jpeg_file((30, 30, 200), size=(50, 36)))
    return manual, tmp_path_factory.mktemp("imagenet_tfds")


def test_load_imagenet_gives_token_zero_and_empty_maps(imagenet_dirs):
    manual, data_dir = imagenet_dirs
    validation = next(iter(data.load_imagenet("validation", 3, 32, data_dir=data_dir, manual_dir=manual)))
    assert validation["image"].shape == (3, 32, 32, 3) and validation["heatmap"].shape == (3, 32, 32, 1)
    np.testing.assert_array_equal(validation["token"], np.zeros(3))
    np.testing.assert_array_equal(validation["heatmap"], np.zeros((3, 32, 32, 1)))
    names = tfds.builder("imagenet2012", data_dir=str(data_dir)).info.features["label"].names
    labels_file = tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt").read_text().split()
    # TFDS stores examples in key-hash order; the labels are those of the first three val images.
    assert sorted(names[i] for i in validation["label"].numpy()) == sorted(labels_file[:3])
    np.testing.assert_allclose(validation["image"].numpy().mean(axis=(0, 1, 2)), (30, 30, 200), atol=4)
    train = next(iter(data.load_imagenet("train", 6, 32, training=True, data_dir=data_dir, manual_dir=manual)))
    assert sorted(train["label"].numpy().tolist()) == [0, 0, 0, 1, 1, 1]


def test_mix_datasets_fraction_tokens_and_maps(clickme_dir, imagenet_dirs):
    manual, imagenet_dir = imagenet_dirs
    clickme = data.load_clickme("train", 4, 32, training=True, data_dir=clickme_dir, seed=0).repeat()
    imagenet = data.load_imagenet(
        "train", 3, 32, training=True, data_dir=imagenet_dir, manual_dir=manual, seed=0
    ).repeat()
    mixed = data.mix_datasets(clickme, imagenet, clickme_fraction=0.2, seed=0)
    assert mixed.element_spec["image"].shape == (4, 32, 32, 3)  # clickme's batch size.
    tokens, map_peaks = [], []
    for batch in mixed.take(100):
        token = batch["token"].numpy()
        map_peaks.extend(batch["heatmap"].numpy().reshape(4, -1).max(axis=1).tolist())
        assert batch["label"].dtype == tf.int32
        tokens.extend(token.tolist())
    tokens, map_peaks = np.array(tokens), np.array(map_peaks)
    assert set(tokens.tolist()) <= {0.0, 1.0}
    assert np.all(map_peaks[tokens == 0] == 0)  # ImageNet examples: zero maps.
    assert np.mean(map_peaks[tokens == 1] > 0) > 0.8  # ClickMe examples keep theirs (a crop may miss the blobs).
    assert 0.14 < tokens.mean() < 0.26  # 400 draws at p=0.2: ~4.0 standard deviations.
    # Unbatched inputs, explicit batch size.
    single = data.mix_datasets(clickme.unbatch(), imagenet.unbatch(), 0.5, batch_size=5, seed=1)
    assert next(iter(single))["image"].shape == (5, 32, 32, 3)


def test_mix_datasets_errors(clickme_dir):
    clickme = data.load_clickme("train", 4, 32, data_dir=clickme_dir, drop_remainder=True)
    other_size = tf.data.Dataset.from_tensors({"image": tf.zeros((8, 8, 3)), "label": 0})
    with pytest.raises(ValueError, match="clickme_fraction"):
        data.mix_datasets(clickme, other_size, clickme_fraction=1.5)
    with pytest.raises(ValueError, match="same size"):
        data.mix_datasets(clickme, other_size)
    with pytest.raises(ValueError, match=r"\['image', 'heatmap', 'label'\]"):
        data.mix_datasets(other_size, other_size)
    with pytest.raises(TypeError, match="tf.data.Dataset"):
        data.mix_datasets(clickme, [1, 2, 3])


def test_batches_train_a_harmonized_model(clickme_dir):
    import keras

    from harmonization import HarmonizedModel

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(keras.layers.Rescaling(1 / 255.0)(inputs))
    outputs = keras.layers.Dense(1000)(keras.layers.GlobalAveragePooling2D()(x))
    model = HarmonizedModel(keras.Model(inputs, outputs), pyramid_levels=2)
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    batches = data.load_clickme("train", 4, 32, training=True, data_dir=clickme_dir, seed=0)
    history = model.fit(batches, epochs=1, verbose=0, shuffle=False)
    assert np.isfinite(history.history["loss"][0]) and history.history["harmonization"][0] > 0
