"""MaxViT and LeViT, the two keras-cv-attention-models architectures: tiny configs for behaviour, the published
weight layouts and parameter counts at full size.

Their computation is checked against kecam itself in tests/test_convert.py (fixtures written by kecam 1.3.9,
logits to 1e-4); tests/fixtures/reference/ holds the full-size layouts kecam 1.3.9 prints
(tools/make_conversion_fixtures.py).
"""

import csv
import inspect
from pathlib import Path

import keras
import numpy as np
import pytest

import harmonization.layers as hlayers
from harmonization.architectures import LeViT, MaxViT
from harmonization.architectures.levit import attention_bias_index
from harmonization.architectures.maxvit import relative_position_index
from harmonization.presets import load_model, save_preset
from architecture_helpers import build_tiny, perturb_weights, random_images

REFERENCE = Path(__file__).parent / "fixtures" / "reference"
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])

TINY = {
    # 64 px, 6 px windows: the 16 and 8 px maps are padded to 18 and 12, the 4 px map clips the window.
    "maxvit": (MaxViT, dict(image_size=64, depths=[1, 1, 1], widths=[8, 8, 16], stem_width=8, head_dim=4,
                            window_size=6, num_classes=5)),
    # 96 px: 6x6 tokens, shrunk to 3x3 then 2x2.
    "levit": (LeViT, dict(image_size=96, patch_channel=16, out_channels=[24, 32, 32], num_heads=[2, 4, 4],
                          depths=[1, 1, 1], key_dims=[4, 4, 4], num_classes=5)),
}
TINY_FEATURES = {"maxvit": 16, "levit": 32}
FULL_SIZE = {"maxvit": (MaxViT, 30_964_144, "kecam-1.3.9_maxvit_tiny_weights.tsv"),
             "levit": (LeViT, 8_876_008, "kecam-1.3.9_levit128_weights.tsv")}


def _build(key, **overrides):
    return build_tiny(TINY, key, **overrides)


@pytest.mark.parametrize("key", sorted(TINY))
def test_forward_shapes_and_config_round_trip(key):
    cls, config = TINY[key]
    model = perturb_weights(_build(key))
    logits = np.asarray(model(random_images(config["image_size"])))
    assert logits.shape == (2, 5) and np.isfinite(logits).all()
    arguments = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")]
    assert sorted(arguments) == sorted(k for k in model.get_config() if k != "trainable")
    clone = cls.from_config(model.get_config())
    assert clone.get_config() == model.get_config()
    assert [(w.path, tuple(w.shape)) for w in clone.weights] == [(w.path, tuple(w.shape)) for w in model.weights]
    assert _build(key, include_top=False).output_shape == (None, TINY_FEATURES[key])


@pytest.mark.parametrize("key", sorted(TINY))
def test_normalisation_layers_have_exact_second_derivatives(key):
    norms = [layer for layer in _build(key)._flatten_layers(include_self=False, recursive=True)
             if isinstance(layer, (keras.layers.LayerNormalization, keras.layers.BatchNormalization))]
    assert norms
    assert all(isinstance(n, (hlayers.LayerNormalization, hlayers.BatchNormalization)) for n in norms)


@pytest.mark.parametrize("key", sorted(TINY))
def test_preset_round_trip_and_variants(key, tmp_path):
    model = perturb_weights(_build(key))
    x = random_images(TINY[key][1]["image_size"])
    path = save_preset(model, tmp_path / key)
    restored = load_model(path)
    assert type(restored) is type(model)
    np.testing.assert_array_equal(np.asarray(restored(x)), np.asarray(model(x)))
    swapped = load_model(path, num_classes=3)
    assert swapped.output_shape == (None, 3)
    features = load_model(path, include_top=False)
    inner = keras.Model(model.input, model.get_layer(model.classifier_name).input)
    np.testing.assert_allclose(np.asarray(features(x)), np.asarray(inner(x)), rtol=1e-5, atol=1e-5)
    bare = load_model(path, preprocess=False)
    np.testing.assert_allclose(np.asarray(bare(((x / 255.0 - MEAN) / STD).astype("float32"))), np.asarray(model(x)),
                               rtol=1e-4, atol=1e-4)


# One stage each: tracing the second-order training step costs ~30 s on the three-stage configs.
ONE_STAGE = {
    "maxvit": dict(image_size=32, depths=[1], widths=[8], stem_width=8, head_dim=4, window_size=4, num_classes=3),
    "levit": dict(image_size=64, patch_channel=16, out_channels=[16], num_heads=[2], depths=[1], key_dims=[4],
                  attn_ratios=[2], mlp_ratios=[2], strides=[0], num_classes=3),
}


@pytest.mark.parametrize("key", ["levit", pytest.param("maxvit", marks=pytest.mark.slow)])  # ~15 s each
def test_harmonized_training_step_runs(key):
    from harmonization import HarmonizedModel

    keras.utils.set_random_seed(0)
    model = TINY[key][0](**ONE_STAGE[key])
    size = ONE_STAGE[key]["image_size"]
    rng = np.random.default_rng(0)
    harmonized = HarmonizedModel(model)
    harmonized.compile(optimizer="adam")
    before = [np.asarray(w).copy() for w in model.trainable_weights]
    history = harmonized.fit({"image": random_images(size, n=2), "heatmap": rng.uniform(0, 1, (2, size, size, 1)),
                              "label": rng.integers(0, 3, 2)}, epochs=1, batch_size=2, verbose=0)
    assert all(np.isfinite(v).all() for v in history.history.values())
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(before, model.trainable_weights))


def test_relative_position_index_is_keras_cv_attention_models_transposed_grid():
    # kecam's "xy" meshgrid gives token t of a (h, w) window the coordinates (t % h, t // h).
    index = relative_position_index(2, 3)
    assert index.shape == (6, 6) and index.min() == 0 and index.max() == 3 * 5 - 1
    assert (np.diag(index) == (2 - 1) + (3 - 1) * (2 * 2 - 1)).all()  # zero offset sits at the table's centre
    coords = [(t % 2, t // 2) for t in range(6)]
    for i, (hi, wi) in enumerate(coords):
        for j, (hj, wj) in enumerate(coords):
            assert index[i, j] == (hi - hj + 1) + (wi - wj + 2) * 3


def test_attention_bias_index_of_strided_attention():
    # 3x3 queries over 6x6 keys (stride 2): key (x, y) vs query (x', y') -> |x - 2x'| + |y - 2y'| * 6.
    index = attention_bias_index(3, 3, 36)
    assert index.shape == (9, 36)
    queries = [(q % 3, q // 3) for q in range(9)]
    keys = [(k % 6, k // 6) for k in range(36)]
    for q, (qx, qy) in enumerate(queries):
        for k, (kx, ky) in enumerate(keys):
            assert index[q, k] == abs(kx - 2 * qx) + abs(ky - 2 * qy) * 6


def test_invalid_arguments_are_named():
    with pytest.raises(ValueError, match="divisible by `head_dim`"):
        MaxViT(image_size=32, depths=[1], widths=[6], stem_width=8, head_dim=4)
    with pytest.raises(ValueError, match="`window_size` must be a positive int"):
        MaxViT(image_size=32, depths=[1], widths=[8], stem_width=8, head_dim=4, window_size=0)
    with pytest.raises(ValueError, match="one entry per stage"):
        LeViT(image_size=64, out_channels=[16, 24], num_heads=[2])
    with pytest.raises(ValueError, match="multiple of 8"):
        LeViT(image_size=64, patch_channel=12)


def _tsv(name):
    with open(REFERENCE / name, newline="") as handle:
        return [row for row in csv.reader(handle, delimiter="\t") if row]


@pytest.mark.parametrize("key", sorted(FULL_SIZE))
def test_full_size_has_the_kecam_weight_layout(key):
    cls, count, reference = FULL_SIZE[key]
    rows = _tsv(reference)
    # kecam's names with "/" -> "_" (Keras 3 layer names cannot hold "/"); Keras 3 calls depthwise kernels "kernel".
    expected = [(name.removesuffix(":0").replace("depthwise_kernel", "kernel").replace("/", "_"), eval(shape))
                for _, _, name, shape in rows]
    model = cls()
    assert [(w.path.replace("/", "_"), tuple(w.shape)) for w in model.weights] == expected
    assert model.count_params() == count


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(FULL_SIZE))
def test_full_size_one_forward_pass(key):
    cls, count, _ = FULL_SIZE[key]
    model = cls()
    assert model.count_params() == count
    logits = np.asarray(model(random_images(224, n=1)))
    assert logits.shape == (1, 1000) and np.isfinite(logits).all()


def test_zoo_entries_build_these_architectures():
    from harmonization.zoo import model_info

    for name, key in (("maxvit_tiny_harmonized", "maxvit"), ("levit128_harmonized", "levit")):
        info = model_info(name)
        cls, count, _ = FULL_SIZE[key]
        assert info["architecture"]["class_name"] == cls.__name__
        assert info["parameter_count"] == count
        signature = inspect.signature(cls.__init__).parameters
        assert set(info["architecture"]["config"]) <= set(signature)
        defaults = {k: signature[k].default for k in info["architecture"]["config"]}
        normalised = {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}
        assert info["architecture"]["config"] == normalised  # the entry spells out the published defaults
