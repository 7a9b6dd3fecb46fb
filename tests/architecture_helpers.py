"""Helpers shared by the architecture test files (imported by name: pytest puts tests/ on sys.path)."""

import keras
import numpy as np


def random_images(size, n=2, seed=0):
    """RGB images in [0, 255], what the zoo models take."""
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def perturb_weights(model, seed=1):
    """Non-trivial values for every weight (zeros for class tokens and unit BN stats would hide bugs)."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        value = rng.normal(0, 0.3, variable.shape)
        if "variance" in variable.path:
            value = np.abs(value) + 0.5
        variable.assign(value.astype("float32"))
    return model


def build_tiny(tiny, key, **overrides):
    """Build `tiny[key]` = (class, config) with a fixed seed, `overrides` replacing config entries."""
    cls, config = tiny[key]
    keras.utils.set_random_seed(0)
    return cls(**{**config, **overrides})
