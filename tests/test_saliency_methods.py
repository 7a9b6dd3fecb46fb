"""Saliency methods (`harmonization.saliency_methods`) against direct references, and where they plug in.

SmoothGrad is checked against a float64 NumPy loop over the documented noise on a model whose input
gradient has a closed form; Integrated Gradients against its closed form on a linear model and against
the completeness axiom on a nonlinear one; the published maps against `input_gradients`/`saliency_map`.
"""

import numpy as np
import keras
import pytest
import tensorflow as tf

from harmonization import evaluate_command, saliency_methods
from harmonization.evaluation import evaluate_alignment
from harmonization.harmonized_model import HarmonizedModel
from harmonization.losses import harmonization_loss
from harmonization.metrics import spearman
from harmonization.saliency import channel_max_abs, input_gradients, logits_at, saliency_map, saliency_view
from harmonization.saliency_methods import (
    GradientSaliency,
    IntegratedGradients,
    SmoothGrad,
    get_saliency_method,
    list_saliency_methods,
    register_saliency_method,
)

SIZE = 6
CLASSES = 3
HIDDEN = 5


@pytest.fixture(autouse=True)
def _registry_restored():
    """Tests that register methods leave the registry as they found it."""
    saved = dict(saliency_methods._REGISTRY)
    yield
    saliency_methods._REGISTRY.clear()
    saliency_methods._REGISTRY.update(saved)


def images_and_labels(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (n, SIZE, SIZE, 3)).astype(np.float32), rng.integers(0, CLASSES, n)


def mlp(hidden_activation="tanh"):
    """Rescaling to [-1, 1] (the preprocessing, split off by the saliency), then a one-hidden-layer MLP."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = keras.layers.Flatten()(x)
    if hidden_activation is not None:
        x = keras.layers.Dense(HIDDEN, activation=hidden_activation, name="hidden")(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES, name="logits")(x))


def conv_net():
    keras.utils.set_random_seed(2)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="tanh")(x)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="softplus")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES)(x))


def preprocessed(images):
    return images.astype(np.float64) / 127.5 - 1.0


def mlp_input_gradient(model, x, labels):
    """d logit_y / d x of `mlp()` at preprocessed points x (N, H, W, C), in float64: W1 ((1 - a^2) * w2_y)."""
    w1, b1 = (v.astype(np.float64) for v in model.get_layer("hidden").get_weights())
    w2, _ = (v.astype(np.float64) for v in model.get_layer("logits").get_weights())
    a = np.tanh(x.reshape(len(x), -1) @ w1 + b1)
    return (((1 - a**2) * w2[:, labels].T) @ w1.T).reshape(x.shape)


# ----------------------------------------------------------------------------- the published maps
def test_the_published_maps_are_todays_functions_and_logits_come_from_the_same_pass():
    model = conv_net()
    images, labels = images_and_labels()
    for name, reference in (("gradient_mean", input_gradients), ("gradient_max_abs", saliency_map)):
        logits, maps = get_saliency_method(name).logits_and_maps(model, images, labels)
        np.testing.assert_array_equal(maps.numpy(), reference(model, images, labels).numpy())
        np.testing.assert_allclose(logits.numpy(), model(images).numpy(), rtol=1e-6, atol=1e-6)
    # The two reductions of one gradient: signed channel mean, and max |.| over channels.
    mean = get_saliency_method("gradient_mean")(model, images, labels).numpy()
    max_abs = get_saliency_method("gradient_max_abs")(model, images, labels).numpy()
    assert (mean < 0).any() and (max_abs >= 0).all() and (max_abs >= np.abs(mean) - 1e-7).all()


def test_the_console_names_are_the_registry():
    assert evaluate_command.SALIENCY_METHODS == tuple(list_saliency_methods())
    assert evaluate_command.DEFAULT_SALIENCY_METHOD in list_saliency_methods(trainable=True)
    assert list_saliency_methods(trainable=True) == ["gradient_mean", "gradient_max_abs"]


# ----------------------------------------------------------------------------- SmoothGrad
def smoothgrad_reference(model, images, labels, samples, noise_level, seed):
    """Smilkov et al. 2017 in float64 NumPy: mean gradient over the documented noise, then max |.| over channels."""
    x = preprocessed(images)
    sigma = noise_level * (x.max(axis=(1, 2, 3)) - x.min(axis=(1, 2, 3)))
    total = np.zeros_like(x)
    for s in range(samples):
        noise = tf.random.stateless_normal(x.shape, seed=[seed, s], dtype=tf.float32).numpy().astype(np.float64)
        total += mlp_input_gradient(model, x + sigma[:, None, None, None] * noise, labels)
    return total / samples


@pytest.mark.parametrize("batch_size", [1, 8, 1000])
def test_smoothgrad_matches_a_float64_numpy_loop_over_the_same_noise(batch_size):
    model = mlp()
    images, labels = images_and_labels()
    method = SmoothGrad(samples=7, noise_level=0.3, seed=5, batch_size=batch_size)
    expected = smoothgrad_reference(model, images, labels, 7, 0.3, seed=5)
    got = method.attributions(model, images, labels).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(method(model, images, labels).numpy(), np.abs(expected).max(-1), rtol=1e-4, atol=1e-7)
    # The noise matters: without it, or with other noise, the reference is not met.
    plain = mlp_input_gradient(model, preprocessed(images), labels)
    assert np.abs(got - plain).max() > 100 * np.abs(got - expected).max()
    other = SmoothGrad(samples=7, noise_level=0.3, seed=6).attributions(model, images, labels).numpy()
    assert np.abs(other - expected).max() > 100 * np.abs(got - expected).max()


def test_smoothgrad_without_noise_is_the_evaluation_map_and_a_seed_of_none_draws_new_noise():
    model = conv_net()
    images, labels = images_and_labels()
    quiet = SmoothGrad(samples=3, noise_level=0.0)(model, images, labels).numpy()
    np.testing.assert_allclose(quiet, saliency_map(model, images, labels).numpy(), rtol=1e-5, atol=1e-8)
    fresh = SmoothGrad(samples=2, seed=None)
    assert not np.allclose(fresh(model, images, labels).numpy(), fresh(model, images, labels).numpy())
    seeded = SmoothGrad(samples=2, seed=3)
    np.testing.assert_array_equal(seeded(model, images, labels).numpy(), seeded(model, images, labels).numpy())


def test_smoothgrad_runs_in_a_relaxed_tf_function_trace():
    """evaluate_alignment traces methods with reduce_retracing: the batch size may be unknown."""
    model = conv_net()
    images, labels = images_and_labels(5)
    method = SmoothGrad(samples=4, seed=2)
    traced = tf.function(lambda x, y: method(model, x, y),
                         input_signature=[tf.TensorSpec([None, SIZE, SIZE, 3]), tf.TensorSpec([None], tf.int64)])
    np.testing.assert_allclose(traced(images, labels).numpy(), method(model, images, labels).numpy(),
                               rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("method", [SmoothGrad(samples=50, batch_size=4), IntegratedGradients(steps=50, batch_size=4)])
def test_a_traced_method_holds_the_model_a_few_times_not_once_per_point(method):
    """The passes run in a tf.while_loop: tracing 50 points must not copy the network 50 times."""

    class Counted(keras.Model):
        def __init__(self):
            super().__init__()
            self.calls = 0
            self.inner = conv_net()

        def call(self, x, training=False):
            self.calls += 1
            return self.inner(x, training=training)

    model = Counted()
    images, labels = images_and_labels(2)
    model(images)
    model.calls = 0
    traced = tf.function(lambda x, y: method(model, x, y))
    expected = method(model, images, labels).numpy()
    model.calls = 0
    np.testing.assert_allclose(traced(images, labels).numpy(), expected, rtol=1e-5, atol=1e-8)
    assert model.calls <= 3  # the logits, a full pass (the loop body), the remainder pass


# ----------------------------------------------------------------------------- Integrated Gradients
@pytest.mark.parametrize("rule", ["midpoint", "right", "trapezoid"])
@pytest.mark.parametrize("baseline", [0.0, 0.25])
def test_integrated_gradients_of_a_linear_model_is_the_closed_form(rule, baseline):
    """For logit_y = w_y . x + b: IG = (x - baseline) * w_y exactly, whatever the steps."""
    model = mlp(hidden_activation=None)
    images, labels = images_and_labels()
    w = model.get_layer("logits").get_weights()[0].astype(np.float64)  # (H*W*C, classes)
    expected = (preprocessed(images) - baseline) * w[:, labels].T.reshape(images.shape)
    method = IntegratedGradients(steps=3, rule=rule, baseline=baseline, batch_size=5)
    np.testing.assert_allclose(method.attributions(model, images, labels).numpy(), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(method(model, images, labels).numpy(), np.abs(expected.sum(-1)), rtol=1e-5, atol=1e-7)


def completeness_gap(method, model, images, labels):
    """|sum of attributions - (logit(x) - logit(baseline))| / |logit(x) - logit(baseline)|, per image."""
    view, tensor = saliency_view(model, images)
    x = view.split(tensor)
    rows = np.arange(len(labels))
    f = logits_at(view, x).numpy()[rows, labels]
    f0 = logits_at(view, tf.zeros_like(x) + method.baseline).numpy()[rows, labels]
    total = method.attributions(model, images, labels).numpy().sum(axis=(1, 2, 3))
    return np.abs(total - (f - f0)) / np.abs(f - f0)


def test_integrated_gradients_is_complete_on_a_nonlinear_model():
    """Sundararajan et al.'s completeness axiom, with the baseline at 0 in the preprocessed space."""
    model = conv_net()
    images, labels = images_and_labels()
    assert completeness_gap(IntegratedGradients(steps=128), model, images, labels).max() < 1e-4
    # The check can fail: one step is not enough on this model, and the midpoint rule beats the right sum.
    assert completeness_gap(IntegratedGradients(steps=1, rule="right"), model, images, labels).max() > 1e-2
    coarse_right = completeness_gap(IntegratedGradients(steps=4, rule="right"), model, images, labels)
    coarse_mid = completeness_gap(IntegratedGradients(steps=4, rule="midpoint"), model, images, labels)
    assert coarse_mid.max() < coarse_right.max()


def test_integrated_gradients_do_not_depend_on_the_batching():
    model = conv_net()
    images, labels = images_and_labels(3)
    one = IntegratedGradients(steps=7, batch_size=1).attributions(model, images, labels).numpy()
    many = IntegratedGradients(steps=7, batch_size=100).attributions(model, images, labels).numpy()
    np.testing.assert_allclose(one, many, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("make, match", [
    (lambda: IntegratedGradients(steps=0), "`steps`"),
    (lambda: IntegratedGradients(rule="simpson"), "`rule`"),
    (lambda: IntegratedGradients(steps=1, rule="trapezoid"), "`steps`"),
    (lambda: SmoothGrad(samples=0), "`samples`"),
    (lambda: SmoothGrad(noise_level=-0.1), "`noise_level`"),
    (lambda: SmoothGrad(batch_size=0), "`batch_size`"),
    (lambda: SmoothGrad(seed=1.5), "`seed`"),
])
def test_bad_hyper_parameters_are_refused_by_name(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ----------------------------------------------------------------------------- the registry
def test_an_unknown_name_lists_the_registered_ones_and_the_closest():
    with pytest.raises(ValueError) as caught:
        get_saliency_method("integrated_gradient")
    message = str(caught.value)
    assert "Did you mean 'integrated_gradients'?" in message
    assert all(repr(name) in message for name in list_saliency_methods())
    with pytest.raises(TypeError):
        get_saliency_method(3)


def test_registering_a_method_makes_it_trainable_by_name_and_saved_by_name():
    squares = GradientSaliency("gradient_square_sum", lambda g: tf.reduce_sum(tf.square(g), axis=-1))
    assert register_saliency_method(squares) is squares
    assert get_saliency_method("gradient_square_sum") is squares
    with pytest.raises(ValueError, match="already registered"):
        register_saliency_method(GradientSaliency("gradient_square_sum", channel_max_abs))
    model = mlp()
    hmodel = HarmonizedModel(model, saliency="gradient_square_sum")
    config = hmodel.get_config()
    assert config["saliency"] == "gradient_square_sum"
    assert HarmonizedModel.from_config(config).saliency_method is squares
    # An unregistered method trains, but cannot be saved under a name that would load something else.
    stray = HarmonizedModel(model, saliency=GradientSaliency("gradient_mean", channel_max_abs))
    with pytest.raises(ValueError, match="register_saliency_method"):
        stray.get_config()


def test_the_default_config_saves_the_published_training_map():
    hmodel = HarmonizedModel(mlp())
    assert hmodel.get_config()["saliency"] == "gradient_mean"
    config = hmodel.get_config()
    del config["saliency"]  # a model saved before the option existed
    assert HarmonizedModel.from_config(config).saliency_method.name == "gradient_mean"


@pytest.mark.parametrize("method", ["smoothgrad", "integrated_gradients", SmoothGrad(samples=2),
                                    lambda model, images, labels: tf.zeros(tf.shape(images)[:3])])
def test_training_with_a_method_not_differentiable_twice_is_refused_clearly(method):
    with pytest.raises(ValueError) as caught:
        HarmonizedModel(mlp(), saliency=method)
    message = str(caught.value)
    assert "`saliency`" in message and "'gradient_mean', 'gradient_max_abs'" in message
    assert repr(get_saliency_method(method).name) in message


def test_training_on_the_evaluation_map_uses_it_in_the_loss():
    model = conv_net()
    images, labels = images_and_labels()
    heatmaps = np.random.default_rng(1).uniform(0, 1, (4, SIZE, SIZE)).astype(np.float32)
    data = {"image": images, "heatmap": heatmaps, "label": labels}
    for name, reference in (("gradient_mean", input_gradients), ("gradient_max_abs", saliency_map)):
        hmodel = HarmonizedModel(model, saliency=name)
        hmodel.compile()
        terms = hmodel._forward(data, training=False)
        _, _, harm = hmodel._loss_terms(*terms, training=False)
        expected = harmonization_loss(reference(model, images, labels), heatmaps)
        np.testing.assert_allclose(float(harm), float(expected), rtol=1e-5)


# ----------------------------------------------------------------------------- evaluate_alignment
def alignment_data(n=5, seed=0):
    images, labels = images_and_labels(n, seed)
    heatmaps = np.random.default_rng(seed + 1).uniform(0, 1, (n, SIZE, SIZE)).astype(np.float32)
    return images, heatmaps, labels


@pytest.mark.parametrize("method", ["smoothgrad", IntegratedGradients(steps=8)])
def test_evaluate_alignment_scores_the_chosen_method(method):
    model = conv_net()
    images, heatmaps, labels = alignment_data()
    batches = [(images[:3], heatmaps[:3], labels[:3]), (images[3:], heatmaps[3:], labels[3:])]
    result = evaluate_alignment(model, batches, saliency=method, verbose=0)
    maps = np.concatenate([get_saliency_method(method)(model, x, y) for x, _, y in batches])
    np.testing.assert_allclose(result["spearman"], spearman(maps, heatmaps).numpy(), atol=1e-6)
    assert set(result) == {"spearman", "dice", "iou", "spearman_mean", "dice_mean", "iou_mean",
                           "alignment_score", "num_images", "accuracy"}
    default = evaluate_alignment(model, batches, verbose=0)
    assert not np.allclose(default["spearman"], result["spearman"])
    np.testing.assert_allclose(default["spearman"], spearman(saliency_map(model, images, labels), heatmaps), atol=1e-6)


def test_evaluate_alignment_takes_a_plain_function_of_the_model():
    model = conv_net()
    images, heatmaps, labels = alignment_data()
    calls = []

    def brightness(model_, images_, labels_):  # eager: NumPy is allowed
        calls.append(model_ is model)
        return np.asarray(images_)[..., 0]

    result = evaluate_alignment(model, [(images, heatmaps, labels)], saliency=brightness, verbose=0)
    np.testing.assert_allclose(result["spearman"], spearman(images[..., 0], heatmaps).numpy(), atol=1e-6)
    predicted = np.argmax(model(images).numpy(), axis=-1)
    assert calls == [True] and result["accuracy"] == pytest.approx(np.mean(predicted == labels))


def test_saliency_is_refused_for_an_explainer_callable():
    images, heatmaps, labels = alignment_data()
    with pytest.raises(ValueError, match="`saliency` applies to Keras models"):
        evaluate_alignment(lambda x, y: x[..., 0], [(images, heatmaps, labels)], saliency="smoothgrad", verbose=0)
