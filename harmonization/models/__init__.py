"""The published 0.0.9 model API (serre-lab/Harmonization `harmonization/models`), and the zoo's entries.

`load_ViT_B16()`, `load_ResNet50()`, `load_VGG16()`, `load_EfficientNetB0()`, `load_tiny_ConvNeXT()`,
`load_tiny_MaxViT()`, `load_LeViT_small()` and `preprocess_input(images)` work as in 0.0.9 (see
`harmonization.models.loaders`); the zoo's JSON entries are installed here as `harmonization.models.entries`.

The loaders are imported on first use (PEP 562): the zoo reads `harmonization.models.entries` without
importing Keras, so that `harmonization list` and `info` answer at once.
"""

_LOADERS = ("load_EfficientNetB0", "load_LeViT_small", "load_ResNet50", "load_tiny_ConvNeXT", "load_tiny_MaxViT",
            "load_VGG16", "load_ViT_B16")
__all__ = [*_LOADERS, "preprocess_input"]


def __getattr__(name: str):
    import importlib

    if name in _LOADERS:
        value = getattr(importlib.import_module("harmonization.models.loaders"), name)
    elif name == "preprocess_input":
        value = importlib.import_module("harmonization.models.preprocess").preprocess_input
    elif name in ("loaders", "preprocess"):
        value = importlib.import_module(f"harmonization.models.{name}")
    else:
        raise AttributeError(f"module 'harmonization.models' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
