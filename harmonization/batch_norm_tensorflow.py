"""Training-mode batch normalisation on TensorFlow's fused kernels, differentiable exactly twice.

Why: the harmonized step differentiates an input gradient with respect to the weights, so batch normalisation is
differentiated twice. Keras-TF builds training-mode batch normalisation from a dozen elementwise ops (moments,
then `tf.nn.batch_normalization`); TensorFlow differentiates each of them, then differentiates those gradients
again: on ResNet50V2 (160 px, batch 8, this 2-core CPU) batch normalisation was a third of the plain step and
~45% of the harmonized one. Here the forward pass and the first backward pass are TensorFlow's fused kernels
(`FusedBatchNormV3`, `FusedBatchNormGradV3`), and the second derivative is written out by hand (below), in
about ten passes over the activations. TensorFlow's own second derivative of the fused gradient
(`_FusedBatchNormGradGrad`) re-derives the backward pass with a tape: exact, but slower than the composite it
replaces, so it is not used.

The second derivative. Per channel, with N values, mean mu, r = (var + eps)^(-1/2), xh = (x - mu) r, and the
forward y = gamma xh + beta, the backward pass given gy is

    gx = (gamma r / N) (N gy - S1 - xh S2),  g_gamma = S2,  g_beta = S1,  where S1 = sum(gy), S2 = sum(gy xh).

Differentiating <a, gx> + a_gamma g_gamma + a_beta g_beta (a, a_gamma, a_beta: the cotangents of the three
outputs) gives, with A = sum(a), Ax = sum(a xh), Q = sum(a gy) and c = a_gamma - gamma r Ax / N:

    d/d gy    = (gamma r / N) (N a - A - xh Ax) + a_gamma xh + a_beta          (the backward pass applied to a)
    d/d gamma = (r / N) (N Q - S1 A - S2 Ax)
    d/d x     = r (G - mean(G) - xh mean(G xh)) - (Lr r^2 / N) xh,
                G = -(gamma r S2 / N) a + c gy,  Lr = gamma (Q - S1 A / N - S2 Ax / N)

(d xh_k / d x_j = r (delta_kj - 1/N - xh_k xh_j / N) and d r / d x_j = -r^2 xh_j / N). mean(G) and mean(G xh)
expand into the per-channel sums above, so d/dx is one weighted sum of a, gy and xh. The first term of d/d gy is
the fused backward kernel applied to a, which also returns A and Ax. tests/test_batch_norm_tensorflow.py checks
all of it in float32 against the float64 composite and finite differences. A third derivative is not provided
(the harmonized step needs two).
"""

from __future__ import annotations

import keras
import tensorflow as tf

#: The smallest epsilon cuDNN's fused batch normalisation accepts (CUDNN_BN_MIN_EPSILON is 1e-5; TensorFlow's
#: `tf.compat.v1.nn.fused_batch_norm` raises smaller ones to 1.001e-5). A layer with a smaller epsilon keeps
#: Keras's composite, so that no epsilon is ever changed.
MIN_EPSILON = 1.001e-5


def _fused_gradient(gy, x, gamma, reserve, epsilon):
    """(gx, g_gamma, g_beta) of the fused forward pass, from TensorFlow's fused backward kernel."""
    gx, g_gamma, g_beta, _, _ = tf.raw_ops.FusedBatchNormGradV3(
        y_backprop=gy, x=x, scale=gamma, reserve_space_1=reserve[0], reserve_space_2=reserve[1],
        reserve_space_3=reserve[2], epsilon=epsilon, data_format="NHWC", is_training=True,
    )
    return gx, g_gamma, g_beta


def _differentiable_gradient(gy, x, gamma, mean, inv_std, count, reserve, epsilon):
    """The backward pass as an op whose own gradient is the hand-written second derivative (module docstring)."""

    @tf.custom_gradient
    def backward(gy, x, gamma):
        gx, s2, s1 = _fused_gradient(gy, x, gamma, reserve, epsilon)  # s2 = sum(gy xh), s1 = sum(gy)

        def second(a, a_gamma, a_beta):
            axes = [0, 1, 2]
            if a is None:
                a = tf.zeros_like(x)
            gamma_r = gamma * inv_std
            # The backward kernel applied to `a`: (gamma r / N)(N a - A - xh Ax), with Ax and A.
            ggy, a_x, a_sum = _fused_gradient(a, x, gamma, reserve, epsilon)
            q = tf.reduce_sum(a * gy, axes)
            centred = x - mean
            if a_gamma is not None:  # the input gradient alone (the harmonized step) has no cotangent here
                ggy += centred * (inv_std * a_gamma)
            if a_beta is not None:
                ggy += a_beta
            c = (0.0 if a_gamma is None else a_gamma) - gamma_r * a_x / count
            g_gamma = (inv_std / count) * (count * q - s1 * a_sum - s2 * a_x)
            sum_g = -gamma_r * s2 * a_sum / count + s1 * c
            sum_g_xh = -gamma_r * s2 * a_x / count + s2 * c
            l_r = gamma * (q - s1 * a_sum / count - s2 * a_x / count)
            xh_weight = -(inv_std * sum_g_xh + l_r * inv_std * inv_std) / count  # weight of xh in d/dx
            gx2 = tf.add_n([a * (-inv_std * gamma_r * s2 / count), gy * (inv_std * c),
                            centred * (xh_weight * inv_std)])
            gx2 -= inv_std * sum_g / count
            return ggy, gx2, g_gamma

        return (gx, s2, s1), second

    return backward(gy, x, gamma)


def batch_norm_training(x, gamma, beta, epsilon: float):
    """(y, batch mean, batch variance) of training-mode batch normalisation over all axes but the last.

    `x` is float32 (N, H, W, C); `gamma` and `beta` float32 (C,). The variance is the population variance (as
    Keras's moments), for the moving statistics. `y` is differentiable twice, exactly; the moments are not
    differentiated (Keras only assigns them to the moving statistics).
    """

    @tf.custom_gradient
    def forward(x, gamma, beta):
        empty = tf.constant([], tf.float32)
        y, mean, unbiased, *reserve = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=gamma, offset=beta, mean=empty, variance=empty, epsilon=epsilon, exponential_avg_factor=1.0,
            data_format="NHWC", is_training=True,
        )
        count = tf.cast(tf.size(x, out_type=tf.int64) // tf.shape(x, out_type=tf.int64)[-1], tf.float32)  # >2^31 ok
        # The kernel returns the variance with Bessel's correction (for its own moving average); Keras averages
        # the population variance, which is also what normalised `y`.
        variance = unbiased * tf.where(count > 1, (count - 1) / count, 1.0)
        inv_std = tf.math.rsqrt(variance + epsilon)

        def gradient(gy, *unused_moment_gradients):
            gx, g_gamma, g_beta = _differentiable_gradient(gy, x, gamma, mean, inv_std, count, reserve, epsilon)
            return gx, g_gamma, g_beta

        return (y, mean, variance), gradient

    y, mean, variance = forward(x, gamma, beta)
    return y, tf.stop_gradient(mean), tf.stop_gradient(variance)


def fused_call(layer: keras.layers.BatchNormalization, inputs, training=None, mask=None):
    """`layer(inputs)` in training mode on the fused kernels, or None where this path does not apply.

    It applies to the common case: training with a trainable layer, no mask, no batch renormalisation, moments
    not synchronised across replicas, the channel axis last, float16/bfloat16/float32 inputs (Keras computes
    batch normalisation in float32 for all three) and an epsilon cuDNN accepts. Anything else returns None and
    the caller runs Keras's own `call`. The moving statistics are updated by Keras's formula.
    """
    if training is not True or not layer.trainable or mask is not None or layer.renorm or layer.synchronized:
        return None
    rank = len(inputs.shape)
    axis = layer.axis if isinstance(layer.axis, int) else None
    if rank < 2 or axis not in (rank - 1, -1) or layer.epsilon < MIN_EPSILON or inputs.shape[-1] is None:
        return None
    if keras.backend.result_type(inputs.dtype, "float32") != "float32":
        return None  # float64: Keras's composite (exact under `exact_moments`)
    channels = int(inputs.shape[-1])
    x = tf.cast(inputs, tf.float32)
    shape = tf.shape(x)
    x4 = x if rank == 4 else tf.reshape(x, [-1, 1, 1, channels])
    gamma = keras.ops.cast(layer.gamma, "float32") if layer.scale else tf.ones([channels], tf.float32)
    beta = keras.ops.cast(layer.beta, "float32") if layer.center else tf.zeros([channels], tf.float32)
    y, mean, variance = batch_norm_training(x4, gamma, beta, float(layer.epsilon))
    momentum = layer.momentum  # Keras's own update (BatchNormalization.call)
    layer.moving_mean.assign(keras.ops.cast(layer.moving_mean, "float32") * momentum + mean * (1.0 - momentum))
    layer.moving_variance.assign(
        keras.ops.cast(layer.moving_variance, "float32") * momentum + variance * (1.0 - momentum)
    )
    if rank != 4:
        y = tf.reshape(y, shape)
    return tf.cast(y, layer.compute_dtype)
