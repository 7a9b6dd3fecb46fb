"""The published 0.0.9 API (harmonization.models/.evaluation/.training/.common) against the published formulas.

Each function is compared with an independent implementation, written from serre-lab/Harmonization 0.0.9's
source (ffe1c49): NumPy/SciPy for the metrics, the kernel, the blur and the pyramid, and the published
per-example tf.data parsing and nested-tape loss written out with plain TensorFlow ops (here, and shared with
other tests in tests/published_reference.py). The published test suite itself runs unchanged in
tests/test_published_suite.py.
"""

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import signal, stats

import harmonization
from harmonization import common, evaluation, training, zoo
from harmonization.models import preprocess_input
from harmonization.presets import PresetError
from harmonization.training.pyramid import pyramidal_representation

from clickme_helpers import write_shards
from hub_server import FakeHub, patch_zoo_entry, point_huggingface_hub_at
from published_reference import (MEAN, STD, published_dice, published_harmonizer_gradients, published_iou,
                                 published_kernel, published_metrics, published_parse, published_preprocess_input,
                                 published_saliency)
from test_convert import CASES, LEVIT_TINY

FIXTURES = Path(__file__).parent / "fixtures" / "keras2"


# --- float64 NumPy/SciPy references used only here (the shared ones are in tests/published_reference.py) ---------


def same_correlation(image, kernel, stride=1):
    """TensorFlow's conv2d with SAME padding (a cross-correlation), for one 2-D map, in float64."""
    size = image.shape[0]
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel.shape[0] - size, 0)
    padded = np.pad(image.astype(np.float64), [(total // 2, total - total // 2)] * 2)
    return signal.correlate2d(padded, kernel, mode="valid")[::stride, ::stride]


def binomial_pyramid(maps, levels):
    taps = np.array([1.0, 4.0, 6.0, 4.0, 1.0])
    kernel = np.outer(taps, taps) / 256.0
    pyramid = [maps.astype(np.float64)]
    for _ in range(levels):
        pyramid.append(np.stack([same_correlation(m, kernel, stride=2) for m in pyramid[-1]]))
    return pyramid


# --- harmonization.models ----------------------------------------------------------------------------------------


def test_preprocess_input_is_the_published_formula_and_the_zoo_models_own():
    images = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3))
    expected = published_preprocess_input(images)
    ours = preprocess_input(images)
    assert isinstance(ours, np.ndarray) and ours.dtype == np.float64
    np.testing.assert_allclose(ours, expected, rtol=1e-12)
    as_tensor = preprocess_input(tf.constant(images, tf.float32))
    assert isinstance(as_tensor, tf.Tensor) and as_tensor.dtype == tf.float32
    np.testing.assert_allclose(as_tensor.numpy(), expected, rtol=1e-5, atol=1e-5)
    uint8 = preprocess_input(tf.constant(images.astype(np.uint8)))  # 0.0.9 raised a dtype error here
    np.testing.assert_allclose(uint8.numpy(), published_preprocess_input(images.astype(np.uint8)), atol=1e-5)
    # The same normalisation the zoo models apply inside (their `preprocessing` layer).
    layer = harmonization.architectures.ImageNetNormalization()
    np.testing.assert_allclose(np.asarray(layer(images.astype("float32"))), expected, atol=1e-5)
    for name in zoo.list_models():
        preprocessing = zoo.model_info(name)["preprocessing"]
        assert preprocessing["mean"] == list(MEAN) and preprocessing["std"] == list(STD)


def test_loader_urls_are_the_zoo_entries_and_the_published_module_paths_exist():
    from harmonization.models import convnext, efficientnetb0, levit, maxvit, resnet50, vgg16, vit

    pairs = [(resnet50.HARMONIZED_RESNET50_WEIGHTS, "resnet50v2_harmonized"),
             (efficientnetb0.HARMONIZED_EFFICIENTNETB0_WEIGHTS, "efficientnet_b0_harmonized"),
             (vgg16.HARMONIZED_VGG16_WEIGHTS, "vgg16_harmonized"),
             (vit.HARMONIZED_VITB16_WEIGHTS, "vit_b16_harmonized"),
             (convnext.HARMONIZED_TINY_CONVNEXT_WEIGHTS, "convnext_tiny_harmonized"),
             (maxvit.HARMONIZED_TINY_MAXVIT_WEIGHTS, "maxvit_tiny_harmonized"),
             (levit.HARMONIZED_LEVIT_SMALL_WEIGHTS, "levit128_harmonized")]
    for url, name in pairs:
        assert url == zoo.model_info(name)["source"]["url"]
    assert [callable(m) for m in (resnet50.load_ResNet50, vit.load_ViT_B16, levit.load_LeViT_small)] == [True] * 3


@pytest.fixture
def models_mirror(monkeypatch, tmp_path):
    """huggingface_hub at a local stand-in (no Hub repo exists), HARMONIZATION_MODELS_URL at a mirror on it."""
    with FakeHub() as fake:
        point_huggingface_hub_at(fake, monkeypatch, tmp_path)
        monkeypatch.setenv("HARMONIZATION_MODELS_URL", fake.endpoint + "/mirror/models/")
        yield fake


def _serve_fixture(fake, monkeypatch, zoo_name, fixture, config):
    """Serve `fixture` under its published file name on the mirror; shrink the zoo entry to its tiny config."""
    registry = patch_zoo_entry(monkeypatch, zoo_name, config=config)
    filename = registry[zoo_name]["source"]["url"].rsplit("/", 1)[-1]
    fake.add_static(f"/mirror/models/{filename}", (FIXTURES / f"{fixture}.h5").read_bytes())
    data = np.load(FIXTURES / f"{fixture}.npz")
    return f"/mirror/models/{filename}", data["images"].astype("float32"), data["logits"]


def test_load_efficientnet_returns_the_bare_network_with_the_published_softmax(models_mirror, monkeypatch):
    path, images, probabilities = _serve_fixture(
        models_mirror, monkeypatch, "efficientnet_b0_harmonized", "efficientnet_b0_full_model",
        CASES["efficientnet_b0_full_model"][1])
    model = harmonization.models.load_EfficientNetB0()
    assert not any(isinstance(layer, harmonization.architectures.ImageNetNormalization)
                   for layer in model._flatten_layers())
    outputs = np.asarray(model(preprocess_input(images).astype("float32")))
    # The original file's output (probabilities), from the original library, within conversion tolerance.
    np.testing.assert_allclose(outputs, probabilities, atol=1e-4)
    np.testing.assert_allclose(outputs.sum(-1), 1.0, atol=1e-5)
    requested = [p for _, p in models_mirror.requests]
    assert requested.count(path) == 1 and not any("storage.googleapis" in p for p in requested)


def test_load_levit_returns_the_bare_network_with_logits(models_mirror, monkeypatch):
    path, images, logits = _serve_fixture(
        models_mirror, monkeypatch, "levit128_harmonized", "kecam_levit_weights", LEVIT_TINY)
    model = harmonization.models.load_LeViT_small()
    np.testing.assert_allclose(np.asarray(model(preprocess_input(images).astype("float32"))), logits, atol=1e-4)
    assert model.input_shape == (None, 96, 96, 3)


# --- harmonization.evaluation ------------------------------------------------------------------------------------


def _maps_with_ties(seed, n=6, size=20):
    rng = np.random.default_rng(seed)
    maps = rng.integers(0, 12, (n, size, size)).astype(np.float64)  # many ties, like human maps
    maps[0] = rng.normal(size=(size, size))
    return maps


def test_spearman_correlation_is_scipy_on_float32_maps():
    a, b = _maps_with_ties(0), _maps_with_ties(1)
    b[1] = a[1] + 1e-9  # equal once cast to float32, as published
    ours = evaluation.spearman_correlation(a, b)
    assert isinstance(ours, np.ndarray) and ours.dtype == np.float64 and ours.shape == (6,)
    expected = [stats.spearmanr(x.astype(np.float32).ravel(), y.astype(np.float32).ravel())[0] for x, y in zip(a, b)]
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12)
    assert ours[1] == pytest.approx(1.0)
    b[2] = 3.0  # a constant map: scipy's NaN, as published (the native spearman says 0.0)
    with np.errstate(invalid="ignore"):
        assert np.isnan(evaluation.spearman_correlation(a, b)[2])
    assert float(harmonization.metrics.spearman(a[2:3], b[2:3])[0]) == 0.0


@pytest.mark.parametrize("percentile", [10, 25.5])
def test_dice_and_iou_are_the_published_numpy_formulas(percentile):
    a, b = _maps_with_ties(2), _maps_with_ties(3)
    a[3] = 0.0  # an empty mask: 0 / 1e-9
    dice = evaluation.dice(a, b, percentile)
    iou = evaluation.intersection_over_union(a, b, percentile)
    assert dice.dtype == iou.dtype == np.float64
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    np.testing.assert_allclose(dice, [published_dice(x, y, percentile) for x, y in zip(a32, b32)], rtol=1e-12)
    np.testing.assert_allclose(iou, [published_iou(x, y, percentile) for x, y in zip(a32, b32)], rtol=1e-12)
    assert evaluation.HUMAN_SPEARMAN_CEILING == 0.65753


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two published-format shards of 21 and 19 records."""
    return write_shards(tmp_path_factory.mktemp("shards"), {"val-0": 21, "val-1": 19})


def test_load_clickme_yields_the_published_batches_in_the_published_order(shards):
    paths = [str(shards / "val-0.tfrecords"), str(shards / "val-1.tfrecords")]
    ours = list(common.load_clickme(paths, batch_size=8))
    published = tf.data.TFRecordDataset(paths, num_parallel_reads=tf.data.AUTOTUNE).map(published_parse)
    published = list(published.batch(8, drop_remainder=True))
    assert len(ours) == len(published) == 5  # 40 images, the last incomplete batch dropped as published
    for (images, maps, labels), (images_p, maps_p, labels_p) in zip(ours, published):
        assert images.shape == (8, 224, 224, 3) and maps.shape == (8, 224, 224, 1) and labels.shape == (8, 1000)
        assert images.dtype == maps.dtype == labels.dtype == tf.float32
        np.testing.assert_array_equal(labels.numpy(), labels_p.numpy())
        np.testing.assert_allclose(images.numpy(), images_p.numpy(), atol=1e-3)
        np.testing.assert_allclose(maps.numpy(), maps_p.numpy(), atol=1e-4 * float(tf.reduce_max(maps_p)))
    single = next(iter(tf.data.TFRecordDataset(paths[:1])))
    for ours_part, published_part in zip(common.clickme_dataset.parse_clickme_prototype(single),
                                         published_parse(single)):
        np.testing.assert_allclose(ours_part.numpy(), published_part.numpy(), atol=1e-3)


def test_kernel_and_blur_are_the_published_ones():
    kernel = common.gaussian_kernel()
    assert kernel.shape == (10, 10, 1, 1) and kernel.dtype == tf.float32
    np.testing.assert_allclose(kernel.numpy()[:, :, 0, 0], published_kernel(), rtol=1e-6)
    np.testing.assert_allclose(common.gaussian_kernel(5, 2).numpy()[:, :, 0, 0], published_kernel(5, 2), rtol=1e-6)
    heatmap = np.random.default_rng(4).uniform(0, 255, (64, 64, 1)).astype("float32")
    blurred = common.gaussian_blur(heatmap, kernel)
    assert blurred.shape == (64, 64, 1)
    expected = same_correlation(heatmap[..., 0], published_kernel())
    np.testing.assert_allclose(blurred.numpy()[..., 0], expected, rtol=1e-5, atol=1e-3)


def test_evaluate_clickme_is_the_published_protocol(shards):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((224, 224, 3)), keras.layers.Conv2D(2, 3), keras.layers.MaxPooling2D(8),
                              keras.layers.Flatten(), keras.layers.Dense(1000)])
    dataset = common.load_clickme([str(shards / "val-0.tfrecords")], batch_size=8)  # 16 of 21 images
    scores = evaluation.evaluate_clickme(model, clickme_val_dataset=dataset, preprocess_inputs=preprocess_input)
    assert sorted(scores) == ["alignment_score", "dice", "iou", "spearman"]
    assert all(isinstance(scores[k], list) and len(scores[k]) == 16 for k in ("spearman", "dice", "iou"))
    # Independently: xplique's Saliency is max over channels of |d sum(model(x) * labels) / dx|.
    expected = {"spearman": [], "dice": [], "iou": []}
    for images, maps, labels in dataset:
        saliency = published_saliency(model, preprocess_input(images.numpy()), labels)
        for key, values in zip(("spearman", "dice", "iou"), published_metrics(saliency, maps.numpy()[..., 0])):
            expected[key].extend(values)
    np.testing.assert_allclose(scores["spearman"], expected["spearman"], atol=1e-5)
    # A pixel at the 90th percentile may change sides with float rounding of the gradient: a few pixels in 5,000.
    np.testing.assert_allclose(scores["dice"], expected["dice"], atol=2e-3)
    np.testing.assert_allclose(scores["iou"], expected["iou"], atol=2e-3)
    assert scores["alignment_score"] == pytest.approx(np.mean(expected["spearman"]) / 0.65753, abs=1e-5)
    # A custom explainer gets the batch's tensors; (N, H, W, C) maps are averaged over channels, as published.
    seen = []

    def explainer(images, labels):
        seen.append((type(images), tuple(labels.shape)))
        return tf.tile(tf.reduce_mean(images, -1, keepdims=True), [1, 1, 1, 3])

    custom = evaluation.evaluate_clickme(model, explainer, dataset)
    assert seen[0] == (type(tf.constant(0)), (8, 1000)) and len(custom["spearman"]) == 16


def test_load_clickme_val_downloads_the_published_shards_once_into_the_keras_cache(shards, monkeypatch, tmp_path):
    with FakeHub() as fake:
        data = (shards / "val-1.tfrecords").read_bytes()  # 19 records per shard
        for index in range(18):
            fake.add_static(f"/click-me/val/val-{index}.tfrecords", data)
        monkeypatch.setenv("HARMONIZATION_CLICKME_URL", fake.endpoint + "/click-me")
        monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
        batches = list(common.load_clickme_val(batch_size=64))
        assert len(batches) == 17 * 19 // 64
        requested = [path for _, path in fake.requests]
        # The published loader's shards, 0..16 (not 17), cached under its names.
        assert sorted(requested) == sorted(f"/click-me/val/val-{i}.tfrecords" for i in range(17))
        cache = tmp_path / "keras" / "datasets" / "click-me"
        assert sorted(p.name for p in cache.iterdir()) == sorted(f"clickme_val_{i}" for i in range(17))
        list(common.load_clickme_val(batch_size=64))
        assert len(fake.requests) == 17  # served from the cache the second time
        # A web page kept as a shard (a mirror's error page, cached by an older version) is fetched again, and a
        # mirror that answers a web page now leaves nothing in the cache.
        (cache / "clickme_val_3").write_bytes(b"<!DOCTYPE html><html><body>Service unavailable</body></html>")
        list(common.load_clickme_val(batch_size=64))
        assert [path for _, path in fake.requests[17:]] == ["/click-me/val/val-3.tfrecords"]
        assert (cache / "clickme_val_3").read_bytes() == data
        (cache / "clickme_val_3").unlink()
        fake.add_static("/click-me/val/val-3.tfrecords", b"<html>moved</html>")
        with pytest.raises(PresetError, match=r"val-3\.tfrecords.*the server answered an HTML page, not the file"):
            list(common.load_clickme_val(batch_size=64))
        assert not (cache / "clickme_val_3").exists()


# --- harmonization.training --------------------------------------------------------------------------------------


def test_standardize_cut_is_the_published_formula():
    maps = np.random.default_rng(5).normal(size=(3, 12, 12, 2)).astype("float32")
    mean = maps.mean(axis=(1, 2), keepdims=True, dtype=np.float64)
    std = maps.std(axis=(1, 2), keepdims=True, dtype=np.float64)
    expected = np.maximum((maps - mean) / (std + 1e-5), 0)
    np.testing.assert_allclose(training.standardize_cut(maps).numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(training.standardize_cut(maps[..., 0]).numpy(), expected[..., 0], atol=1e-5)
    with pytest.raises(ValueError, match=r"`axes` must be \(1, 2\)"):
        training.standardize_cut(maps, axes=(1, 2, 3))


def test_pyramid_and_pyramidal_mse_are_the_published_ones():
    rng = np.random.default_rng(6)
    images = rng.normal(size=(2, 20, 20, 3)).astype("float32")
    levels = pyramidal_representation(images, 3)
    assert [tuple(level.shape) for level in levels] == [(2, 20, 20, 3), (2, 10, 10, 3), (2, 5, 5, 3), (2, 3, 3, 3)]
    for channel in range(3):
        expected = binomial_pyramid(images[..., channel], 3)
        for ours, theirs in zip(levels, expected):
            np.testing.assert_allclose(ours.numpy()[..., channel], theirs, rtol=1e-5, atol=1e-5)
    a, b = rng.normal(size=(4, 16, 16)), rng.normal(size=(4, 16, 16))
    tokens = np.array([1.0, 0.0, 0.5, 1.0])
    pyramid_a, pyramid_b = binomial_pyramid(a, 5), binomial_pyramid(b, 5)
    expected = np.mean([np.mean((pa - pb) ** 2 * tokens[:, None, None]) for pa, pb in zip(pyramid_a[:5], pyramid_b)])
    ours = training.pyramidal_mse_with_tokens(a.astype("float32"), b.astype("float32"), tokens.astype("float32"))
    assert ours.shape == () and float(ours) == pytest.approx(expected, rel=1e-5)


def test_harmonizer_loss_returns_the_published_gradients():
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(4, 3, activation="tanh"),
                              keras.layers.MaxPooling2D(2), keras.layers.Flatten(), keras.layers.Dense(5)])
    rng = np.random.default_rng(7)
    images = tf.constant(rng.normal(size=(4, 32, 32, 3)), tf.float32)
    tokens = tf.constant([1.0, 0.5, 0.0, 1.0])
    labels = tf.constant(rng.uniform(size=(4, 5)), tf.float32)  # soft labels, as the published test uses
    heatmaps = tf.constant(rng.uniform(size=(4, 32, 32)), tf.float32)
    ours = training.harmonizer_loss(model, images, tokens, labels, heatmaps)
    theirs = published_harmonizer_gradients(model, images, heatmaps, labels, tokens=tokens)
    assert len(ours) == len(model.trainable_variables)
    for g_ours, g_theirs in zip(ours, theirs):
        np.testing.assert_allclose(g_ours.numpy(), g_theirs.numpy(), rtol=1e-4, atol=1e-6)
    # The harmonization term matters: without it the gradients differ.
    plain = training.harmonizer_loss(model, images, tokens, labels, heatmaps, lambda_harmonization=0.0)
    assert not np.allclose(plain[0].numpy(), ours[0].numpy(), rtol=1e-3)


def _small_step():
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(3, 3), keras.layers.Flatten(),
                              keras.layers.Dense(5)])
    rng = np.random.default_rng(8)
    batch = dict(images=tf.constant(rng.normal(size=(4, 16, 16, 3)), tf.float32), tokens=tf.constant([1.0, 0.0, 1.0, 0.5]),
                 labels=tf.one_hot([0, 1, 2, 3], 5), true_heatmaps=tf.constant(rng.uniform(size=(4, 16, 16)), tf.float32))
    return model, batch


@pytest.mark.parametrize("change, message", [
    ({"tokens": tf.ones(5)}, r"`tokens` must hold one weight per example, shape \(4,\) or \(4, 1\) \(`images` holds 4\); "
                             r"got shape \(5,\)"),
    ({"tokens": tf.ones((4, 2))}, r"`tokens` must hold one weight per example.*got shape \(4, 2\)"),
    ({"lambda_weights": "x"}, r"`lambda_weights` must be a finite real number \(a scalar\); got 'x'"),
    ({"lambda_weights": True}, r"`lambda_weights` must be a finite real number \(a scalar\); got True"),
    ({"lambda_harmonization": [1.0, 2.0]}, r"`lambda_harmonization` must be a finite real number.*got \[1.0, 2.0\]"),
    ({"lambda_harmonization": float("nan")}, r"`lambda_harmonization` must be a finite real number.*got nan"),
    ({"labels": tf.one_hot([0, 1, 2], 5)}, r"`labels` must hold one row per image, shape \(4, num_classes\).*\(3, 5\)"),
    ({"true_heatmaps": tf.ones((4, 8, 8))}, r"`true_heatmaps` must hold one map of the images' size per image, shape "
                                           r"\(4, 16, 16\) or \(4, 16, 16, 1\); got shape \(4, 8, 8\)"),
    ({"cross_entropy": "categorical"}, r"`cross_entropy` must be a loss function"),
], ids=["tokens-length", "tokens-columns", "lambda-str", "lambda-bool", "lambda-list", "lambda-nan", "labels-length",
        "maps-size", "cross-entropy"])
def test_harmonizer_loss_names_a_bad_argument_in_one_sentence(change, message):
    model, batch = _small_step()
    with pytest.raises(ValueError, match=message):
        training.harmonizer_loss(model, **{**batch, **change})


def test_harmonizer_loss_accepts_the_published_inputs_in_every_form_alike():
    model, batch = _small_step()
    reference = training.harmonizer_loss(model, **batch)
    forms = [
        {"tokens": batch["tokens"][:, None]},  # (N, 1)
        {key: np.asarray(value) for key, value in batch.items()},  # NumPy arrays
        {"true_heatmaps": batch["true_heatmaps"][..., None], "lambda_weights": tf.Variable(1e-5),
         "lambda_harmonization": np.float32(1.0)},
    ]
    for change in forms:
        for ours, expected in zip(training.harmonizer_loss(model, **{**batch, **change}), reference):
            np.testing.assert_allclose(ours.numpy(), expected.numpy(), rtol=1e-6, atol=1e-8)


def test_pyramidal_mse_with_tokens_names_tokens_of_the_wrong_length():
    maps = np.random.default_rng(9).normal(size=(3, 16, 16)).astype("float32")
    with pytest.raises(ValueError, match=r"`tokens` must hold one weight per example, shape \(3,\) or \(3, 1\) "
                                         r"\(`true_heatmaps` holds 3\); got shape \(2,\)"):
        training.pyramidal_mse_with_tokens(maps, maps, np.ones(2, "float32"))


# --- mirrors --------------------------------------------------------------------------------------------------


def test_mirror_variables_replace_the_bucket_everywhere(monkeypatch):
    from harmonization import mirrors
    from tfds_clickme.clickme import clickme_dataset_builder as builder

    bucket = "https://storage.googleapis.com/serrelab/prj_harmonization"
    assert mirrors.clickme_url() == f"{bucket}/dataset/click-me"
    url = zoo.model_info("vit_b16_harmonized")["source"]["url"]
    assert mirrors.model_file_url(url) == url
    monkeypatch.setenv("HARMONIZATION_CLICKME_URL", "https://mirror.example.org/clickme/")
    monkeypatch.setenv("HARMONIZATION_MODELS_URL", "file:///srv/models")
    assert mirrors.model_file_url(url) == "file:///srv/models/vit-b16_harmonized.h5"
    urls = builder.ClickMeConfig(name="mirrored").shard_urls()
    assert urls["validation"]["val-17"] == "https://mirror.example.org/clickme/val/val-17.tfrecords"
    assert mirrors.model_file_url("https://example.org/other.h5") == "https://example.org/other.h5"
    monkeypatch.setenv("HARMONIZATION_MODELS_URL", "mirror.example.org/models")
    with pytest.raises(ValueError, match="HARMONIZATION_MODELS_URL must be a URL"):
        mirrors.models_url()
