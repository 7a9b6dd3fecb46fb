"""MaxViT: the shared architecture checks on a tiny config, the relative position index, and the full-size
weight layout of the published file (keras-cv-attention-models 1.3.9, tests/fixtures/reference/).

MaxViT-Tiny's parameter count and one forward pass are tested with every zoo entry in tests/test_registry.py;
its computation against kecam itself in tests/test_convert.py (fixtures written by kecam 1.3.9, logits to 1e-4).
"""

import numpy as np
import pytest

from harmonization.architectures import MaxViT
from harmonization.architectures.maxvit import relative_position_index
from architecture_helpers import (kecam_weight_layout, run_architecture_test, run_harmonized_training_test,
                                  run_preset_test)

# 64 px, 6 px windows: the 16 and 8 px maps are padded to 18 and 12, the 4 px map clips the window.
INIT_KWARGS = dict(image_size=64, depths=[1, 1, 1], widths=[8, 8, 16], stem_width=8, head_dim=4, window_size=6,
                   num_classes=5)
# One stage: tracing the second-order training step costs ~30 s on the three-stage config.
ONE_STAGE = dict(image_size=32, depths=[1], widths=[8], stem_width=8, head_dim=4, window_size=4, num_classes=3)


def test_architecture():
    run_architecture_test(MaxViT, INIT_KWARGS, expected_feature_shape=(None, 16))


def test_preset_round_trip_and_variants(tmp_path):
    run_preset_test(MaxViT, INIT_KWARGS, tmp_path, atol=1e-4)


@pytest.mark.slow  # ~15 s: tracing the second-order step through windowed attention
def test_harmonized_training_step_runs():
    run_harmonized_training_test(MaxViT, ONE_STAGE)


def test_relative_position_index_is_keras_cv_attention_models_transposed_grid():
    # kecam's "xy" meshgrid gives token t of a (h, w) window the coordinates (t % h, t // h).
    index = relative_position_index(2, 3)
    assert index.shape == (6, 6) and index.min() == 0 and index.max() == 3 * 5 - 1
    assert (np.diag(index) == (2 - 1) + (3 - 1) * (2 * 2 - 1)).all()  # zero offset sits at the table's centre
    coords = [(t % 2, t // 2) for t in range(6)]
    for i, (hi, wi) in enumerate(coords):
        for j, (hj, wj) in enumerate(coords):
            assert index[i, j] == (hi - hj + 1) + (wi - wj + 2) * 3


def test_invalid_arguments_are_named():
    with pytest.raises(ValueError, match="divisible by `head_dim`"):
        MaxViT(image_size=32, depths=[1], widths=[6], stem_width=8, head_dim=4)
    with pytest.raises(ValueError, match="`window_size` must be a positive int"):
        MaxViT(image_size=32, depths=[1], widths=[8], stem_width=8, head_dim=4, window_size=0)


def test_maxvit_tiny_has_the_kecam_weight_layout():
    expected = kecam_weight_layout("kecam-1.3.9_maxvit_tiny_weights.tsv")
    model = MaxViT()
    assert [(w.path.replace("/", "_"), tuple(w.shape)) for w in model.weights] == expected
    assert model.count_params() == 30_964_144
