"""The Keras and TensorFlow pins: setup.py, the errors our version-sensitive workarounds raise, and the installed
versions agree, and the internals those workarounds reach into exist.

When a new Keras or TensorFlow fails here: check each workaround (harmonization/second_order.py,
harmonization/harmonized_model.py) against it, run the whole suite (slow tests included), then widen the pin in
setup.py and the version range in the error messages together.
"""

import ast
import re
from pathlib import Path

import keras
import pytest
import tensorflow as tf
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for package in ("harmonization", "tfds_clickme") for p in (ROOT / package).rglob("*.py"))
# "pin keras to 3.12-3.15", "Pin keras to a tested version (3.12-3.15)", "Keras 3.12-3.15 reduces ...".
KERAS_RANGE = re.compile(r"[Kk]eras[^\n\"]{0,40}?\b(\d+)\.(\d+)-(\d+)\.(\d+)\b")
# "pin tensorflow to 2.21".
TENSORFLOW_PIN = re.compile(r"[Pp]in tensorflow to (\d+)\.(\d+)\b")


def _install_requires():
    """setup.py's install_requires, read without running setup.py."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return {Requirement(r).name: Requirement(r).specifier for r in ast.literal_eval(node.value)}
    raise AssertionError("setup.py has no install_requires")


def _messages(pattern):
    """(file:line, match) of every occurrence of `pattern` in the package's sources."""
    found = []
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        for match in pattern.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{path.relative_to(ROOT)}:{line}", match))
    return found


def test_setup_pins_keras_and_tensorflow_to_bounded_ranges():
    requires = _install_requires()
    assert requires["keras"] == SpecifierSet(">=3.12,<3.16")
    assert requires["tensorflow"] == SpecifierSet(">=2.21,<2.22")


def test_the_workarounds_errors_name_the_pinned_keras_range():
    pin = _install_requires()["keras"]
    found = _messages(KERAS_RANGE)
    assert len(found) >= 3, found  # second_order.py and harmonized_model.py name it; a silent regex is no test
    for where, match in found:
        low_major, low_minor, high_major, high_minor = map(int, match.groups())
        said = SpecifierSet(f">={low_major}.{low_minor},<{high_major}.{high_minor + 1}")
        assert said == pin, f"{where} says {match.group(0)!r}, setup.py pins keras{pin}"


def test_the_workarounds_errors_name_the_pinned_tensorflow_version():
    pin = _install_requires()["tensorflow"]
    found = _messages(TENSORFLOW_PIN)
    assert found
    for where, match in found:
        major, minor = map(int, match.groups())
        said = SpecifierSet(f">={major}.{minor},<{major}.{minor + 1}")
        assert said == pin, f"{where} says {match.group(0)!r}, setup.py pins tensorflow{pin}"


@pytest.mark.parametrize("name, installed", [("keras", keras.__version__), ("tensorflow", tf.__version__)])
def test_the_installed_version_is_inside_the_pin(name, installed):
    pin = _install_requires()[name]
    assert pin.contains(installed, prereleases=True), (
        f"{name} {installed} is outside {name}{pin}, the range harmonization's workarounds are tested with "
        "(setup.py). Check them against it (see this file's docstring) before widening the pin."
    )


def test_the_internals_the_workarounds_reach_into_exist():
    from tensorflow.python.distribute.collective_all_reduce_strategy import CollectiveAllReduceExtended

    from harmonization import second_order

    # second_order.py: the function Keras computes normalisation moments with (raises SecondOrderError if changed).
    second_order._target_module()
    # harmonized_model.py: Keras's trainer internals under tf.distribute, TensorFlow's multi-worker check.
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    assert hasattr(model, "_distribute_strategy") and hasattr(model, "_symbolic_build")
    assert callable(getattr(CollectiveAllReduceExtended, "_in_multi_worker_mode", None))
