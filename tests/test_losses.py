"""The harmonization loss against an independent float64 NumPy/SciPy reference of the published method."""

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from harmonization import losses

RNG = np.random.default_rng(1234)


# ----------------------------------------------------------------------------- NumPy reference
def np_standardize_cut(maps, eps=1e-5):
    mean = maps.mean(axis=(1, 2), keepdims=True)
    std = maps.std(axis=(1, 2), keepdims=True)  # population std, as tf.math.reduce_std
    return np.maximum((maps - mean) / (std + eps), 0.0)


def np_downsample(maps):
    """5x5 binomial blur, stride 2, TensorFlow's SAME padding (extra pad at the bottom/right)."""
    taps = np.array([1.0, 4.0, 6.0, 4.0, 1.0])
    kernel = np.outer(taps, taps) / 256.0
    n, h, w = maps.shape
    out_h, out_w = -(-h // 2), -(-w // 2)
    pad_h = max((out_h - 1) * 2 + 5 - h, 0)
    pad_w = max((out_w - 1) * 2 + 5 - w, 0)
    padded = np.pad(maps, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)))
    blurred = np.stack([ndimage.correlate(p, kernel, mode="constant")[2:-2, 2:-2] for p in padded])
    return blurred[:, ::2, ::2][:, :out_h, :out_w]


def np_pyramidal_mse(a, b, tokens, levels=5):
    per_level = []
    for _ in range(levels):
        per_level.append(np.mean((a - b) ** 2 * tokens[:, None, None]))
        a, b = np_downsample(a), np_downsample(b)
    return np.mean(per_level)


def np_harmonization_loss(saliency, human, tokens, levels=5, saliency_peak=None):
    s = np_standardize_cut(saliency)
    h = np_standardize_cut(human)
    if saliency_peak is None:
        saliency_peak = s.max(axis=(1, 2), keepdims=True)
    h = h / (h.max(axis=(1, 2), keepdims=True) + 1e-6) * (saliency_peak + 1e-6)
    return np_pyramidal_mse(s, h, tokens, levels)


def human_like_maps(n, size):
    """Mostly-zero maps with a few blobs, like ClickMe."""
    maps = np.zeros((n, size, size))
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        for _ in range(2):
            cy, cx = RNG.uniform(0, size, 2)
            maps[i] += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 8) ** 2))
    maps[maps < 0.1] = 0.0
    return maps


# ----------------------------------------------------------------------------- tests
def test_standardize_cut_matches_reference_in_both_layouts():
    maps = RNG.normal(size=(4, 13, 11))
    want = np_standardize_cut(maps)
    np.testing.assert_allclose(losses.standardize_cut(maps).numpy(), want, rtol=1e-12, atol=1e-12)
    got4 = losses.standardize_cut(maps[..., None]).numpy()
    assert got4.shape == (4, 13, 11, 1)
    np.testing.assert_allclose(got4[..., 0], want, rtol=1e-12, atol=1e-12)


def test_standardize_cut_of_a_blank_map_is_zero_with_a_finite_gradient():
    maps = tf.constant(np.zeros((2, 8, 8)))
    with tf.GradientTape() as tape:
        tape.watch(maps)
        out = losses.standardize_cut(maps)
        total = tf.reduce_sum(out)
    grad = tape.gradient(total, maps)
    assert np.all(out.numpy() == 0)
    assert np.all(np.isfinite(grad.numpy()))


def test_binomial_kernel():
    kernel = losses.binomial_kernel(tf.float64).numpy()[:, :, 0, 0]
    assert kernel.shape == (5, 5)
    assert kernel.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(kernel, np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]) / 256.0)


@pytest.mark.parametrize("size", [(32, 32), (37, 23)])
def test_gaussian_pyramid_matches_reference(size):
    maps = RNG.normal(size=(3,) + size)
    pyramid = losses.gaussian_pyramid(maps, 4)
    assert len(pyramid) == 5
    np.testing.assert_allclose(pyramid[0].numpy()[..., 0], maps)
    want = maps
    for level in pyramid[1:]:
        want = np_downsample(want)
        assert level.shape[1:3] == want.shape[1:]
        np.testing.assert_allclose(level.numpy()[..., 0], want, rtol=1e-10, atol=1e-12)


def test_pyramidal_mse_weights_by_token_and_keeps_the_denominator():
    a, b = RNG.normal(size=(2, 5, 32, 32))
    tokens = np.array([1.0, 0.0, 1.0, 0.0, 1.0])
    got = losses.pyramidal_mse(a, b, tokens).numpy()
    np.testing.assert_allclose(got, np_pyramidal_mse(a, b, tokens), rtol=1e-10)
    # token 0 examples count in the denominator: the loss on 3 of 5 examples is 3/5 of their own loss.
    keep = tokens == 1
    only_kept = np_pyramidal_mse(a[keep], b[keep], np.ones(3))
    np.testing.assert_allclose(got, only_kept * 3 / 5, rtol=1e-10)


def test_harmonization_loss_matches_reference():
    saliency = RNG.normal(size=(4, 48, 48))
    human = human_like_maps(4, 48)
    tokens = np.array([1.0, 1.0, 0.0, 1.0])
    got = losses.harmonization_loss(saliency, human[..., None], tokens).numpy()
    np.testing.assert_allclose(got, np_harmonization_loss(saliency, human, tokens), rtol=1e-10)


def test_harmonization_loss_gradient_matches_finite_differences_with_frozen_peak():
    """The gradient w.r.t. the saliency treats the saliency peak as a constant (stop-gradient)."""
    saliency = RNG.normal(size=(2, 16, 16))
    human = human_like_maps(2, 16)
    tokens = np.ones(2)
    s = tf.constant(saliency)
    with tf.GradientTape() as tape:
        tape.watch(s)
        loss = losses.harmonization_loss(s, human, tokens)
    grad = tape.gradient(loss, s).numpy()
    peak = np_standardize_cut(saliency).max(axis=(1, 2), keepdims=True)
    direction = RNG.normal(size=saliency.shape)
    h = 1e-6
    fd = (
        np_harmonization_loss(saliency + h * direction, human, tokens, saliency_peak=peak)
        - np_harmonization_loss(saliency - h * direction, human, tokens, saliency_peak=peak)
    ) / (2 * h)
    analytic = np.sum(grad * direction)
    assert abs(analytic - fd) <= 1e-6 * abs(fd)


def test_loss_is_lower_for_a_saliency_that_looks_like_the_human_map():
    human = human_like_maps(3, 32)
    aligned = losses.harmonization_loss(human + 0.01 * RNG.normal(size=human.shape), human).numpy()
    unrelated = losses.harmonization_loss(RNG.normal(size=human.shape), human).numpy()
    assert aligned < 0.1 * unrelated


def test_mismatched_shapes_name_both_arguments():
    with pytest.raises(ValueError, match=r"`saliency` and `human_maps`.*\(2, 16, 16\).*\(2, 8, 8\)"):
        losses.harmonization_loss(np.zeros((2, 16, 16)), np.zeros((2, 8, 8)))


def test_wrong_rank_and_channels_are_refused():
    with pytest.raises(ValueError, match="`saliency`.*rank 2"):
        losses.harmonization_loss(np.zeros((16, 16)), np.zeros((16, 16)))
    with pytest.raises(ValueError, match="`human_maps`.*3 channels"):
        losses.harmonization_loss(np.zeros((2, 8, 8)), np.zeros((2, 8, 8, 3)))


def test_nan_in_human_maps_is_refused():
    human = np.zeros((2, 8, 8))
    human[0, 1, 1] = np.nan
    with pytest.raises(ValueError, match="`human_maps` contains NaN"):
        losses.harmonization_loss(np.ones((2, 8, 8)), human)


def test_bad_levels_and_tokens():
    with pytest.raises(ValueError, match="`levels`"):
        losses.pyramidal_mse(np.zeros((1, 8, 8)), np.zeros((1, 8, 8)), levels=0)
    with pytest.raises(ValueError, match="`tokens`"):
        losses.pyramidal_mse(np.zeros((2, 8, 8)), np.zeros((2, 8, 8)), tokens=np.ones((2, 3)))


@pytest.mark.parametrize("epsilon", [-1e-5, float("inf"), float("nan"), "1e-5"])
def test_bad_epsilon_is_refused_with_its_value(epsilon):
    # A negative epsilon can cancel the std (a blank map's 0 / 0) or flip its sign; an infinite one zeroes every map.
    maps = RNG.uniform(size=(2, 8, 8))
    with pytest.raises(ValueError, match=rf"`epsilon` must be a finite number >= 0.*; got {epsilon!r}"):
        losses.standardize_cut(maps, epsilon)
    with pytest.raises(ValueError, match=r"`epsilon` must be a finite number >= 0"):
        losses.harmonization_loss(maps, maps, epsilon=epsilon)
    with pytest.raises(ValueError, match=r"`epsilon` must be a finite number >= 0"):
        losses.standardize_cut(maps, tf.constant(epsilon, tf.float64) if not isinstance(epsilon, str) else epsilon)


def test_epsilon_zero_is_an_exact_z_score():
    maps = RNG.uniform(size=(2, 8, 8))
    np.testing.assert_allclose(losses.standardize_cut(maps, 0.0).numpy(), np_standardize_cut(maps, 0.0), rtol=1e-10)
