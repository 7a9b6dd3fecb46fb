"""ResNetV2: the shared architecture checks on a tiny config, and ResNet50V2 against `keras.applications`.

ResNet50V2 at full size (parameter count, one forward pass) is tested with every zoo entry in
tests/test_registry.py.
"""

import keras
import numpy as np
import pytest

from harmonization.architectures import ResNetV2
from architecture_helpers import perturb_weights, run_architecture_test, run_preset_test, transfer_weights_by_name

INIT_KWARGS = dict(image_size=32, stack_blocks=[1, 2, 1, 1], stack_filters=[2, 2, 4, 4], stem_filters=4, num_classes=5)


def test_architecture():
    run_architecture_test(ResNetV2, INIT_KWARGS, expected_feature_shape=(None, 16))


@pytest.mark.slow  # the deep tiny config builds seven times; the shared code path runs fast on other families
def test_preset_round_trip_and_variants(tmp_path):
    run_preset_test(ResNetV2, INIT_KWARGS, tmp_path)


def test_invalid_arguments_are_named():
    with pytest.raises(ValueError, match="`image_size` must be a positive int"):
        ResNetV2(image_size=-1)


@pytest.mark.slow
def test_resnet50v2_matches_keras_applications():
    reference = keras.applications.ResNet50V2(weights=None, input_shape=(64, 64, 3), classifier_activation=None)
    perturb_weights(reference, seed=5)
    model = ResNetV2(image_size=64, preprocess=False)
    assert transfer_weights_by_name(reference, model) == len(model.weights) == len(reference.weights)
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(reference(x)), rtol=1e-4, atol=1e-4)
