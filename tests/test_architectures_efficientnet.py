"""EfficientNet: the shared architecture checks on a tiny config, and B0 against `keras.applications`.

EfficientNet-B0 at full size (parameter count, one forward pass) is tested with every zoo entry in
tests/test_registry.py; its computation against the `efficientnet` package in tests/test_convert.py.
"""

import keras
import numpy as np
import pytest

from harmonization.architectures import EfficientNet
from architecture_helpers import perturb_weights, run_architecture_test, run_preset_test, transfer_weights_by_name

INIT_KWARGS = dict(image_size=32, width_coefficient=0.1, depth_coefficient=0.4, num_classes=5)


def test_architecture():
    run_architecture_test(EfficientNet, INIT_KWARGS, expected_feature_shape=(None, 128))


@pytest.mark.slow  # the deep tiny config builds seven times; the shared code path runs fast on other families
def test_preset_round_trip_and_variants(tmp_path):
    run_preset_test(EfficientNet, INIT_KWARGS, tmp_path)


@pytest.mark.slow
def test_efficientnet_b0_matches_keras_applications_where_paddings_agree():
    # keras.applications pads explicitly; with even sizes at every strided layer it computes what the
    # `efficientnet` package's "same" padding does. Its Rescaling+Normalization (unadapted: x/255) is not ours.
    reference = keras.applications.EfficientNetB0(weights=None, input_shape=(64, 64, 3), classifier_activation=None)
    perturb_weights(reference, seed=6)
    reference.get_layer("normalization").set_weights([np.zeros(3), np.ones(3), np.zeros(())])
    model = EfficientNet(image_size=64, preprocess=False)
    assert transfer_weights_by_name(reference, model) == len(model.weights) == len(reference.weights) - 3
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(model(x / 255.0)), np.asarray(reference(x)), rtol=1e-4, atol=1e-4)
