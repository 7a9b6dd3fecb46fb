"""`HarmonizedModel` on the backend this suite runs on: bad batches are refused and change nothing, the test step's
Spearman is the paper's, and a trained model saves and loads (issue 19, §3).

TensorFlow refuses a bad batch inside its graph (an InvalidArgumentError from `fit`), JAX and PyTorch on the host
before the step (a ValueError); the sentence names the argument on all three.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import harmonization

pytestmark = pytest.mark.backends


def small_cnn():
    keras.utils.set_random_seed(1)
    return keras.Sequential([
        keras.Input((12, 12, 3)), keras.layers.Rescaling(1 / 255.0),
        keras.layers.Conv2D(4, 3, padding="same"), keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3),
    ])


def batch(**changes):
    rng = np.random.default_rng(2)
    data = {
        "image": (rng.random((4, 12, 12, 3)) * 255).astype("float32"),
        "heatmap": rng.random((4, 12, 12)).astype("float32"),
        "label": np.array([0, 2, 1, 2]),
        "token": np.array([1.0, 1.0, 0.0, 1.0], "float32"),
    }
    data.update(changes)
    return data


def state(hmodel):
    return [keras.ops.convert_to_numpy(v).copy() for v in hmodel.variables + hmodel.optimizer.variables]


@pytest.mark.parametrize(
    "changes, name",
    [
        ({"label": np.array([0, 2, 3, 2])}, "`label`"),
        ({"label": np.array([0, -1, 1, 2])}, "`label`"),
        ({"token": np.array([1.0, 2.0, 0.0, 1.0], "float32")}, "`token`"),
        ({"heatmap": np.full((4, 12, 12), np.nan, "float32")}, "`heatmap`"),
    ],
)
def test_a_bad_batch_is_refused_and_changes_nothing(changes, name):
    hmodel = harmonization.HarmonizedModel(small_cnn())
    hmodel.compile(optimizer=keras.optimizers.SGD(0.1))
    hmodel.train_on_batch(batch())  # builds everything: the state below is a trained one
    before = state(hmodel)
    with pytest.raises(Exception, match=name) as caught:
        hmodel.train_on_batch(batch(**changes))
    if keras.backend.backend() != "tensorflow":
        assert caught.type is ValueError
    for old, new in zip(before, state(hmodel)):
        np.testing.assert_array_equal(old, new)


def test_the_test_step_reports_the_papers_spearman():
    # Alignment as the paper reports it: the evaluation map (max |gradient| over channels, preprocessed space)
    # against the human map, averaged over the examples that have one (token > 0).
    model = small_cnn()
    hmodel = harmonization.HarmonizedModel(model)
    hmodel.compile()
    data = batch()
    logs = hmodel.evaluate(data, batch_size=4, return_dict=True, verbose=0)
    maps = harmonization.saliency_map(model, data["image"], data["label"])
    rho = keras.ops.convert_to_numpy(harmonization.spearman(maps, data["heatmap"]))
    assert logs["spearman"] == pytest.approx(float(np.mean(rho[data["token"] > 0])), abs=1e-6)


def test_a_trained_harmonized_model_saves_and_loads(tmp_path):
    hmodel = harmonization.HarmonizedModel(small_cnn(), lambda_harmonization=2.0, label_smoothing=0.2)
    hmodel.compile(optimizer=keras.optimizers.SGD(0.1))
    hmodel.fit(batch(), batch_size=4, epochs=2, verbose=0)
    path = tmp_path / "harmonized.keras"
    hmodel.save(path)
    loaded = keras.saving.load_model(path)
    assert (loaded.lambda_harmonization, loaded.label_smoothing) == (2.0, 0.2)
    images = batch()["image"]
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(images)), keras.ops.convert_to_numpy(hmodel(images)), rtol=1e-5, atol=1e-6
    )
