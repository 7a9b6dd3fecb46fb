"""VGG: the shared architecture checks on a tiny config, and fine-tuning a preset of it.

VGG16 at full size (parameter count, one forward pass) is tested with every zoo entry in tests/test_registry.py;
its computation against the published file's original in tests/test_convert.py.
"""

import keras
import numpy as np
import pytest

from harmonization.architectures import VGG
from harmonization.presets import load_model, save_preset
from architecture_helpers import build, random_images, run_architecture_test, run_preset_test

INIT_KWARGS = dict(image_size=32, block_convs=[1, 1, 2, 1, 1], block_filters=[2, 4, 4, 4, 4], fc_units=8, num_classes=5)


def test_architecture():
    run_architecture_test(VGG, INIT_KWARGS, expected_feature_shape=(None, 8), expect_norms=False)


def test_preset_round_trip_and_variants(tmp_path):
    run_preset_test(VGG, INIT_KWARGS, tmp_path)


def test_fine_tuning_fits_and_harmonizes(tmp_path):
    from harmonization import HarmonizedModel

    path = save_preset(build(VGG, INIT_KWARGS), tmp_path / "vgg")
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
    with pytest.raises(ValueError, match="`num_classes` must be a positive int"):
        VGG(image_size=32, block_filters=[2] * 5, fc_units=4, num_classes=0)
