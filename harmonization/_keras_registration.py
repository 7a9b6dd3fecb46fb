"""Let plain Keras build our models: `keras.saving.load_model("hf://ORG/NAME")` after `import harmonization`.

A preset's `config.json` names our classes (`harmonization>ViT`, `harmonization>ImageNetNormalization`, ...).
Keras builds them, with `safe_mode` on, only once they are registered, that is once `harmonization.architectures`
has been imported (Keras imports modules by name only for its own packages). `import harmonization` must stay
light, without Keras, so that the command's `--help`, `list` and `info` start at once; so the architectures
(~30 ms once Keras is loaded) are imported as soon as Keras is: now if it already is, else right after the
first `import keras` completes, through a one-shot import hook. Nothing else of Keras's import changes.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

_ARCHITECTURES = "harmonization.architectures"


def _register() -> None:
    importlib.import_module(_ARCHITECTURES)  # each class registers itself with Keras as it is defined


class _AfterKerasImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the regular loader of `keras` so that registration follows its import.

    It stays in `sys.meta_path` until Keras has been executed: a mere `importlib.util.find_spec("keras")` (as
    TensorFlow does to see whether Keras is installed) asks for a spec that is never executed.
    """

    def __init__(self) -> None:
        self._finding = False

    def find_spec(self, fullname, path, target=None):
        if fullname != "keras" or self._finding:
            return None
        self._finding = True  # the lookup below must not come back here
        try:
            spec = importlib.util.find_spec("keras")
        finally:
            self._finding = False
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader.exec_module = self._register_after(spec.loader.exec_module)
        return spec

    def _register_after(self, exec_module):
        def exec_then_register(module) -> None:
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)  # Keras is imported: nothing more to wait for
            try:
                _register()
            except Exception as error:  # never break the user's `import keras` over our classes
                warnings.warn(f"harmonization could not register its model classes with Keras ({error}); "
                              "keras.saving.load_model will not build harmonization presets until "
                              f"`import {_ARCHITECTURES}` succeeds.", RuntimeWarning, stacklevel=2)
        return exec_then_register


def register_with_keras() -> None:
    """Register the zoo's classes with Keras now if Keras is imported, else as soon as it is."""
    keras = sys.modules.get("keras")
    if keras is not None and getattr(keras, "saving", None) is not None:
        _register()
    elif keras is None and not any(isinstance(finder, _AfterKerasImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterKerasImport())
