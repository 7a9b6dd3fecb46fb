"""LeViT: the shared architecture checks on a tiny config, the attention bias index, and the full-size weight
layout of the published file (keras-cv-attention-models 1.3.9, tests/fixtures/reference/).

LeViT-128's parameter count and one forward pass are tested with every zoo entry in tests/test_registry.py;
its computation against kecam itself in tests/test_convert.py (fixtures written by kecam 1.3.9, logits to 1e-4).
"""

import pytest

from harmonization.architectures import LeViT
from harmonization.architectures.levit import attention_bias_index
from architecture_helpers import (kecam_weight_layout, run_architecture_test, run_harmonized_training_test,
                                  run_preset_test)

# 96 px: 6x6 tokens, shrunk to 3x3 then 2x2.
INIT_KWARGS = dict(image_size=96, patch_channel=16, out_channels=[24, 32, 32], num_heads=[2, 4, 4], depths=[1, 1, 1],
                   key_dims=[4, 4, 4], num_classes=5)
# One stage: tracing the second-order training step costs ~30 s on the three-stage config.
ONE_STAGE = dict(image_size=64, patch_channel=16, out_channels=[16], num_heads=[2], depths=[1], key_dims=[4],
                 attn_ratios=[2], mlp_ratios=[2], strides=[0], num_classes=3)


def test_architecture():
    run_architecture_test(LeViT, INIT_KWARGS, expected_feature_shape=(None, 32))


def test_preset_round_trip_and_variants(tmp_path):
    run_preset_test(LeViT, INIT_KWARGS, tmp_path, atol=1e-4)


def test_harmonized_training_step_runs():
    run_harmonized_training_test(LeViT, ONE_STAGE)


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
    with pytest.raises(ValueError, match="one entry per stage"):
        LeViT(image_size=64, out_channels=[16, 24], num_heads=[2])
    with pytest.raises(ValueError, match="multiple of 8"):
        LeViT(image_size=64, patch_channel=12)


def test_levit128_has_the_kecam_weight_layout():
    expected = kecam_weight_layout("kecam-1.3.9_levit128_weights.tsv")
    model = LeViT()
    assert [(w.path.replace("/", "_"), tuple(w.shape)) for w in model.weights] == expected
    assert model.count_params() == 8_876_008
