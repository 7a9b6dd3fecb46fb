"""The model zoo registry: one JSON entry per published harmonized model, shipped in the `models` package.

An entry keeps the architecture (a class of `harmonization.architectures` and its constructor arguments)
apart from where the weights live (Hub repo and pinned revision, original URL and file format) and how
inputs are prepared, like timm's `PretrainedCfg`. Entries are data, so they are read with
`importlib.resources` and work from a wheel as well as from a source checkout.
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib
import json
from importlib import resources
from typing import Any

__all__ = ["UnknownModelError", "build_architecture", "list_models", "model_info"]

ZOO_PACKAGE = "models"
REQUIRED_KEYS = ("name", "description", "architecture", "parameter_count", "hub", "source", "preprocessing", "license")
_ARCHITECTURES_PACKAGE = "harmonization.architectures"


class UnknownModelError(KeyError):
    """A name that is not in the zoo. Subclasses KeyError (a failed look-up) but prints as a sentence."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _validate(entry: Any, filename: str) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ValueError(f"Zoo entry {filename} must be a JSON object, got {type(entry).__name__}.")
    missing = [key for key in REQUIRED_KEYS if key not in entry]
    if missing:
        raise ValueError(f"Zoo entry {filename} lacks required keys {missing}.")
    if f"{entry['name']}.json" != filename:
        raise ValueError(f"Zoo entry {filename} is named {entry['name']!r}; the file must be {entry['name']}.json.")
    architecture = entry["architecture"]
    if not {"module", "class_name", "config"} <= set(architecture):
        raise ValueError(f"Zoo entry {filename}: 'architecture' needs 'module', 'class_name' and 'config'.")
    if not architecture["module"].startswith(_ARCHITECTURES_PACKAGE + "."):
        raise ValueError(
            f"Zoo entry {filename}: architecture module {architecture['module']!r} is outside "
            f"{_ARCHITECTURES_PACKAGE} (the zoo only builds this library's own architectures)."
        )
    if "repo_id" not in entry["hub"] or "url" not in entry["source"]:
        raise ValueError(f"Zoo entry {filename}: 'hub' needs 'repo_id' and 'source' needs 'url'.")
    return entry


@functools.lru_cache(maxsize=None)
def _registry() -> dict[str, dict[str, Any]]:
    entries = {}
    for item in resources.files(ZOO_PACKAGE).iterdir():
        if item.name.endswith(".json"):
            entry = _validate(json.loads(item.read_text(encoding="utf-8")), item.name)
            entries[entry["name"]] = entry
    return entries


def list_models() -> list[str]:
    """Names of the models in the zoo, sorted.

    Example:
        >>> harmonization.list_models()
        ['convnext_tiny_harmonized', ..., 'vit_b16_harmonized']
    """
    return sorted(_registry())


def _unknown(name: str) -> UnknownModelError:
    names = list_models()
    close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return UnknownModelError(
        f"Unknown model {name!r}.{hint} The zoo has: {', '.join(names)}. "
        "Other accepted forms: a local preset directory, or 'hf://org/repo[@revision]'."
    )


def model_info(name: str) -> dict[str, Any]:
    """The zoo entry of `name` (a copy): architecture, weights location, preprocessing, licence, metrics.

    Raises:
        UnknownModelError: `name` is not in the zoo; the message lists the zoo and the closest name.
    """
    entry = _registry().get(name)
    if entry is None:
        raise _unknown(name)
    return copy.deepcopy(entry)


def build_architecture(name: str, **overrides: Any):
    """Build the (randomly initialised) architecture of zoo model `name`; `overrides` update its config."""
    architecture = model_info(name)["architecture"]
    try:
        module = importlib.import_module(architecture["module"])
    except ModuleNotFoundError as error:
        raise NotImplementedError(
            f"The native Keras 3 architecture of {name!r} ({architecture['class_name']}) is not available in "
            f"this version of harmonization-hub ({error})."
        ) from None
    cls = getattr(module, architecture["class_name"])
    return cls(**{**architecture["config"], **overrides})
