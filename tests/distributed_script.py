"""Run by tests/test_distributed.py in fresh processes (device set-up must precede TensorFlow's start).

    python distributed_script.py mirrored OUT.npz
        one harmonized step on one device and under MirroredStrategy over 2 logical CPUs,
        from the same weights on the same global batch; saves both results.
    python distributed_script.py worker OUT.npz   (with TF_CONFIG set)
        a MultiWorkerMirroredStrategy worker: fits a few harmonized steps, saves its weights.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

GLOBAL_BATCH = 8
SIZE = 16


def make_model(keras):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu")(x)
    x = keras.layers.LayerNormalization()(x)
    x = keras.layers.Conv2D(6, 3, strides=2, padding="same", activation="gelu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x))


def make_data(steps):
    rng = np.random.default_rng(1)
    n = GLOBAL_BATCH * steps
    return {
        "image": rng.uniform(0, 255, (n, SIZE, SIZE, 3)).astype("float32"),
        "heatmap": rng.uniform(0, 1, (n, SIZE, SIZE, 1)).astype("float32"),
        "label": rng.integers(0, 3, n).astype("int32"),
        "token": (rng.uniform(size=n) > 0.3).astype("float32"),
    }


def dataset(steps):
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return tf.data.Dataset.from_tensor_slices(make_data(steps)).batch(GLOBAL_BATCH).with_options(options)


def fit_one(keras, harmonization, weights, strategy=None):
    scope = strategy.scope() if strategy is not None else tf.distribute.get_strategy().scope()
    with scope:
        model = make_model(keras)
        model.set_weights(weights)
        hmodel = harmonization.HarmonizedModel(model, lambda_weights=1e-3)
        hmodel.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    history = hmodel.fit(dataset(1), epochs=1, verbose=0).history
    return model.get_weights(), history


def mirrored(out):
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras

    import harmonization

    weights = make_model(keras).get_weights()
    single_w, single_h = fit_one(keras, harmonization, weights)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    mirrored_w, mirrored_h = fit_one(keras, harmonization, weights, strategy)
    arrays = {f"single_{i}": w for i, w in enumerate(single_w)}
    arrays.update({f"mirrored_{i}": w for i, w in enumerate(mirrored_w)})
    arrays.update({f"initial_{i}": w for i, w in enumerate(weights)})
    for key in ("loss", "cross_entropy", "harmonization"):
        arrays[f"single_log_{key}"] = np.array(single_h[key])
        arrays[f"mirrored_log_{key}"] = np.array(mirrored_h[key])
    np.savez(out, **arrays)


def worker(out):
    import keras

    import harmonization

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = make_model(keras)
        hmodel = harmonization.HarmonizedModel(model, lambda_weights=1e-3)
        hmodel.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    history = hmodel.fit(dataset(3), epochs=2, verbose=0).history
    np.savez(out, loss=np.array(history["loss"]), **{f"w{i}": w for i, w in enumerate(model.get_weights())})


if __name__ == "__main__":
    {"mirrored": mirrored, "worker": worker}[sys.argv[1]](sys.argv[2])
