"""Checks of plain numbers (hyper-parameters, sizes, counts): errors that name the argument, what was expected and
what came. NumPy only, so that NumPy-only modules (`harmonization.synthetic`) can use them without importing
TensorFlow; `harmonization._validation` exports them with the tensor checks.
"""

from __future__ import annotations

import math

import numpy as np


def is_int(value) -> bool:
    """True for a Python or NumPy integer, False for a bool (which Python counts as an int)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


#: The largest count TensorFlow takes (`Dataset.take`, `batch`, shapes are int64); a larger Python int fails
#: deep inside a tensor conversion.
INT64_MAX = 2**63 - 1


def check_int(
    value, name: str, *, minimum: int | None = None, maximum: int | None = None, why: str = "",
    expected: str | None = None,
) -> int:
    """`value` as an int >= `minimum` and <= `maximum`; a ValueError naming `name`, the expectation and the
    value otherwise.

    `expected` replaces the default wording ("an integer >= 1"), e.g. "a positive integer", where a
    message is already documented or matched that way; a value above `maximum` adds "no larger than ...".
    """
    too_large = is_int(value) and maximum is not None and value > maximum
    if not is_int(value) or (minimum is not None and value < minimum) or too_large:
        if expected is None:
            expected = "an integer" if minimum is None else f"an integer >= {minimum}"
        if too_large:
            expected = f"{expected} no larger than {maximum}"
        raise ValueError(f"`{name}` must be {expected}{why}; got {value!r}.")
    return int(value)


def is_number(value) -> bool:
    """True for a Python or NumPy real number, False for a bool (1 + True is 2, but True is no fraction)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def check_number(value, name: str, *, minimum: float, strict: bool, why: str = "") -> float:
    """`value` as a finite float >= `minimum` (> when `strict`); a ValueError naming `name` otherwise.

    Hyper-parameters are checked once, up front: a NaN or negative weight would train silently.
    """
    number = None
    if not isinstance(value, (bool, np.bool_, str, bytes)):
        try:
            number = float(value)
        except (TypeError, ValueError):
            pass
    relation = ">" if strict else ">="
    if number is None or not math.isfinite(number) or number < minimum or (strict and number == minimum):
        raise ValueError(
            f"`{name}` must be a finite number {relation} {minimum:g}{why}; got {value!r}."
        )
    return number
