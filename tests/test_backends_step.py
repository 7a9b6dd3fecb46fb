"""The harmonized step on JAX and PyTorch equals TensorFlow's: same weights, same batch, one step (issue 19, §3).

Each backend runs in a child process (Keras picks its backend once per process): the child builds the model,
loads the same weights from a file, takes one SGD step on the same batch and returns the weight updates. On
TensorFlow the step is the one tested against the published code (tests/test_published_api.py), so agreement here
carries that to the other backends; it is also what checks the second derivative of Keras's normalisation layers
on JAX and PyTorch (BatchNormalization and GroupNormalization in the CNN, LayerNormalization in the ViT: see
tests/test_backends_second_order.py for why a float64 difference cannot). The negative control is TensorFlow without its exact second order
(`exact_second_order=False`): Keras-TF's normalisation layers then get the harmonization gradient wrong, and the
same comparison fails.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from backend_helpers import current_backend, require_backend, run_on_backend

pytestmark = pytest.mark.backends

#: Per variable, max |update - TensorFlow's update| / max |TensorFlow's update| (float32 noise, issue 19).
TOLERANCE = 1e-4

# Builds the model of `kind`, loads weights.npz if present (else saves its own), takes one step, prints updates.
CHILD = r"""
import json
import numpy as np
import keras
import harmonization
from harmonization.architectures import vit

spec = json.loads(__import__("os").environ["STEP_SPEC"])
keras.utils.set_random_seed(0)
if not spec["exact"]:  # the negative control: also the zoo's own exact layers differentiate as plain Keras-TF
    import contextlib
    import harmonization.layers
    harmonization.layers.exact_moments = contextlib.nullcontext
if spec["kind"] == "cnn":
    model = keras.Sequential([
        keras.Input((16, 16, 3)), keras.layers.Rescaling(1 / 127.5, offset=-1.0),
        keras.layers.Conv2D(6, 3, padding="same"), keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.Conv2D(4, 3, strides=2, padding="same"), keras.layers.GroupNormalization(groups=2),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(5),
    ])
else:
    model = vit.ViT(image_size=16, patch_size=8, hidden_size=8, num_layers=1, num_heads=2, mlp_dim=16,
                    dropout_rate=0.0, num_classes=5)
weights_file = spec["weights"]
try:
    stored = np.load(weights_file)
    model.set_weights([stored[f"w{i}"] for i in range(len(stored.files))])
except FileNotFoundError:
    np.savez(weights_file, **{f"w{i}": w for i, w in enumerate(model.get_weights())})
batch = {k: v for k, v in np.load(spec["batch"]).items()}
before = [np.array(w) for w in model.get_weights()]
hmodel = harmonization.HarmonizedModel(model, exact_second_order=spec["exact"])
hmodel.compile(optimizer=keras.optimizers.SGD(1.0), jit_compile=False)
logs = hmodel.train_on_batch(batch, return_dict=True)
updates = [np.asarray(a, np.float64) - b for a, b in zip(model.get_weights(), before)]
print(json.dumps({"updates": [u.tolist() for u in updates], "logs": {k: float(v) for k, v in logs.items()},
                  "names": [w.path for w in model.weights]}))
"""


def _batch(tmp_path, seed=0):
    rng = np.random.default_rng(seed)
    path = tmp_path / "batch.npz"
    np.savez(
        path,
        image=(rng.random((4, 16, 16, 3)) * 255).astype("float32"),
        heatmap=rng.random((4, 16, 16)).astype("float32"),
        label=np.array([0, 3, 1, 4]),
        token=np.array([1.0, 1.0, 0.0, 1.0], "float32"),
    )
    return path


def _step(backend, tmp_path, kind, exact=True):
    spec = {"kind": kind, "weights": str(tmp_path / f"{kind}_weights.npz"), "batch": str(_batch(tmp_path)),
            "exact": exact}
    return run_on_backend(backend, CHILD, env={"STEP_SPEC": json.dumps(spec)})


def _worst_relative_difference(result, reference) -> tuple[float, str]:
    """The largest per-variable max |difference| / max |TensorFlow's update|, and that variable's path.

    A variable whose exact gradient is zero (a convolution's bias before BatchNormalization, which removes it)
    moves by rounding noise only; it is measured against 1% of the largest update in the model instead.
    """
    worst, name = 0.0, ""
    floor = 1e-2 * max(float(np.max(np.abs(np.asarray(u)))) for u in reference["updates"])
    for got, want, path in zip(result["updates"], reference["updates"], reference["names"]):
        got, want = np.asarray(got), np.asarray(want)
        difference = float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), floor))
        if difference > worst:
            worst, name = difference, path
    return worst, name


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """TensorFlow's step (exact and not) for both models; the weights file is written by the first child."""
    require_backend("tensorflow")
    tmp_path = tmp_path_factory.mktemp("step")
    return tmp_path, {kind: _step("tensorflow", tmp_path, kind) for kind in ("cnn", "vit")}


@pytest.mark.parametrize("backend", ["jax", "torch"])
@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_one_step_equals_tensorflows(references, backend, kind):
    tmp_path, reference = references
    if backend == current_backend() == "tensorflow":
        pytest.fail("unreachable")
    result = _step(backend, tmp_path, kind)
    worst, name = _worst_relative_difference(result, reference[kind])
    assert worst <= TOLERANCE, f"{backend} step differs from TensorFlow's at {name}: {worst:.2e}"
    for key in ("loss", "cross_entropy", "harmonization"):
        assert result["logs"][key] == pytest.approx(reference[kind]["logs"][key], rel=1e-5), key


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_the_comparison_fails_for_a_wrong_second_derivative(references, kind):
    # Negative control: TensorFlow without exact moments differentiates BatchNormalization / LayerNormalization
    # wrongly the second time; the comparison above must see it.
    tmp_path, reference = references
    inexact = _step("tensorflow", tmp_path, kind, exact=False)
    worst, _ = _worst_relative_difference(inexact, reference[kind])
    assert worst > 10 * TOLERANCE
