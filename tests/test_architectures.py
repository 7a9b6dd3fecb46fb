"""Zoo architectures: tiny configs for behaviour, independent references for the computation, full size (slow)
for the published parameter counts and weight layouts."""

import csv
import inspect
from pathlib import Path

import keras
import numpy as np
import pytest
from scipy.special import erf

import harmonization.layers as hlayers
from harmonization.architectures import ConvNeXt, EfficientNet, ImageNetNormalization, ResNetV2, VGG, ViT
from harmonization.presets import load_model, save_preset
from architecture_helpers import build_tiny, perturb_weights, random_images

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])

# Tiny configurations: same code paths as the published models, a few thousand parameters.
TINY = {
    "vit": (ViT, dict(image_size=16, patch_size=8, hidden_size=8, num_layers=2, num_heads=2, mlp_dim=16, num_classes=5)),
    "resnet_v2": (ResNetV2, dict(image_size=32, stack_blocks=[1, 2, 1, 1], stack_filters=[2, 2, 4, 4], stem_filters=4, num_classes=5)),
    "vgg": (VGG, dict(image_size=32, block_convs=[1, 1, 2, 1, 1], block_filters=[2, 4, 4, 4, 4], fc_units=8, num_classes=5)),
    "efficientnet": (EfficientNet, dict(image_size=32, width_coefficient=0.1, depth_coefficient=0.4, num_classes=5)),
    "convnext": (ConvNeXt, dict(image_size=32, depths=[1, 1, 2, 1], widths=[4, 4, 8, 8], num_classes=5)),
}
# Feature width that `include_top=False` returns for each tiny config.
TINY_FEATURES = {"vit": 8, "resnet_v2": 16, "vgg": 8, "efficientnet": 128, "convnext": 8}


def _build(key, **overrides):
    return build_tiny(TINY, key, **overrides)


@pytest.mark.parametrize("key", sorted(TINY))
def test_forward_shapes_and_config_round_trip(key):
    model = perturb_weights(_build(key))
    cls, config = TINY[key]
    x = random_images(config["image_size"])
    logits = np.asarray(model(x))
    assert logits.shape == (2, 5) and np.isfinite(logits).all()
    # Every constructor argument is in get_config (a round trip alone cannot catch a key never written).
    arguments = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")]
    assert sorted(arguments) == sorted(k for k in model.get_config() if k != "trainable")
    clone = cls.from_config(model.get_config())
    assert clone.get_config() == model.get_config()
    assert [tuple(w.shape) for w in clone.weights] == [tuple(w.shape) for w in model.weights]
    features = _build(key, include_top=False)
    assert features.output_shape == (None, TINY_FEATURES[key])


@pytest.mark.parametrize("key", sorted(TINY))
def test_normalisation_layers_have_exact_second_derivatives(key):
    model = _build(key)
    norms = [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, (keras.layers.LayerNormalization, keras.layers.BatchNormalization))
    ]
    assert all(isinstance(n, (hlayers.LayerNormalization, hlayers.BatchNormalization)) for n in norms), [
        type(n) for n in norms if not isinstance(n, (hlayers.LayerNormalization, hlayers.BatchNormalization))
    ]
    if key != "vgg":
        assert norms


# The deep tiny configs take ~10 s each here (seven builds); the shared code path runs fast on the others.
@pytest.mark.parametrize(
    "key",
    ["convnext", "vgg", "vit"] + [pytest.param(k, marks=pytest.mark.slow) for k in ("efficientnet", "resnet_v2")],
)
def test_preset_round_trip_and_variants(key, tmp_path):
    model = perturb_weights(_build(key))
    x = random_images(TINY[key][1]["image_size"])
    assert isinstance(model.get_layer("preprocessing"), ImageNetNormalization)
    path = save_preset(model, tmp_path / key)
    restored = load_model(path)
    assert type(restored) is type(model)
    np.testing.assert_array_equal(np.asarray(restored(x)), np.asarray(model(x)))
    # A new head for fine-tuning: everything but the head keeps the published weights.
    swapped = load_model(path, num_classes=3)
    assert swapped.output_shape == (None, 3)
    head = model.classifier_name
    for layer in swapped.layers:
        if layer.weights and layer.name != head:
            for a, b in zip(layer.get_weights(), model.get_layer(layer.name).get_weights()):
                np.testing.assert_array_equal(a, b)
    # No head: the features the head reads.
    features = load_model(path, include_top=False)
    inner = keras.Model(model.input, model.get_layer(head).input)
    np.testing.assert_allclose(np.asarray(features(x)), np.asarray(inner(x)), rtol=1e-6, atol=1e-6)
    # The bare network expects normalised inputs.
    bare = load_model(path, preprocess=False)
    assert "preprocessing" not in [layer.name for layer in bare.layers]
    np.testing.assert_allclose(
        np.asarray(bare(((x / 255.0 - MEAN) / STD).astype("float32"))), np.asarray(model(x)), rtol=1e-5, atol=1e-5
    )


def test_fine_tuning_fits_and_harmonizes(tmp_path):
    from harmonization import HarmonizedModel

    path = save_preset(_build("vgg"), tmp_path / "vgg")
    model = load_model(path, num_classes=3)
    rng = np.random.default_rng(0)
    x = random_images(32, n=4)
    y = rng.integers(0, 3, 4)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, epochs=1, batch_size=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    harmonized = HarmonizedModel(model)
    harmonized.compile(optimizer="adam")
    heatmaps = rng.uniform(0, 1, (4, 32, 32, 1)).astype("float32")
    before = [w.copy() for w in model.get_weights()]
    history = harmonized.fit({"image": x, "heatmap": heatmaps, "label": y}, epochs=1, batch_size=2, verbose=0)
    assert all(np.isfinite(v).all() for v in history.history.values())
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_invalid_arguments_are_named():
    with pytest.raises(ValueError, match="multiple of `patch_size`"):
        ViT(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="`num_classes` must be a positive int"):
        VGG(image_size=32, block_filters=[2] * 5, fc_units=4, num_classes=0)
    with pytest.raises(ValueError, match="`depths` and `widths`"):
        ConvNeXt(depths=[1, 1], widths=[4])
    with pytest.raises(ValueError, match="`image_size` must be a positive int"):
        ResNetV2(image_size=-1)


# --- independent references -------------------------------------------------------------------------------


def _layer_norm(x, gamma, beta, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def _numpy_vit(model, images, cfg):
    """ViT forward pass in float64 numpy, written from the vit_keras description (not from our code)."""
    w = {v.path: np.asarray(v, dtype=np.float64) for v in model.weights}
    p, d, heads = cfg["patch_size"], cfg["hidden_size"], cfg["num_heads"]
    x = (images.astype(np.float64) / 255.0 - MEAN) / STD
    n, size = x.shape[0], x.shape[1]
    g = size // p
    patches = x.reshape(n, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, g * g, p * p * 3)
    tokens = patches @ w["embedding/kernel"].reshape(p * p * 3, d) + w["embedding/bias"]
    tokens = np.concatenate([np.broadcast_to(w["class_token/cls"], (n, 1, d)), tokens], axis=1)
    tokens = tokens + w["Transformer_posembed_input/pos_embedding"]
    for i in range(cfg["num_layers"]):
        b = f"Transformer_encoderblock_{i}/"
        a = b + "MultiHeadDotProductAttention_1/"
        h = _layer_norm(tokens, w[b + "LayerNorm_0/gamma"], w[b + "LayerNorm_0/beta"], 1e-6)
        q, k, v = (h @ w[a + f"{name}/kernel"] + w[a + f"{name}/bias"] for name in ("query", "key", "value"))
        split = lambda t: t.reshape(n, -1, heads, d // heads).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // heads)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attended = (scores / scores.sum(-1, keepdims=True)) @ v
        attended = attended.transpose(0, 2, 1, 3).reshape(n, -1, d)
        tokens = tokens + attended @ w[a + "out/kernel"] + w[a + "out/bias"]
        h = _layer_norm(tokens, w[b + "LayerNorm_2/gamma"], w[b + "LayerNorm_2/beta"], 1e-6)
        h = h @ w[b + "Dense_0/kernel"] + w[b + "Dense_0/bias"]
        h = 0.5 * h * (1 + erf(h / np.sqrt(2)))  # exact GELU
        tokens = tokens + h @ w[b + "Dense_1/kernel"] + w[b + "Dense_1/bias"]
    cls = _layer_norm(tokens[:, 0], w["Transformer_encoder_norm/gamma"], w["Transformer_encoder_norm/beta"], 1e-6)
    return cls @ w["head/kernel"] + w["head/bias"]


def test_vit_matches_a_float64_numpy_reference():
    cfg = dict(image_size=32, patch_size=8, hidden_size=12, num_layers=2, num_heads=3, mlp_dim=24, num_classes=7)
    keras.utils.set_random_seed(0)
    model = perturb_weights(ViT(**cfg), seed=3)
    x = random_images(32, n=3, seed=4)
    np.testing.assert_allclose(np.asarray(model(x)), _numpy_vit(model, x, cfg), rtol=1e-4, atol=1e-4)


def _transfer_by_name(source, target):
    mine = {layer.name: layer for layer in target.layers}
    copied = 0
    for layer in source.layers:
        if layer.weights and layer.name in mine:
            mine[layer.name].set_weights(layer.get_weights())
            copied += len(layer.weights)
    return copied


@pytest.mark.slow
def test_resnet50v2_matches_keras_applications():
    reference = keras.applications.ResNet50V2(weights=None, input_shape=(64, 64, 3), classifier_activation=None)
    perturb_weights(reference, seed=5)
    model = ResNetV2(image_size=64, preprocess=False)
    assert _transfer_by_name(reference, model) == len(model.weights) == len(reference.weights)
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(reference(x)), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_efficientnet_b0_matches_keras_applications_where_paddings_agree():
    # keras.applications pads explicitly; with even sizes at every strided layer it computes what the
    # `efficientnet` package's "same" padding does. Its Rescaling+Normalization (unadapted: x/255) is not ours.
    reference = keras.applications.EfficientNetB0(weights=None, input_shape=(64, 64, 3), classifier_activation=None)
    perturb_weights(reference, seed=6)
    reference.get_layer("normalization").set_weights([np.zeros(3), np.ones(3), np.zeros(())])
    model = EfficientNet(image_size=64, preprocess=False)
    assert _transfer_by_name(reference, model) == len(model.weights) == len(reference.weights) - 3
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(model(x / 255.0)), np.asarray(reference(x)), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_convnext_tiny_matches_keras_applications():
    reference = keras.applications.ConvNeXtTiny(
        weights=None, input_shape=(64, 64, 3), include_preprocessing=False, classifier_activation=None
    )
    model = ConvNeXt(image_size=64, preprocess=False)
    perturb_weights(model, seed=7)
    assert len(model.weights) == len(reference.weights) == 182
    for ours, theirs in zip(model.weights, reference.weights):  # same order; depthwise kernels laid out apart
        value = np.asarray(ours)
        theirs.assign(value if tuple(theirs.shape) == value.shape else np.transpose(value, (0, 1, 3, 2)))
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(reference(x)), rtol=1e-4, atol=1e-4)


# --- full size: published layouts and parameter counts ---------------------------------------------------


def _tsv(name):
    with open(REFERENCE / name, newline="") as handle:
        return [row for row in csv.reader(handle, delimiter="\t") if row]


def _layout(model):
    return [(w.path, tuple(w.shape)) for w in model.weights]


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="shared/reference is not checked out next to the repo")
def test_vit_b16_has_the_vit_keras_weight_layout():
    rows = _tsv("vit_keras-0.1.2_vit_b16_weights.tsv")
    expected = [(name.removesuffix(":0").replace("Transformer/", "Transformer_", 1), eval(shape)) for _, name, shape in rows]
    model = ViT()
    assert _layout(model) == expected
    assert model.count_params() == 86_567_656


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="shared/reference is not checked out next to the repo")
def test_convnext_tiny_has_the_kecam_weight_layout():
    rows = _tsv("kecam-1.3.9_convnext_tiny_weights.tsv")
    # Keras 3 calls kecam's `depthwise_kernel` `kernel`; everything else is named alike.
    expected = [(name.removesuffix(":0").replace("depthwise_kernel", "kernel"), eval(shape)) for _, _, name, shape in rows]
    model = ConvNeXt()
    assert _layout(model) == expected
    assert model.count_params() == 28_589_128


FULL_SIZE = {
    "vit_b16": (ViT, 86_567_656),
    "resnet50v2": (ResNetV2, 25_613_800),
    "vgg16": (VGG, 138_357_544),
    "efficientnet_b0": (EfficientNet, 5_330_564),
    "convnext_tiny": (ConvNeXt, 28_589_128),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_parameter_count_and_one_forward_pass(name):
    cls, count = FULL_SIZE[name]
    model = cls()
    assert model.count_params() == count
    logits = np.asarray(model(random_images(224, n=1)))
    assert logits.shape == (1, 1000) and np.isfinite(logits).all()


def test_zoo_entries_match_the_architectures():
    from harmonization.zoo import list_models, model_info

    built = 0
    for name in list_models():
        info = model_info(name)
        module = info["architecture"]["module"]
        if module.rsplit(".", 1)[-1] not in ("vit", "resnet_v2", "vgg", "efficientnet", "convnext"):
            continue
        cls = getattr(__import__(module, fromlist=["x"]), info["architecture"]["class_name"])
        count = FULL_SIZE[{"ViT": "vit_b16", "ResNetV2": "resnet50v2", "VGG": "vgg16", "EfficientNet": "efficientnet_b0",
                           "ConvNeXt": "convnext_tiny"}[cls.__name__]][1]
        assert info["parameter_count"] == count
        signature = inspect.signature(cls.__init__).parameters
        assert set(info["architecture"]["config"]) <= set(signature), name
        built += 1
    assert built == 5
