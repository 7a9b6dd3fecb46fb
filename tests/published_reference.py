"""Independent re-implementations of the published serre-lab/Harmonization 0.0.9 formulas (ffe1c49), written
from the published source with NumPy, SciPy and plain TensorFlow ops (nothing from `harmonization`), used as
references by the tests (imported by name: pytest puts tests/ on sys.path).

- `models/preprocess.py`: `published_preprocess_input` (with the literal ImageNet `MEAN` and `STD`);
- `common/blur.py` and `common/clickme_dataset.py`: `published_kernel`, `published_parse`;
- `evaluation/metrics.py`: `published_dice`, `published_iou`, `published_metrics`;
- xplique's `Saliency`, as `evaluation/clickme.py` uses it: `published_input_gradients`, `published_saliency`;
- `training/loss.py`: `published_standardize_cut`, `published_pyramid`, `published_harmonizer_gradients`.
"""

import keras
import numpy as np
import tensorflow as tf
from scipy import stats

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


# --- models/preprocess.py ------------------------------------------------------------------------------------


def published_preprocess_input(images):
    """`preprocess_input`: images / 255, minus the ImageNet mean, over the ImageNet std (NumPy promotion)."""
    return (images / 255.0 - MEAN) / STD


# --- common/blur.py, common/clickme_dataset.py ---------------------------------------------------------------


def published_kernel(size=10, sigma=10):
    """`gaussian_kernel` as a 2-D float64 array: its asymmetric grid, x = -5..4 and y = 4..-5 for size 10."""
    xs, ys = np.meshgrid(
        np.arange(-(size - 1) // 2, (size - 1) // 2 + 1), np.arange((size - 1) // 2, -(size - 1) // 2 - 1, -1)
    )
    kernel = np.exp(-(xs**2 + ys**2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)
    return kernel / kernel.sum()


def published_parse(record):
    """`parse_clickme_prototype`: image (224, 224, 3), blurred heatmap (224, 224, 1), one-hot label (1000,)."""
    features = {
        "image": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "heatmap": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "label": tf.io.FixedLenFeature([], tf.int64, default_value=0),
    }
    example = tf.io.parse_single_example(record, features)
    image = tf.cast(tf.reshape(tf.io.decode_jpeg(example["image"]), (256, 256, 3)), tf.float32)
    image = tf.image.resize(image, (224, 224), method="bilinear")
    heatmap = tf.cast(tf.reshape(tf.io.decode_jpeg(example["heatmap"]), (256, 256, 1)), tf.float32)
    heatmap = tf.image.resize(heatmap, (64, 64), method="bilinear")
    kernel = tf.constant(published_kernel()[:, :, None, None], tf.float32)
    heatmap = tf.nn.conv2d(heatmap[None], kernel, [1, 1, 1, 1], "SAME")[0]
    heatmap = tf.image.resize(heatmap, (224, 224), method="bilinear")
    return image, heatmap, tf.one_hot(tf.cast(example["label"], tf.int32), 1000)


# --- evaluation/metrics.py (EPSILON = 1e-9) ---------------------------------------------------------------------


def published_dice(a, b, percentile=10):
    """`dice` of two (H, W) maps, each cut at its (100 - percentile)th percentile.

    The mask counts are exact in any float type; the ratio is taken in float64, as 0.0.9 computed it under the
    NumPy of its time (a float32 scalar times a Python float was a float64 before NumPy 2).
    """
    a = (a > np.percentile(a, 100 - percentile, (0, 1))).astype(np.float32)
    b = (b > np.percentile(b, 100 - percentile, (0, 1))).astype(np.float32)
    return 2.0 * np.sum(a * b, dtype=np.float64) / (np.sum(a + b, dtype=np.float64) + 1e-9)


def published_iou(a, b, percentile=10):
    """`intersection_over_union` of two (H, W) maps, each cut at its (100 - percentile)th percentile."""
    a = a > np.percentile(a, 100 - percentile, (0, 1))
    b = b > np.percentile(b, 100 - percentile, (0, 1))
    return np.sum(a & b) / (np.sum(a | b) + 1e-9)


def published_metrics(saliency, heatmaps, percentile=10):
    """Per-image Spearman, Dice and IoU of (N, H, W) saliency and human maps, both cast to float32 first."""
    spearman, dice, iou = [], [], []
    for a, b in zip(np.asarray(saliency, np.float32), np.asarray(heatmaps, np.float32)):
        spearman.append(stats.spearmanr(a.flatten(), b.flatten())[0])
        dice.append(published_dice(a, b, percentile))
        iou.append(published_iou(a, b, percentile))
    return np.array(spearman), np.array(dice), np.array(iou)


# --- xplique Saliency --------------------------------------------------------------------------------------


def published_input_gradients(model, inputs, onehot):
    """d sum(model(x) * onehot) / d x at x = `inputs` (already preprocessed), in float32."""
    inputs = tf.convert_to_tensor(inputs, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        score = tf.reduce_sum(model(inputs) * onehot, axis=-1)
    return tape.gradient(score, inputs)


def published_saliency(model, inputs, onehot):
    """xplique `Saliency`: max over channels of |d logit_label / d input|, as a NumPy (N, H, W) array."""
    return tf.reduce_max(tf.abs(published_input_gradients(model, inputs, onehot)), axis=-1).numpy()


# --- training/loss.py ------------------------------------------------------------------------------------------


def published_standardize_cut(maps, epsilon=1e-5):
    """`standardize_cut` over axes (1, 2): zero mean, unit population std + `epsilon`, then ReLU."""
    maps = maps - tf.reduce_mean(maps, (1, 2), keepdims=True)
    return tf.nn.relu(maps / (tf.math.reduce_std(maps, (1, 2), keepdims=True) + epsilon))


def published_pyramid(maps, levels):
    """The binomial (1 4 6 4 1) pyramid of (N, H, W, 1) maps: `maps` and `levels` stride-2 SAME blurs of it."""
    taps = np.array([1.0, 4.0, 6.0, 4.0, 1.0])
    kernel = tf.constant((np.outer(taps, taps) / 256.0)[:, :, None, None], tf.float32)
    pyramid = [maps]
    for _ in range(levels):
        maps = tf.nn.conv2d(maps, kernel, 2, "SAME")
        pyramid.append(maps)
    return pyramid


def published_harmonizer_gradients(model, images, heatmaps, labels, tokens=None, lambda_weights=1e-5):
    """`harmonizer_loss`: the gradients of one step, nested tapes on `model` at `images` (Keras 3 variable paths).

    `labels` are one-hot (or soft) (N, classes); `tokens` (N,) weight each image's harmonization term (None:
    no weighting, as every token 1).
    """
    images = tf.convert_to_tensor(images)
    with tf.GradientTape() as tape:
        with tf.GradientTape() as inner:
            inner.watch(images)
            y_pred = model(images, training=True)
            score = tf.reduce_sum(y_pred * labels, -1)
        saliency = published_standardize_cut(tf.reduce_mean(inner.gradient(score, images), -1))
        human = published_standardize_cut(heatmaps)
        human = human / (tf.reduce_max(human, (1, 2), keepdims=True) + 1e-6) * (
            tf.stop_gradient(tf.reduce_max(saliency, (1, 2), keepdims=True)) + 1e-6
        )
        ps, ph = published_pyramid(saliency[..., None], 5), published_pyramid(human[..., None], 5)
        squared = [tf.square(ps[i] - ph[i]) for i in range(5)]
        if tokens is not None:
            squared = [s * tokens[:, None, None, None] for s in squared]
        harmonization_term = tf.reduce_mean([tf.reduce_mean(s) for s in squared])
        cce = tf.reduce_mean(keras.losses.CategoricalCrossentropy(
            from_logits=True, reduction=None, label_smoothing=0.1)(labels, y_pred))
        words = ("bn/", "normalization", "embed", "Norm", "norm", "class_token")
        decayed = [v for v in model.trainable_variables if not any(w in v.path for w in words)]
        loss = cce + lambda_weights * tf.add_n([tf.nn.l2_loss(v) for v in decayed]) + harmonization_term
    return tape.gradient(loss, model.trainable_variables)
