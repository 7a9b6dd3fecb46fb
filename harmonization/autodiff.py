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
        return _jax_input_gradient(fn, x)
    if backend == "torch":
        import torch  # on use: the backend's own autodiff

        # A graph for a second derivative only where one can follow: Keras's predict/evaluate run under no_grad.
        differentiable = differentiable and torch.is_grad_enabled()
        with torch.enable_grad(), _twice_differentiable_attention(differentiable):
            if not x.requires_grad:  # the input gradient itself is needed under no_grad too
                x = x.detach().requires_grad_(True)
            value, aux = fn(x)
            if not value.requires_grad:
                return None, aux
            (gradient,) = torch.autograd.grad(value, x, create_graph=differentiable, allow_unused=True)
        return gradient, aux
    raise NotImplementedError(
        f"harmonization runs on the tensorflow, jax and torch Keras backends; this one is {backend!r}."
    )


class _RecordingScope(keras.StatelessScope):
    """A StatelessScope that also remembers which variables were assigned (Keras keeps only their ids)."""

    def __init__(self):
        super().__init__()
        self.assigned = {}

    def add_update(self, update):
        super().add_update(update)
        self.assigned[id(update[0])] = update[0]


def _jax_input_gradient(fn, x):
    """`jax.grad` of `fn` at `x`, with the variable assignments made inside (BatchNormalization's moving statistics
    in training mode) carried out as auxiliary results and applied afterwards, as TensorFlow applies them.

    Assigning a value computed under `jax.grad` to a variable would leak a tracer. A caller that runs statelessly
    (the harmonized step) has its own StatelessScope inside `fn`, which catches the assignments first.
    """
    import jax  # on use: the backend's own autodiff

    def recorded(point):
        with _RecordingScope() as scope:
            value, aux = fn(point)
        updates = [(variable, scope.state_mapping[key]) for key, variable in scope.assigned.items()]
        return value, (aux, [value for _, value in updates], [variable for variable, _ in updates])

    variables_box = []

    def traced(point):
        value, (aux, values, variables) = recorded(point)
        variables_box[:] = variables
        return value, (aux, values)

    gradient, (aux, values) = jax.grad(traced, has_aux=True)(x)
    for variable, value in zip(variables_box, values):
        variable.assign(value)
    return gradient, aux


def _twice_differentiable_attention(differentiable: bool):
    """On PyTorch, attention through the plain "math" kernel while a second derivative is wanted.

    `keras.layers.MultiHeadAttention` calls `torch.nn.functional.scaled_dot_product_attention`, whose fused CPU and
    CUDA kernels (flash, memory-efficient) have no double backward ("derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"); the math kernel is ordinary
    differentiable operations, exact to every order.
    """
    import contextlib

    if not differentiable:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel  # on use: PyTorch only

    return sdpa_kernel([SDPBackend.MATH])
