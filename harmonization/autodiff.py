"""The one place that differentiates with a backend's own machinery: the gradient of a scalar w.r.t. an input.

Saliency is an input gradient, and the harmonized step differentiates it again w.r.t. the weights. Keras 3 has
no backend-neutral gradient, so each backend does it its own documented way:

- TensorFlow: a `tf.GradientTape` watching the input; nested inside an outer tape the result stays
  differentiable (the published code's pattern, serre-lab/Harmonization `training/loss.py`).
- JAX: `jax.grad` of the function, with its auxiliary outputs; inside a function that is itself differentiated
  (the harmonized step), JAX differentiates through it.
- PyTorch: `torch.autograd.grad(..., create_graph=True)` when the result will be differentiated again.
"""

from __future__ import annotations

from typing import Any, Callable

import keras


def input_gradient(fn: Callable[[Any], tuple[Any, Any]], x, *, differentiable: bool = True) -> tuple[Any, Any]:
    """(d fn(x)[0] / d x, fn(x)[1]) for a function returning (a scalar, anything else), on the current backend.

    Args:
        fn: maps a tensor `x` to `(scalar, aux)`; the scalar is differentiated, `aux` is returned as computed.
        x: the tensor differentiated against (a backend tensor, e.g. the preprocessed images).
        differentiable: the gradient will be differentiated again (the harmonized step). Only PyTorch needs to
            know (`create_graph`); TensorFlow's nested tapes and JAX's nested transforms always allow it.

    Returns:
        (gradient with x's shape, aux). The gradient is None when the scalar does not depend on `x`.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf  # on use: the backend's own autodiff (this module serves all three)

        with tf.GradientTape() as tape:
            tape.watch(x)
            value, aux = fn(x)
        return tape.gradient(value, x), aux
    if backend == "jax":
        import jax  # on use: the backend's own autodiff

        gradient, aux = jax.grad(fn, has_aux=True)(x)
        return gradient, aux
    if backend == "torch":
        import torch  # on use: the backend's own autodiff

        # A graph for a second derivative only where one can follow: Keras's predict/evaluate run under no_grad.
        differentiable = differentiable and torch.is_grad_enabled()
        with torch.enable_grad():  # the input gradient itself is needed there too
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            value, aux = fn(x)
            if not value.requires_grad:
                return None, aux
            (gradient,) = torch.autograd.grad(value, x, create_graph=differentiable, allow_unused=True)
        return gradient, aux
    raise NotImplementedError(
        f"harmonization runs on the tensorflow, jax and torch Keras backends; this one is {backend!r}."
    )
