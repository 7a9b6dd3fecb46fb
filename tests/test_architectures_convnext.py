"""ConvNeXt: the shared architecture checks on a tiny config, ConvNeXt-Tiny against `keras.applications`, and the
full-size weight layout of the published file (keras-cv-attention-models 1.3.9, tests/fixtures/reference/).

ConvNeXt-Tiny's parameter count and one forward pass are tested with every zoo entry in tests/test_registry.py;
its computation against kecam itself in tests/test_convert.py.
"""

import keras
import numpy as np
import pytest

from harmonization.architectures import ConvNeXt
from architecture_helpers import (perturb_weights, read_reference_layout, run_architecture_test, run_preset_test,
                                  weight_layout)

INIT_KWARGS = dict(image_size=32, depths=[1, 1, 2, 1], widths=[4, 4, 8, 8], num_classes=5)


def test_architecture():
    run_architecture_test(ConvNeXt, INIT_KWARGS, expected_feature_shape=(None, 8))


def test_preset_round_trip_and_variants(tmp_path):
    run_preset_test(ConvNeXt, INIT_KWARGS, tmp_path)


def test_invalid_arguments_are_named():
    with pytest.raises(ValueError, match="`depths` and `widths`"):
        ConvNeXt(depths=[1, 1], widths=[4])


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


def test_convnext_tiny_has_the_kecam_weight_layout():
    rows = read_reference_layout("kecam-1.3.9_convnext_tiny_weights.tsv")
    # Keras 3 calls kecam's `depthwise_kernel` `kernel`; everything else is named alike.
    expected = [(name.removesuffix(":0").replace("depthwise_kernel", "kernel"), eval(shape)) for _, _, name, shape in rows]
    model = ConvNeXt()
    assert weight_layout(model) == expected
    assert model.count_params() == 28_589_128
