"""HarmonizedModel as a user drives it: compile, fit, evaluate, save, reload, XLA, mixed precision."""

import inspect

import keras
import numpy as np
import pytest
import tensorflow as tf

import harmonization
from harmonization.harmonized_model import HarmonizedModel
from harmonization.losses import harmonization_loss

RNG = np.random.default_rng(11)
SIZE = 16


def small_cnn(num_classes=3, normalization=True, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    if normalization:
        x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    if normalization:
        x = keras.layers.LayerNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="small_cnn")


def arrays(n=16, tokens=False):
    data = {
        "image": RNG.uniform(0, 255, (n, SIZE, SIZE, 3)).astype("float32"),
        "heatmap": RNG.uniform(0, 1, (n, SIZE, SIZE, 1)).astype("float32"),
        "label": RNG.integers(0, 3, n).astype("int32"),
    }
    if tokens:
        data["token"] = (np.arange(n) % 2).astype("float32")
    return data


def dataset(n=16, batch=8, as_tuple=False, **kw):
    data = arrays(n, **kw)
    if as_tuple:
        return tf.data.Dataset.from_tensor_slices(tuple(data.values())).batch(batch)
    return tf.data.Dataset.from_tensor_slices(data).batch(batch)


def test_fit_logs_every_term_and_evaluate_logs_spearman():
    hmodel = HarmonizedModel(small_cnn())
    hmodel.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True))
    history = hmodel.fit(dataset(tokens=True), epochs=2, verbose=0)
    assert set(history.history) == {"loss", "cross_entropy", "harmonization", "accuracy"}
    assert all(np.isfinite(v).all() for v in history.history.values())
    logs = hmodel.evaluate(dataset(tokens=True), return_dict=True, verbose=0)
    assert {"loss", "cross_entropy", "harmonization", "accuracy", "spearman"} <= set(logs)
    assert -1 <= logs["spearman"] <= 1


@pytest.mark.parametrize("as_tuple", [False, True])
def test_dict_and_tuple_batches_give_the_same_step(as_tuple):
    weights = small_cnn().get_weights()
    losses = []
    for tuple_layout in (False, as_tuple):
        model = small_cnn()
        model.set_weights(weights)
        hmodel = HarmonizedModel(model)
        hmodel.compile(optimizer="sgd")
        global RNG
        RNG = np.random.default_rng(0)
        losses.append(hmodel.fit(dataset(as_tuple=tuple_layout), epochs=1, verbose=0).history["loss"][0])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_logged_loss_is_the_sum_of_its_terms():
    """Recompute one batch's loss by hand: CE (label smoothing 0.1) + harmonization + 1e-5 * L2."""
    model = small_cnn(normalization=False)
    hmodel = HarmonizedModel(model)
    hmodel.compile(optimizer=keras.optimizers.SGD(0.0))  # lr 0: weights stay, logs are the step's
    data = arrays(8)
    logs = hmodel.evaluate(tf.data.Dataset.from_tensor_slices(data).batch(8), return_dict=True, verbose=0)

    images = tf.constant(data["image"])
    with tf.GradientTape() as tape:
        tape.watch(images)
        logits = model(images)
        score = tf.reduce_sum(logits * tf.one_hot(data["label"], 3), -1)
    # The saliency is taken at the Rescaling(1/255) output (the preprocessed input, as published):
    # by the chain rule, 255 x the raw-pixel gradient.
    saliency = tf.reduce_mean(tape.gradient(score, images), -1) * 255.0
    onehot = tf.one_hot(data["label"], 3) * 0.9 + 0.1 / 3
    ce = float(tf.reduce_mean(-tf.reduce_sum(onehot * tf.nn.log_softmax(logits), -1)))
    harm = float(harmonization_loss(saliency, data["heatmap"]))
    l2 = sum(0.5 * float(tf.reduce_sum(tf.square(v))) for v in model.trainable_variables)
    assert logs["cross_entropy"] == pytest.approx(ce, rel=1e-5)
    assert logs["harmonization"] == pytest.approx(harm, rel=1e-5)
    assert logs["loss"] == pytest.approx(ce + harm + 1e-5 * l2, rel=1e-5)


def test_weight_decay_skips_normalisation_embedding_and_class_token():
    inputs = keras.Input((4,), dtype="int32")
    x = keras.layers.Embedding(10, 6, name="token_embed")(inputs)
    x = keras.layers.LayerNormalization(name="ln")(x)
    x = keras.layers.Dense(6, name="proj")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    outputs = keras.layers.Dense(3, name="head")(keras.layers.Flatten()(x))
    hmodel = HarmonizedModel(keras.Model(inputs, outputs))
    names = sorted(v.path for v in hmodel.decayed_weights())
    assert names == ["head/bias", "head/kernel", "proj/bias", "proj/kernel"]


def test_token_zero_examples_get_no_harmonization_term():
    hmodel = HarmonizedModel(small_cnn())
    hmodel.compile(optimizer=keras.optimizers.SGD(0.0))
    data = arrays(8)
    data["token"] = np.zeros(8, "float32")
    logs = hmodel.evaluate(tf.data.Dataset.from_tensor_slices(data).batch(8), return_dict=True, verbose=0)
    assert logs["harmonization"] == 0.0


def test_fit_without_compile_raises():
    with pytest.raises(ValueError, match="compile"):
        HarmonizedModel(small_cnn()).fit(dataset(), verbose=0)


def test_bad_batches_have_clear_errors():
    hmodel = HarmonizedModel(small_cnn())
    hmodel.compile()
    data = arrays(8)
    del data["heatmap"]
    with pytest.raises(ValueError, match=r"lacks the key\(s\) \['heatmap'\]"):
        hmodel.fit(tf.data.Dataset.from_tensor_slices(data).batch(8), verbose=0)
    data = arrays(8)
    data["heatmap"] = data["heatmap"][:, :8, :8]
    with pytest.raises(ValueError, match=r"`heatmap` spatial size \(8, 8\) does not match `image` spatial size \(16, 16\)"):
        hmodel.fit(tf.data.Dataset.from_tensor_slices(data).batch(8), verbose=0)
    with pytest.raises(ValueError, match="must be a dict"):
        hmodel.fit(tf.data.Dataset.from_tensor_slices((data["image"], data["label"])).batch(8), verbose=0)


def test_bad_hyper_parameters_are_refused():
    with pytest.raises(ValueError, match="`lambda_harmonization`"):
        HarmonizedModel(small_cnn(), lambda_harmonization=-1)
    with pytest.raises(ValueError, match="`label_smoothing`"):
        HarmonizedModel(small_cnn(), label_smoothing=1.5)
    with pytest.raises(ValueError, match="`pyramid_levels`"):
        HarmonizedModel(small_cnn(), pyramid_levels=0)
    # A huge count built a graph that never finished; past 16 levels every map is 1x1 anyway.
    with pytest.raises(ValueError, match=r"`pyramid_levels` must be an integer >= 1 no larger than 16; got 1000000"):
        HarmonizedModel(small_cnn(), pyramid_levels=10**6)
    with pytest.raises(ValueError, match=r"`levels` must be an integer >= 1 no larger than 16; got 17"):
        harmonization.harmonization_loss(np.zeros((1, 8, 8)), np.zeros((1, 8, 8)), levels=17)


def test_every_constructor_argument_is_in_get_config():
    hmodel = HarmonizedModel(small_cnn(), lambda_harmonization=2.0, pyramid_levels=3)
    config = hmodel.get_config()
    arguments = [p for p in inspect.signature(HarmonizedModel.__init__).parameters if p not in ("self", "kwargs")]
    assert set(arguments) <= set(config)
    clone = HarmonizedModel.from_config(config)
    assert clone.lambda_harmonization == 2.0 and clone.pyramid_levels == 3
    assert [layer.name for layer in clone.model.layers] == [layer.name for layer in hmodel.model.layers]


def test_wrapped_and_wrapper_models_save_and_reload(tmp_path):
    hmodel = HarmonizedModel(small_cnn(), lambda_weights=3e-5)
    hmodel.compile()
    hmodel.fit(dataset(), epochs=1, verbose=0)
    images = arrays(4)["image"]
    want = hmodel.model.predict(images, verbose=0)

    hmodel.model.save(tmp_path / "classifier.keras")
    reloaded = keras.saving.load_model(tmp_path / "classifier.keras")
    np.testing.assert_allclose(reloaded.predict(images, verbose=0), want, rtol=1e-6, atol=1e-6)

    hmodel.save(tmp_path / "harmonized.keras")
    rewrapped = keras.saving.load_model(tmp_path / "harmonized.keras")
    assert isinstance(rewrapped, HarmonizedModel) and rewrapped.lambda_weights == 3e-5
    np.testing.assert_allclose(rewrapped.predict(images, verbose=0), want, rtol=1e-6, atol=1e-6)
    rewrapped.fit(dataset(), epochs=1, verbose=0)  # training resumes


def test_compile_keeps_xla_off_unless_asked():
    # XLA would drop the step's label/token assertions; Keras's "auto" turns it on for GPUs.
    for asked, expected in (({}, False), ({"jit_compile": "auto"}, False), ({"jit_compile": True}, True)):
        hmodel = HarmonizedModel(small_cnn())
        hmodel.compile(optimizer="sgd", **asked)
        assert hmodel.jit_compile is expected


def test_jit_compile_gives_the_same_step_as_graph_mode():
    weights = small_cnn().get_weights()
    data = arrays(8)
    results = []
    for jit in (False, True):
        model = small_cnn()
        model.set_weights(weights)
        hmodel = HarmonizedModel(model)
        hmodel.compile(optimizer="sgd", jit_compile=jit)
        loss = hmodel.fit(tf.data.Dataset.from_tensor_slices(data).batch(8), epochs=1, verbose=0).history["loss"]
        results.append((loss[0], model.get_weights()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-4)
    # The updates are compared, relative to each variable's update: the weights after one SGD step differ from
    # the weights before by less than a loose tolerance on the weights themselves would hide.
    moved = 0
    for initial, graph, jit in zip(weights, results[0][1], results[1][1]):
        update = np.abs(graph - initial).max()
        assert np.abs((jit - initial) - (graph - initial)).max() <= 1e-3 * update + 1e-9, update
        moved += update > 0
    assert moved >= len(weights) // 2  # the step moved the weights it was compared on


def test_mixed_bfloat16_trains_with_float32_saliency_and_loss():
    previous = keras.config.dtype_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = small_cnn()
        hmodel = HarmonizedModel(model)
        hmodel.compile()
        history = hmodel.fit(dataset(), epochs=2, verbose=0)
        data = arrays(4)
        terms = hmodel._forward(data, training=False)
        assert terms[1].dtype == tf.float32 and terms[3].dtype == tf.float32  # logits, gradients
        total, _, harm = hmodel._loss_terms(*terms, training=False)
        assert total.dtype == tf.float32 and harm.dtype == tf.float32
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert np.isfinite(history.history["loss"]).all()
    assert history.history["harmonization"][-1] > 0


def test_harmonization_is_also_exported_at_the_package_root():
    assert harmonization.HarmonizedModel is HarmonizedModel
    assert harmonization.harmonization_loss is harmonization_loss
