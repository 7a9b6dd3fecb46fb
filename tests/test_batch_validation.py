"""Labels, tokens and hyper-parameters that would silently train the wrong thing are refused (issue 10, §2).

Out-of-range class ids become all-zero one-hot rows (accuracy 0, no harmonization term), a token of -1
reverses the harmonization term, epsilon 0 turns a blank map into NaN: each fails loudly instead,
before the step changes any weight.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from harmonization import _validation
from harmonization.harmonized_model import HarmonizedModel

RNG = np.random.default_rng(5)
SIZE = 16


def small_cnn(num_classes=3, seed=0):
    """A classifier with BatchNormalization, whose moving statistics a forward pass would move."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x))


def batch(n=8, num_classes=3, **overrides):
    data = {
        "image": RNG.uniform(0, 255, (n, SIZE, SIZE, 3)).astype("float32"),
        "heatmap": RNG.uniform(0, 1, (n, SIZE, SIZE)).astype("float32"),
        "label": RNG.integers(0, num_classes, n).astype("int32"),
        "token": np.ones(n, "float32"),
    }
    data.update(overrides)
    return data


def compiled(num_classes=3, **compile_kwargs):
    hmodel = HarmonizedModel(small_cnn(num_classes))
    hmodel.compile(optimizer=keras.optimizers.SGD(0.1), **compile_kwargs)
    return hmodel


def run(hmodel, how, data):
    if how == "fit_dataset":
        return hmodel.fit(data, verbose=0)
    if how == "fit":
        return hmodel.fit(tf.data.Dataset.from_tensor_slices(data).batch(len(data["label"])), verbose=0)
    if how == "train_on_batch":
        return hmodel.train_on_batch(data)
    return hmodel.evaluate(tf.data.Dataset.from_tensor_slices(data).batch(len(data["label"])), verbose=0)


def assert_refused_before_any_change(hmodel, how, data, error, match):
    before = [w.copy() for w in hmodel.get_weights()]  # BatchNormalization's moving statistics included
    with pytest.raises(error, match=match):
        run(hmodel, how, data)
    after = hmodel.get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    assert int(hmodel.optimizer.iterations.numpy()) == 0


# ----------------------------------------------------------------------------- HarmonizedModel: labels
@pytest.mark.parametrize("how", ["fit", "train_on_batch", "evaluate"])
def test_clickme_ids_on_a_ten_class_head_fail_in_the_graph_before_any_weight_changes(how):
    hmodel = compiled(num_classes=10)
    labels = np.array([3, 999, 0, 1, 2, 9, 10, 4], "int32")  # ImageNet/ClickMe ids on a 10-class fine-tune
    assert_refused_before_any_change(
        hmodel, how, batch(num_classes=10, label=labels),
        tf.errors.InvalidArgumentError, r"`label`[^\n]*\[0, 10\)[^\n]*\n?[^\n]*\[999 10\]",
    )


class SubclassedClassifier(keras.Model):
    """No symbolic outputs: the number of classes comes from a trace of the model."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv = keras.layers.Conv2D(4, 3, padding="same", activation="relu")
        self.norm = keras.layers.BatchNormalization()
        self.head = keras.layers.Dense(num_classes)

    def call(self, images, training=False):
        x = self.norm(self.conv(images / 255.0), training=training)
        return self.head(tf.reduce_mean(x, axis=(1, 2)))


def two_headed_cnn(num_classes):
    """Two outputs, the features and the logits (`output=1`)."""
    model = small_cnn(num_classes)
    return keras.Model(model.inputs, [model.layers[-2].output, model.outputs[0]])


@pytest.mark.parametrize("build, output", [(SubclassedClassifier, None), (two_headed_cnn, 1)])
def test_models_without_one_symbolic_output_also_refuse_labels_before_any_change(build, output):
    keras.utils.set_random_seed(0)
    model = build(10)
    model(np.zeros((1, SIZE, SIZE, 3), "float32"))  # built
    hmodel = HarmonizedModel(model, output=output)
    hmodel.compile(optimizer=keras.optimizers.SGD(0.1))
    assert_refused_before_any_change(
        hmodel, "fit", batch(label=np.array([3, 999, 0, 1, 2, 9, 10, 4], "int32")),
        tf.errors.InvalidArgumentError, r"`label`[^\n]*\[0, 10\)",
    )
    assert hmodel._logits_width == 10


def test_negative_label_fails_eagerly_with_the_range_and_the_value():
    hmodel = compiled(run_eagerly=True)
    labels = np.array([0, 1, -1, 2, 0, 1, 2, 0], "int64")
    assert_refused_before_any_change(
        hmodel, "train_on_batch", batch(label=labels),
        ValueError, r"`label` must hold class ids in \[0, 3\).*out-of-range value\(s\) \[-1\].*index \[2\]",
    )


@pytest.mark.parametrize("run_eagerly", [False, True])
def test_float_labels_that_are_not_whole_numbers_are_refused_not_rounded(run_eagerly):
    hmodel = compiled(run_eagerly=run_eagerly)
    labels = np.array([0, 1, 2.4, 2, 0, 1, 2, 0], "float32")
    error = ValueError if run_eagerly else tf.errors.InvalidArgumentError
    assert_refused_before_any_change(hmodel, "fit", batch(label=labels), error, r"`label`.*(whole|\[2\.4)")


def test_whole_number_float_labels_train_exactly_like_integer_ids():
    data = batch()
    losses = []
    for labels in (data["label"], data["label"].astype("float32"), data["label"][:, None].astype("float64")):
        hmodel = compiled()
        losses.append(run(hmodel, "fit", dict(data, label=labels)).history["loss"][0])
    assert losses[1] == pytest.approx(losses[0], rel=1e-6) and losses[2] == pytest.approx(losses[0], rel=1e-6)


def test_one_hot_and_soft_labels_keep_working():
    data = batch()
    onehot = np.eye(3, dtype="float32")[data["label"]]
    soft = 0.8 * onehot + 0.2 * RNG.dirichlet(np.ones(3), 8).astype("float32")
    results = [run(compiled(), "fit", dict(data, label=labels)).history["loss"][0] for labels in
               (data["label"], onehot, soft)]
    assert results[0] == pytest.approx(results[1], rel=1e-6)
    assert np.isfinite(results[2]) and results[2] != results[1]


@pytest.mark.parametrize(
    "row, match",
    [
        ([0.0, 0.0, 0.0], r"`label`.*not all zero"),  # what tf.one_hot makes of an out-of-range id upstream
        ([1.5, -0.5, 0.0], r"`label`.*>= 0"),
        ([np.nan, 1.0, 0.0], r"`label`.*finite"),
    ],
)
def test_bad_one_hot_rows_are_refused(row, match):
    data = batch()
    labels = np.eye(3, dtype="float32")[data["label"]]
    labels[4] = row
    assert_refused_before_any_change(compiled(), "fit", dict(data, label=labels), tf.errors.InvalidArgumentError, match)


def test_one_hot_labels_of_the_wrong_width_name_the_number_of_logits():
    data = batch()
    with pytest.raises(ValueError, match=r"`label`.*\(N, 3\) \(the number of logits\); got shape \(None, 5\)"):
        run(compiled(), "fit", dict(data, label=np.eye(5, dtype="float32")[data["label"]]))


# ----------------------------------------------------------------------------- HarmonizedModel: tokens
@pytest.mark.parametrize("bad", [-1.0, 1.5, np.nan])
@pytest.mark.parametrize("how", ["fit", "evaluate"])
def test_tokens_outside_zero_one_are_refused_in_the_graph(bad, how):
    tokens = np.ones(8, "float32")
    tokens[3] = bad  # -1 would reverse the harmonization term: reward disagreeing with people
    assert_refused_before_any_change(
        compiled(), how, batch(token=tokens), tf.errors.InvalidArgumentError, r"`token`[^\n]*\[0, 1\]"
    )


def test_negative_token_fails_eagerly_with_its_value_and_index():
    tokens = np.array([1, 0, 1, -1, 1, 1, 1, 1], "float32")
    assert_refused_before_any_change(
        compiled(run_eagerly=True), "train_on_batch", batch(token=tokens),
        ValueError, r"`token` must be finite and in \[0, 1\].*\[-1\.\] at index \[3\]",
    )


@pytest.mark.parametrize("run_eagerly", [False, True])
def test_two_tokens_per_example_name_the_expected_and_actual_shape(run_eagerly):
    got = r"\(None, 2\)" if not run_eagerly else r"\(8, 2\)"
    assert_refused_before_any_change(
        compiled(run_eagerly=run_eagerly), "fit", batch(token=np.ones((8, 2), "float32")),
        ValueError, rf"`token` must have shape \(N,\) or \(N, 1\).*got shape {got}",
    )


def test_token_column_and_vector_give_the_same_step():
    data = batch(token=(np.arange(8) % 2).astype("float32"))
    vector = run(compiled(), "fit", data).history
    column = run(compiled(), "fit", dict(data, token=data["token"][:, None])).history
    assert vector.keys() == column.keys() and vector["harmonization"][0] > 0
    for key in vector:
        assert column[key][0] == pytest.approx(vector[key][0], rel=1e-6)


@pytest.mark.parametrize("run_eagerly", [False, True])
def test_tokens_of_another_batch_size_are_refused(run_eagerly):
    # A (1,) token used to apply to every example, a (2N,) one to fail with a broadcast error elsewhere.
    data = batch(token=np.ones(1, "float32"))
    if run_eagerly:
        error = ValueError
        match = r"`token` must have one value per example, shape \(8,\) or \(8, 1\); got shape \(1,\)"
    else:
        error, match = tf.errors.InvalidArgumentError, r"`token` must hold one finite value in \[0, 1\] per example"
    assert_refused_before_any_change(compiled(run_eagerly=run_eagerly), "fit_dataset",
                                     tf.data.Dataset.from_tensors(data), error, match)


# ----------------------------------------------------------------------------- HarmonizedModel: heatmaps, once
@pytest.mark.parametrize("run_eagerly", [False, True])
def test_nan_heatmaps_are_refused_before_any_weight_changes(run_eagerly):
    heatmaps = RNG.uniform(0, 1, (8, SIZE, SIZE)).astype("float32")
    heatmaps[2, 3, 4] = np.nan
    error = ValueError if run_eagerly else tf.errors.InvalidArgumentError
    assert_refused_before_any_change(
        compiled(run_eagerly=run_eagerly), "fit", batch(heatmap=heatmaps), error, r"`heatmap` contains NaN or Inf"
    )


@pytest.mark.parametrize("run_eagerly", [False, True])
def test_the_loss_does_not_check_again_what_the_step_checked(monkeypatch, run_eagerly):
    # The step checks its batch once (issue 12, §3); the loss functions' own argument checks are skipped.
    from harmonization import losses

    def checked_again(*args, **kwargs):
        raise AssertionError("the harmonization loss checked its arguments again inside the step")

    for name in ("_as_maps", "_as_tokens", "_check_finite", "_check_same_shape", "check_int", "_check_epsilon"):
        monkeypatch.setattr(losses, name, checked_again)
    logs = compiled(run_eagerly=run_eagerly).train_on_batch(batch(), return_dict=True)
    assert np.isfinite(logs["harmonization"]) and logs["harmonization"] > 0
    with pytest.raises(AssertionError, match="checked its arguments again"):  # the public function checks
        losses.harmonization_loss(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)))


# ----------------------------------------------------------------------------- hyper-parameters
@pytest.mark.parametrize(
    "argument, value, match",
    [
        ("lambda_harmonization", float("inf"), r"`lambda_harmonization` must be a finite number >= 0; got inf"),
        ("lambda_harmonization", float("nan"), r"`lambda_harmonization` must be a finite number >= 0; got nan"),
        ("lambda_weights", -1e-5, r"`lambda_weights` must be a finite number >= 0; got -1e-05"),
        ("lambda_weights", "1e-5", r"`lambda_weights` must be a finite number >= 0; got '1e-5'"),
        ("epsilon", 0.0, r"`epsilon` must be a finite number > 0 .*blank map.*; got 0\.0"),
        ("epsilon", -1e-5, r"`epsilon` must be a finite number > 0.*; got -1e-05"),
        ("epsilon", float("nan"), r"`epsilon` must be a finite number > 0.*; got nan"),
        ("pyramid_levels", True, r"`pyramid_levels` must be an integer >= 1; got True"),
    ],
)
def test_bad_hyper_parameters_name_the_argument_the_expected_and_the_actual_value(argument, value, match):
    with pytest.raises(ValueError, match=match):
        HarmonizedModel(small_cnn(), **{argument: value})


def test_valid_hyper_parameters_are_kept_as_floats():
    hmodel = HarmonizedModel(small_cnn(), lambda_harmonization=0, lambda_weights=np.float32(2e-5), epsilon=1e-3)
    assert (hmodel.lambda_harmonization, hmodel.epsilon) == (0.0, 1e-3)
    assert hmodel.lambda_weights == pytest.approx(2e-5) and isinstance(hmodel.lambda_weights, float)


# ----------------------------------------------------------------------------- the shared checks
def test_check_class_labels_in_a_graph_runs_before_what_depends_on_the_labels():
    counter = tf.Variable(0)

    @tf.function
    def step(labels):
        labels = _validation.check_class_labels(labels, 4)
        with tf.control_dependencies([labels]):
            counter.assign_add(1)
        return labels

    np.testing.assert_array_equal(step(tf.constant([0, 3])), [0, 3])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"`label`[^\n]*\[0, 4\)[^\n]*\n?[^\n]*\[4\]"):
        step(tf.constant([0, 4]))
    assert int(counter.numpy()) == 1


def test_check_int_refuses_bools_and_names_the_argument():
    assert _validation.check_int(np.int64(3), "levels", minimum=1) == 3
    assert _validation.is_int(7) and not _validation.is_int(True) and not _validation.is_int(np.bool_(True))
    assert not _validation.is_int(2.0)
    with pytest.raises(ValueError, match=r"^`levels` must be an integer >= 1; got True\.$"):
        _validation.check_int(True, "levels", minimum=1)
    with pytest.raises(ValueError, match=r"^`batch_size` must be a positive integer; got 0\.$"):
        _validation.check_int(0, "batch_size", minimum=1, expected="a positive integer")
    assert _validation.is_number(0.5) and _validation.is_number(np.float32(1)) and not _validation.is_number(False)


def test_the_number_checks_do_not_import_tensorflow():
    # harmonization.synthetic is NumPy only; its argument checks come from _numbers (exported by _validation).
    import subprocess
    import sys

    script = ("import sys, harmonization.synthetic as s\n"
              "list(s.generate_split(0, 'test', 1, 32))\n"
              "print('TF', 'tensorflow' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "TF False" in result.stdout


def test_label_layout_reads_labels_as_one_hot_labels_does():
    assert _validation.label_layout((8,), 3) == "ids"
    assert _validation.label_layout((8, 1), 3) == "ids"
    assert _validation.label_layout((8, 1), 1) == "ids"
    assert _validation.label_layout((8, 3), 3) == "soft"
    assert _validation.label_layout((8, 3), None) == "soft"
    with pytest.raises(ValueError, match=r"`label`.*got shape \(8, 3, 1\)"):
        _validation.label_layout((8, 3, 1), 3)
