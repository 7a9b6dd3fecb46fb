"""Small helpers shared by the console commands (standard library only, so `--help` stays instant)."""

from __future__ import annotations


def input_size(model) -> int:
    """The side of the square images `model` takes, or a ValueError that shows its input shape."""
    shape = model.input_shape
    if not (isinstance(shape, tuple) and len(shape) == 4 and shape[1] and shape[1] == shape[2]):
        raise ValueError(f"Expected a model with square image inputs (batch, size, size, 3), got {shape}.")
    return int(shape[1])
