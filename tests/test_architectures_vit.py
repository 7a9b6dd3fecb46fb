"""ViT: the shared architecture checks on a tiny config, a float64 numpy reference written from the vit_keras
description, and the full-size weight layout of the published file (vit_keras 0.1.2, tests/fixtures/reference/).

ViT-B/16's parameter count and one forward pass are tested with every zoo entry in tests/test_registry.py; its
computation against vit_keras itself in tests/test_convert.py.
"""

import keras
import numpy as np
import pytest
from scipy.special import erf

from harmonization.architectures import ViT
from architecture_helpers import (perturb_weights, random_images, read_reference_layout,
                                  run_architecture_test, run_preset_test, weight_layout)
from published_reference import MEAN, STD

INIT_KWARGS = dict(image_size=16, patch_size=8, hidden_size=8, num_layers=2, num_heads=2, mlp_dim=16, num_classes=5)


def test_architecture():
    run_architecture_test(ViT, INIT_KWARGS, expected_feature_shape=(None, 8))


def test_preset_round_trip_and_variants(tmp_path):
    run_preset_test(ViT, INIT_KWARGS, tmp_path)


def test_invalid_arguments_are_named():
    with pytest.raises(ValueError, match="multiple of `patch_size`"):
        ViT(image_size=30, patch_size=8)


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


def test_vit_b16_has_the_vit_keras_weight_layout():
    rows = read_reference_layout("vit_keras-0.1.2_vit_b16_weights.tsv")
    expected = [(name.removesuffix(":0").replace("Transformer/", "Transformer_", 1), eval(shape)) for _, name, shape in rows]
    model = ViT()
    assert weight_layout(model) == expected
    assert model.count_params() == 86_567_656
