"""Convert the published Keras-2 `.h5` files to the native Keras 3 architectures of the zoo.

The harmonized weights were published as Keras-2 HDF5 files written by third-party libraries: weights files
(`save_weights`) of vit_keras 0.1.2 and keras-cv-attention-models 1.3.x, and full-model saves (`model.save`,
the same groups under a `model_weights/` root, plus a `model_config`) of keras.applications VGG16 and
ResNet50V2 and of the `efficientnet` package's EfficientNetB0. None of those libraries is needed here: the
file is read with h5py, layer by layer through the `layer_names` and `weight_names` attributes Keras 2
writes, and each weight is matched by name to a variable of the native model.

Names are compared after two normalisations that make Keras-2 and Keras-3 spellings meet: "/" becomes "_"
(Keras 3 forbids "/" in layer names, so vit_keras' `Transformer/encoderblock_0` is our
`Transformer_encoderblock_0`, and a nested Keras 3 variable `block/qkv/kernel` meets kecam's flat
`block/qkv/kernel`), and Keras 2's `depthwise_kernel` is Keras 3's `kernel`. A conversion succeeds only when
every native variable gets exactly one source weight of the same shape and every source weight is used, so
an architecture config that does not fit the file fails loudly, naming the weights.

This module reads a file into a model it is given; building a zoo model and saving it as a preset is
`harmonization.publish` (`convert`, `convert_to_preset`, `build_preset`), which uses it.

Example:
    >>> model = harmonization.architectures.VGG()
    >>> report = harmonization.convert.load_keras2_weights(model, "vgg16_harmonized.h5")
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from harmonization._io import moved_names, sha256_file

__all__ = [
    "ConversionError",
    "ConversionReport",
    "Keras2File",
    "load_keras2_weights",
    "read_keras2_h5",
    "source_facts",
]

FULL_MODEL_ROOT = "model_weights"
# Head layers named differently by the original library: our name -> names to look for in the file.
_HEAD_ALIASES = {"predictions": ("probs",)}


class ConversionError(ValueError):
    """A source file cannot be converted into the requested architecture (layout, names or shapes differ)."""


@dataclasses.dataclass
class Keras2File:
    """The weights of a Keras-2 HDF5 file, layer by layer, in file order.

    Attributes:
        path: the file.
        layout: "weights" (`save_weights`: groups at the root) or "full-model" (`model.save`: groups under
            `model_weights/`, with a `model_config` attribute).
        layers: layer name -> {weight name relative to the layer (no ":0") -> array}, layers in file order.
        model_config: the parsed `model_config` of a full-model file, else None.
        keras_version: the `keras_version` attribute Keras 2 writes, if any.
        backend: the `backend` attribute, if any.
    """

    path: str
    layout: str
    layers: dict[str, dict[str, np.ndarray]]
    model_config: dict[str, Any] | None = None
    keras_version: str | None = None
    backend: str | None = None

    @property
    def weight_count(self) -> int:
        return sum(len(weights) for weights in self.layers.values())

    @property
    def parameter_count(self) -> int:
        return int(sum(array.size for weights in self.layers.values() for array in weights.values()))


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def read_keras2_h5(path: str | os.PathLike) -> Keras2File:
    """Read every weight of a Keras-2 `.h5` file (weights-only or full-model layout) by its `weight_names`.

    Raises:
        ConversionError: the file is not HDF5, or has no Keras-2 `layer_names` attribute (e.g. a Keras 3
            `.weights.h5` file), or a listed weight is missing.
    """
    import h5py

    path = str(path)
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise ConversionError(f"{path!r} is not a readable HDF5 file ({error}); is the download complete?") from None
    with handle:
        if FULL_MODEL_ROOT in handle and "layer_names" in handle[FULL_MODEL_ROOT].attrs:
            root, layout = handle[FULL_MODEL_ROOT], "full-model"
        elif "layer_names" in handle.attrs:
            root, layout = handle, "weights"
        else:
            raise ConversionError(
                f"{path!r} is not a Keras-2 weights file: no `layer_names` attribute at its root or under "
                f"'{FULL_MODEL_ROOT}/' (found groups {sorted(handle.keys())[:8]}). Keras 3 `.weights.h5` files "
                "load with `model.load_weights`; presets with `harmonization.load_model`."
            )
        layers: dict[str, dict[str, np.ndarray]] = {}
        for layer_name in (_text(n) for n in root.attrs["layer_names"]):
            group = root[layer_name]
            weights = {}
            for weight_name in (_text(n) for n in group.attrs.get("weight_names", [])):
                if weight_name not in group:
                    raise ConversionError(
                        f"{path!r} is damaged: layer {layer_name!r} lists weight {weight_name!r} but does not hold it."
                    )
                relative = weight_name.removesuffix(":0")
                relative = relative[len(layer_name) + 1:] if relative.startswith(layer_name + "/") else relative
                weights[relative] = np.asarray(group[weight_name])
            layers[layer_name] = weights
        config = None
        if "model_config" in handle.attrs:
            try:
                config = json.loads(_text(handle.attrs["model_config"]))
            except json.JSONDecodeError:
                config = None
        return Keras2File(
            path=path,
            layout=layout,
            layers=layers,
            model_config=config,
            keras_version=_text(handle.attrs["keras_version"]) if "keras_version" in handle.attrs else None,
            backend=_text(handle.attrs["backend"]) if "backend" in handle.attrs else None,
        )


def _normalise(name: str) -> str:
    parts = name.split("/")
    parts[-1] = "kernel" if parts[-1] == "depthwise_kernel" else parts[-1]
    return "_".join(parts)


def _source_index(source: Keras2File, aliases: Mapping[str, str]) -> dict[str, tuple[str, str, np.ndarray]]:
    """normalised full weight name -> (layer, relative weight name, array); `aliases` renames source layers."""
    index: dict[str, tuple[str, str, np.ndarray]] = {}
    for layer_name, weights in source.layers.items():
        target_layer = aliases.get(layer_name, layer_name)
        for relative, array in weights.items():
            key = _normalise(f"{target_layer}/{relative}")
            if key in index:
                raise ConversionError(
                    f"{source.path!r}: weights {index[key][0]}/{index[key][1]} and {layer_name}/{relative} both map "
                    f"to {key!r}; cannot tell them apart."
                )
            index[key] = (layer_name, relative, array)
    return index


def _head_aliases(model, source: Keras2File) -> dict[str, str]:
    aliases = {}
    layer_names = {layer.name for layer in model.layers}
    for ours, theirs in _HEAD_ALIASES.items():
        if ours in layer_names and ours not in source.layers:
            for candidate in theirs:
                if candidate in source.layers:
                    aliases[candidate] = ours
    return aliases


@dataclasses.dataclass
class ConversionReport:
    """What `load_keras2_weights` did: the file, its layout, how many weights and parameters were loaded."""

    source: str
    layout: str
    weights: int
    parameters: int
    renamed_layers: dict[str, str]


def load_keras2_weights(model, source: str | os.PathLike | Keras2File) -> ConversionReport:
    """Load the weights of a Keras-2 `.h5` file into the native Keras 3 `model`, matched by name.

    Every variable of `model` must find exactly one weight of the same shape in the file, and every weight of
    the file must be used; otherwise nothing is assigned and a `ConversionError` lists the differences.
    """
    if not isinstance(source, Keras2File):
        source = read_keras2_h5(source)
    aliases = _head_aliases(model, source)
    index = _source_index(source, aliases)
    assignments, missing, mismatched, seen = [], [], [], {}
    for variable in model.weights:
        key = _normalise(variable.path)
        if key in seen:
            raise ConversionError(f"Variables {seen[key]!r} and {variable.path!r} of the model both map to {key!r}.")
        seen[key] = variable.path
        if key not in index:
            missing.append(variable.path)
            continue
        layer_name, relative, array = index[key]
        if tuple(array.shape) != tuple(variable.shape):
            mismatched.append(
                f"{variable.path}: model expects {tuple(variable.shape)}, {layer_name}/{relative} has {tuple(array.shape)}"
            )
            continue
        assignments.append((variable, array))
    unused = sorted(
        f"{layer}/{relative}" for key, (layer, relative, _) in index.items() if key not in seen
    )
    if missing or mismatched or unused:
        lines = [f"Cannot load {source.path!r} ({source.layout} layout, {source.weight_count} weights) into "
                 f"{model.name!r} ({len(model.weights)} variables):"]
        for title, items in (("shape mismatches", mismatched), ("model variables not in the file", missing),
                             ("file weights the model does not use", unused)):
            if items:
                shown = "; ".join(items[:8]) + (f"; ... ({len(items) - 8} more)" if len(items) > 8 else "")
                lines.append(f"- {len(items)} {title}: {shown}")
        lines.append("Check that the architecture and its config (image_size, num_classes, depths, widths, ...) "
                     "are those the file was saved from.")
        raise ConversionError("\n".join(lines))
    for variable, array in assignments:
        variable.assign(array.astype(variable.dtype))
    return ConversionReport(
        source=source.path,
        layout=source.layout,
        weights=len(assignments),
        parameters=int(sum(array.size for _, array in assignments)),
        renamed_layers=dict(aliases),
    )


def source_facts(source: str | os.PathLike, keras2: Keras2File | None = None, *,
                 sha256: str | None = None) -> dict[str, Any]:
    """What a converted preset records about the file it came from (`metadata.json`): name, sha256, size, layout.

    `sha256`: the file's digest when the caller already has it (taken while it downloaded); else it is read.
    Knows nothing of the zoo: `harmonization.publish.build_preset` adds the entry's facts (name, URL, classes).
    """
    facts: dict[str, Any] = {
        "source_file": Path(source).name,
        "source_sha256": sha256 or sha256_file(source),
        "source_size": os.path.getsize(source),
        "converted_by": "harmonization.convert",
    }
    if keras2 is not None:
        facts["source_layout"] = keras2.layout
        if keras2.keras_version:
            facts["source_keras_version"] = keras2.keras_version
    return facts


# 0.1 names that build zoo models; they now live above the zoo, where they belong. Resolved on use, so that this
# module imports nothing above it (`harmonization.convert.convert(...)` keeps working).
__getattr__ = moved_names(__name__, {
    "build_native": "harmonization.zoo",
    "conversion_metadata": "harmonization.publish",
    "convert": "harmonization.publish",
    "convert_to_preset": "harmonization.publish",
})
