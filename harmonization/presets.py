"""Presets: a Keras model saved as a directory that can be verified, shared on the Hub and reloaded safely.

A preset directory holds (the keras-hub layout):

- `config.json` — the model's Keras serialisation (`keras.saving.serialize_keras_object`);
- `model.weights.h5` — its weights (`model.save_weights`);
- `metadata.json` — where the weights come from (zoo name, source URL and sha256), the library versions and
  the Keras backend that wrote them (a preset loads on TensorFlow, JAX and PyTorch alike), the parameter count
  and the size and sha256 of every file above, so that a truncated or corrupted copy is detected before it is
  used, and optionally `class_names`, the label of each output;
- `README.md` — optional, the model card.

Loading never runs code from the preset: the config is deserialised with Keras `safe_mode=True`, so only
classes registered with `keras.saving.register_keras_serializable` (ours are in the `harmonization` package)
can be built. What this backend cannot build (a layer bound to another backend, an unregistered class, a missing
library) is refused in one sentence naming the layer and the fix, before Keras fails from deep inside.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import keras

from harmonization._backend import INSTALL
from harmonization._io import (
    file_facts, json_depth, library_version, library_versions, moved_names, sha256_file, write_atomic,
)
from harmonization._numbers import check_int, is_int

__all__ = [
    "CONFIG_FILE",
    "FIGURE_FILE",
    "METADATA_FILE",
    "PRESET_FORMAT_VERSION",
    "PresetError",
    "README_FILE",
    "WEIGHTS_FILE",
    "class_names",
    "is_preset_dir",
    "load_preset",
    "load_verified_preset",
    "read_metadata",
    "save_preset",
    "sign_preset",
    "verify_preset",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
METADATA_FILE = "metadata.json"
README_FILE = "README.md"
#: The model card's saliency figure beside README.md (`harmonization.card_figure`); unchecked, like the README.
FIGURE_FILE = "saliency.png"
PRESET_FORMAT_VERSION = 1
# Files whose size and sha256 `metadata.json` records (the README may be edited on the Hub freely).
CHECKED_FILES = (CONFIG_FILE, WEIGHTS_FILE)
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE, METADATA_FILE)
_PRESET_FILES = frozenset((*REQUIRED_FILES, README_FILE, FIGURE_FILE))  # what a rebuild may replace
# Keys `save_preset` computes itself; user metadata may not override them (they are what makes a preset checkable).
_RESERVED_METADATA_KEYS = frozenset(
    ("format_version", "keras_version", "keras_backend", "tensorflow_version", "harmonization_version",
     "python_version", "parameter_count", "model_class", "files")
)
#: Keras layers that run on some backends only (class name -> the backends that run them). A preset holding one is
#: refused on any other backend by name, before Keras fails deep inside (a bare `No module named 'torch'` on JAX).
_BACKEND_BOUND_LAYERS = {
    "TorchModuleWrapper": ("torch",),
    "JaxLayer": ("jax", "tensorflow"),
    "FlaxLayer": ("jax", "tensorflow"),
    "TFSMLayer": ("tensorflow",),
}
_BACKEND_NAMES = {"tensorflow": "TensorFlow", "jax": "JAX", "torch": "PyTorch"}
#: Libraries whose classes Keras imports by module path when a config names them (module -> pip name).
_KERAS_LIBRARIES = {"keras_hub": "keras-hub", "keras_cv": "keras-cv", "keras_nlp": "keras-nlp"}


class PresetError(OSError):
    """A preset directory is missing a file, or a file is truncated, corrupted or not what `metadata.json` says.

    `bad_file` names the damaged file when there is one (the Hub cache evicts it).
    """

    def __init__(self, message: str, *, bad_file: str | os.PathLike | None = None):
        super().__init__(message)
        self.bad_file = None if bad_file is None else str(bad_file)


#: The deepest nesting of objects and lists a preset's JSON files may have. A saved zoo model's config nests about
#: 12 levels (a nested model adds a few); deeper ones are refused before Keras recurses through them.
MAX_JSON_DEPTH = 100


def _roots(directory: Path) -> tuple[Path, ...]:
    """The real folders a preset's files may really be in: the preset folder itself, and for a Hugging Face
    cache snapshot (`models--org--name/snapshots/<revision>/`) its repo's `blobs/` folder, where the
    snapshot's links lead."""
    real = Path(os.path.realpath(directory))
    roots = [real]
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        roots.append(real.parent.parent / "blobs")
    return tuple(roots)


def _inside(directory: Path, name: str) -> Path:
    """The real path of preset file `name` in `directory`, refused (PresetError) when a link leads outside.

    Checked before anything stats, opens or hashes the file, so that no preset (a downloaded archive, a folder
    somebody else wrote) can make us read or print the size or digest of a file elsewhere (`/etc/passwd`).
    """
    path = directory / name
    real = Path(os.path.realpath(path))
    if not any(real != root and real.is_relative_to(root) for root in _roots(directory)):
        raise PresetError(
            f"Preset file {str(path)!r} is a symbolic link leading outside the preset folder "
            f"{str(directory)!r}; refusing to read it. A preset's files must be inside its folder.",
        )  # no `bad_file`: nothing may act on (the Hub cache: evict) a file outside the folder
    return real


def _read_json(directory: Path, name: str) -> Any:
    """The parsed JSON file `name` of a preset, or a PresetError naming it (outside, not JSON, nested too deeply)."""
    path = directory / name
    real = _inside(directory, name)
    too_deep = PresetError(
        f"Preset file {str(path)!r} nests objects and lists more than {MAX_JSON_DEPTH} levels deep; no preset "
        "needs that many, so it is refused as corrupted or crafted.", bad_file=path,
    )
    try:
        value = json.loads(real.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:  # ValueError: JSONDecodeError, or an int of 4300+ digits
        raise PresetError(f"Preset file {str(path)!r} is corrupted (not valid JSON: {error}).", bad_file=path) from None
    except RecursionError:  # deeper than Python's own parser goes
        raise too_deep from None
    if json_depth(value, stop_after=MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise too_deep
    return value


def _num_outputs(model: keras.Model) -> int | None:
    try:
        shape = model.output_shape
    except (AttributeError, ValueError, RuntimeError):
        return None
    return shape[-1] if isinstance(shape, tuple) and len(shape) == 2 and isinstance(shape[-1], int) else None


def _check_class_names(names: Any, model: keras.Model | None, where: str) -> list[str]:
    """`names` as a list, checked: str items, one per output of `model` (when given)."""
    if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
        raise TypeError(f"{where} must be a list of str (one name per class), got {names!r:.200}.")
    if model is not None:
        count = _num_outputs(model)
        if count is None:
            raise ValueError(
                f"{where} needs a model with one output of shape (batch, num_classes); model {model.name!r} has "
                f"output shape {getattr(model, 'output_shape', 'unknown')}."
            )
        if len(names) != count:
            raise ValueError(f"{where} must have one name per output of model {model.name!r}: expected {count} "
                             f"names, got {len(names)}.")
    return list(names)


def class_names(preset_or_model: keras.Model | str | os.PathLike) -> list[str] | None:
    """The class names of a loaded model or a local preset directory, in output order; None if not recorded.

    A model loaded from a preset carries them as `model.class_names` (a tuple, a plain Python attribute: Keras
    does not save it, `save_preset` does, in `metadata.json`). A model whose head was replaced
    (`load_model(..., num_classes=...)`) or dropped (`include_top=False`) has none.

    Example:
        >>> model = harmonization.load_model("vit_b16_harmonized")
        >>> harmonization.presets.class_names(model)[:2]
        ['tench', 'goldfish']
    """
    if isinstance(preset_or_model, keras.Model):
        names = getattr(preset_or_model, "class_names", None)
        return None if names is None else list(names)
    if not isinstance(preset_or_model, (str, os.PathLike)):
        raise TypeError(
            f"class_names: `preset_or_model` must be a keras.Model or a preset directory, got "
            f"{type(preset_or_model).__name__}."
        )
    directory = Path(preset_or_model).expanduser()
    if not is_preset_dir(directory):
        raise FileNotFoundError(f"class_names: no preset directory at {str(directory)!r}.")
    names = read_metadata(directory).get("class_names")
    if names is None:
        return None
    try:
        return _check_class_names(names, None, f"{METADATA_FILE} 'class_names' in {str(directory)!r}")
    except TypeError as error:
        raise PresetError(str(error), bad_file=directory / METADATA_FILE) from None


def is_preset_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory holding at least a preset's `config.json`.

    A link is not followed (not even stat-ed): where it leads is checked when the preset is read (`_inside`).
    """
    path = Path(path)
    config = path / CONFIG_FILE
    return path.is_dir() and (config.is_symlink() or config.is_file())


def save_preset(
    model: keras.Model,
    directory: str | os.PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = True,
) -> Path:
    """Save `model` as a preset directory and return its path.

    The preset is written to a temporary sibling directory and moved into place only when complete, so an
    interrupted save never leaves a half-written preset behind.

    Args:
        model: keras.Model. A built model whose classes are all registered serialisable (custom layers need
            `@keras.saving.register_keras_serializable`); checked by serialising it before anything is written.
        directory: str or path. The preset directory to create.
        metadata: mapping or None. JSON-serialisable facts recorded in `metadata.json`, e.g. `name` (the zoo
            name), `source_url`, `source_sha256`, and `class_names` (a list of str, one per output; defaults to
            `model.class_names` when the model has them). Must not use the keys the preset computes itself
            (`files`, `parameter_count`, versions, ...). Defaults to None.
        overwrite: bool. Replace an existing preset at `directory`. A non-empty directory that is not a preset
            is never replaced. Defaults to True, as `keras.Model.save`.

    Returns:
        The preset directory, as a `Path`.

    Example:
        >>> path = harmonization.save_preset(model, "out/preset", metadata={"name": "my_model"})
        >>> restored = harmonization.load_model(path)
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"save_preset: `model` must be a keras.Model, got {type(model).__name__}.")
    if not model.built:
        raise ValueError(
            f"save_preset: model {model.name!r} is not built; call it on a batch or build it before saving "
            "so that its weights exist."
        )
    metadata = dict(metadata or {})
    reserved = sorted(_RESERVED_METADATA_KEYS.intersection(metadata))
    if reserved:
        raise ValueError(
            f"save_preset: `metadata` may not set {reserved}; those keys are computed from the model and files."
        )
    if "class_names" in metadata:
        metadata["class_names"] = _check_class_names(metadata["class_names"], model,
                                                     "save_preset: `metadata['class_names']`")
    elif getattr(model, "class_names", None) is not None:
        metadata["class_names"] = _check_class_names(model.class_names, model, "save_preset: `model.class_names`")
    try:
        json.dumps(metadata)
    except TypeError as error:
        raise TypeError(f"save_preset: `metadata` must be JSON-serialisable ({error}).") from None

    directory = Path(directory)
    if directory.exists():
        if not directory.is_dir():
            raise FileExistsError(f"save_preset: {str(directory)!r} exists and is not a directory.")
        contents = {p.name for p in directory.iterdir()}
        if contents and not overwrite:
            raise FileExistsError(f"save_preset: {str(directory)!r} exists; pass overwrite=True to replace it.")
        foreign = sorted(contents - _PRESET_FILES)
        if foreign:
            raise FileExistsError(
                f"save_preset: {str(directory)!r} is not empty and holds files that are not part of a preset "
                f"({foreign[:5]}); refusing to replace it. Choose an empty or new directory."
            )

    # Serialise first: a model that cannot be serialised fails before anything touches the disk.
    config = keras.saving.serialize_keras_object(model)
    config_text = json.dumps(config, indent=2, sort_keys=True)

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".partial", dir=directory.parent))
    try:
        (staging / CONFIG_FILE).write_text(config_text, encoding="utf-8")
        model.save_weights(str(staging / WEIGHTS_FILE))
        record = {
            "format_version": PRESET_FORMAT_VERSION,
            **metadata,
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "parameter_count": int(model.count_params()),
            **library_versions(),
            # Which backend wrote the weights: a preset loads on every backend, and this says where it came from.
            "keras_backend": keras.backend.backend(),
            "files": _files_of(staging),
        }
        (staging / METADATA_FILE).write_text(json.dumps(record, indent=2, sort_keys=True), encoding="utf-8")
        if directory.exists():
            # Keep the old preset until the new one is in place; remove it only afterwards.
            retired = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=directory.parent))
            os.replace(directory, retired / directory.name)
            os.replace(staging, directory)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """Read a preset's `metadata.json`, with a clear error when it is missing or not valid JSON."""
    directory = Path(directory)
    path = directory / METADATA_FILE
    if not _inside(directory, METADATA_FILE).is_file():
        raise PresetError(f"Preset {str(directory)!r} has no {METADATA_FILE}; it is not a complete preset.")
    record = _read_json(directory, METADATA_FILE)
    if not isinstance(record, dict):
        raise PresetError(
            f"Preset file {str(path)!r} must hold a JSON object, got {type(record).__name__}.", bad_file=path
        )
    return record


def verify_preset(directory: str | os.PathLike) -> dict[str, Any]:
    """Check that a preset directory is complete and intact; return its metadata.

    Every required file must exist; every file whose size and sha256 `metadata.json` records must match them;
    the weights must open as HDF5. Raises `PresetError` naming the file, the expected and the actual value.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise PresetError(f"Preset directory {str(directory)!r} does not exist.")
    missing = [name for name in REQUIRED_FILES if not _inside(directory, name).is_file()]
    if len(missing) == len(REQUIRED_FILES):
        raise PresetError(f"{str(directory)!r} is not a preset directory: it holds none of {list(REQUIRED_FILES)}.")
    if missing:
        raise PresetError(
            f"Preset {str(directory)!r} is incomplete: missing {missing} (a preset needs {list(REQUIRED_FILES)})."
        )
    record = read_metadata(directory)
    _check_format_version(directory, record)
    for name, expected in _files_record(directory, record).items():
        path = directory / name
        real = _inside(directory, name)
        if not real.is_file():
            raise PresetError(f"Preset {str(directory)!r} is incomplete: {name} (listed in {METADATA_FILE}) is missing.")
        size = real.stat().st_size
        if size != expected["size"]:
            raise PresetError(
                f"Preset file {str(path)!r} is truncated or corrupted: expected {expected['size']} bytes, "
                f"found {size}.",
                bad_file=path,
            )
        digest = sha256_file(real)
        if digest != expected["sha256"]:
            raise PresetError(
                f"Preset file {str(path)!r} is corrupted: expected sha256 {expected['sha256']}, got {digest}.",
                bad_file=path,
            )
    import h5py

    try:
        with h5py.File(_inside(directory, WEIGHTS_FILE), "r"):
            pass
    except OSError as error:
        raise PresetError(
            f"Preset file {str(directory / WEIGHTS_FILE)!r} is not a readable HDF5 weights file ({error}).",
            bad_file=directory / WEIGHTS_FILE,
        ) from None
    return record


def _check_format_version(directory: Path, record: Mapping[str, Any], *, missing_ok: bool = False) -> None:
    """Refuse a `format_version` that is missing (unless `missing_ok`), not a positive int, or newer than ours."""
    where = f"{str(directory / METADATA_FILE)!r}"
    if "format_version" not in record:
        if missing_ok:
            return
        raise PresetError(
            f"Preset {str(directory)!r} is not a valid preset: {METADATA_FILE} has no `format_version` (every preset "
            "saved by harmonization-hub records it). It may have been edited by hand or written by another tool. "
            f"If you trust this local preset, sign it with `harmonization sign {directory}`; a downloaded preset "
            "must be published again with `harmonization publish` or `save_preset`.",
            bad_file=directory / METADATA_FILE,
        )
    version = record["format_version"]
    if not is_int(version) or version < 1:
        raise PresetError(
            f"{where}: `format_version` must be a positive integer (this library writes "
            f"{PRESET_FORMAT_VERSION}); got {version!r:.100}. The preset is not valid.",
            bad_file=directory / METADATA_FILE,
        )
    if version > PRESET_FORMAT_VERSION:
        raise PresetError(
            f"Preset {str(directory)!r} has format_version={version!r}; this library reads format versions up to "
            f"{PRESET_FORMAT_VERSION}. Upgrade harmonization-hub."
        )


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _files_record(directory: Path, record: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The `files` record of `metadata.json`, checked: every checked file has a size and a sha256, inside the folder.

    Without it nothing can be verified, so a preset lacking it is refused (a hand-edited or pre-0.1 preset):
    the message gives the command that signs a trusted local preset.
    """
    where = f"{str(directory / METADATA_FILE)!r}"
    files = record.get("files")
    if files is not None and not isinstance(files, dict):
        raise PresetError(f"{where}: `files` must be an object {{file name: {{size, sha256}}}}, got "
                          f"{type(files).__name__}.", bad_file=directory / METADATA_FILE)
    unsigned = [name for name in CHECKED_FILES if files is None or name not in files]
    if unsigned:
        raise PresetError(
            f"Preset {str(directory)!r} cannot be verified: {METADATA_FILE} does not record the size and sha256 of "
            f"{unsigned} (the `files` record every preset saved by harmonization-hub has). It may have been edited "
            "by hand or written by another tool. If you trust this local preset, sign it with "
            f"`harmonization sign {directory}` (harmonization.presets.sign_preset); a downloaded preset must be "
            "published again with `harmonization publish` or `save_preset`."
        )
    for name, expected in files.items():
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            # Never read (nor print the digest of) a file outside the preset folder.
            raise PresetError(f"{where} lists {name!r}, which is not a file name inside the preset folder; "
                              "refusing to read it.", bad_file=directory / METADATA_FILE)
        if not (isinstance(expected, dict) and isinstance(expected.get("size"), int)
                and not isinstance(expected.get("size"), bool) and expected["size"] >= 0
                and _is_sha256(expected.get("sha256"))):
            raise PresetError(
                f"{where}: the record of {name!r} must be {{\"size\": bytes, \"sha256\": 64 hex digits}}; got "
                f"{expected!r:.200}.", bad_file=directory / METADATA_FILE,
            )
    return files


def _files_of(directory: Path) -> dict[str, dict[str, Any]]:
    """The `files` record of the preset files in `directory`: size and sha256 of each of `CHECKED_FILES`."""
    return {name: file_facts(_inside(directory, name)) for name in CHECKED_FILES}


def sign_preset(directory: str | os.PathLike) -> dict[str, Any]:
    """Record the size and sha256 of a trusted local preset's files in its `metadata.json`; return the metadata.

    For presets whose `metadata.json` lacks the `files` record (written by hand or by another tool), which
    `verify_preset` refuses. Only sign a preset whose files you trust: signing is what makes a later change
    detectable, it does not check the weights themselves.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise PresetError(f"sign_preset: {str(directory)!r} is not a preset directory (missing it; "
                          f"a preset holds {list(REQUIRED_FILES)}).")
    missing = [name for name in REQUIRED_FILES if not _inside(directory, name).is_file()]
    if missing:
        raise PresetError(f"sign_preset: {str(directory)!r} is not a preset directory (missing {missing}; "
                          f"a preset holds {list(REQUIRED_FILES)}).")
    record = read_metadata(directory)
    _check_format_version(directory, record, missing_ok=True)
    record.setdefault("format_version", PRESET_FORMAT_VERSION)
    record["files"] = _files_of(directory)
    write_atomic(directory / METADATA_FILE, json.dumps(record, indent=2, sort_keys=True))
    return verify_preset(directory)


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    config = _read_json(directory, CONFIG_FILE)
    if not isinstance(config, dict) or "class_name" not in config:
        raise PresetError(
            f"Preset file {str(path)!r} is not a Keras serialisation (expected a JSON object with 'class_name').",
            bad_file=path,
        )
    return config


def _serialized_objects(config: Any) -> Iterator[dict[str, Any]]:
    """Every serialised Keras object (a JSON object with a `class_name`) inside `config`, outermost first.

    Iterative: `_read_json` has already bounded the depth, and a walk must not recurse on a crafted file either.
    """
    stack = [config]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            if isinstance(value.get("class_name"), str):
                yield value
            stack.extend(reversed(list(value.values())))
        elif isinstance(value, list):
            stack.extend(reversed(value))


def _described(obj: Mapping[str, Any]) -> str:
    """`layer 'name' (ClassName)`, or the class name alone for an object without a name."""
    inner = obj.get("config")
    name = inner.get("name") if isinstance(inner, dict) else None
    return f"layer {name!r} ({obj['class_name']})" if isinstance(name, str) else repr(obj["class_name"])


def _check_buildable(config: dict[str, Any], directory: Path, record: Mapping[str, Any]) -> None:
    """Refuse, in one sentence that names the layer and the fix, a config this process cannot build.

    Keras reports these cases from deep inside (a bare `ModuleNotFoundError: No module named 'torch'` for a
    PyTorch-only layer on JAX; a `TypeError` carrying the whole object config for an unregistered class or a
    missing keras-hub), which does not tell a user of a downloaded preset what to do. Checked on the parsed
    config before anything is built; whatever passes is still built with Keras `safe_mode`.
    """
    backend = keras.backend.backend()
    where = f"Preset {str(directory)!r}"
    for obj in _serialized_objects(config):
        class_name = obj["class_name"]
        module = obj.get("module") if isinstance(obj.get("module"), str) else ""
        package = module.split(".", 1)[0]
        if package == "keras" and class_name == "TorchModuleWrapper":  # on every backend, its own fix
            raise PresetError(
                f"{where} holds {_described(obj)}, which runs only on the PyTorch backend and stores its "
                "torch.nn.Module as a pickle, which load_model never unpickles (Keras safe_mode: a pickle can run "
                "any code). Rebuild the model in your code with KERAS_BACKEND=torch (wrap the same torch.nn.Module), "
                f"then load the weights with model.load_weights({str(directory / WEIGHTS_FILE)!r})."
            )
        backends = _BACKEND_BOUND_LAYERS.get(class_name, (backend,)) if package == "keras" else (backend,)
        if backend not in backends:
            runs_on = " or ".join(_BACKEND_NAMES[b] for b in backends)
            raise PresetError(
                f"{where} holds {_described(obj)}, which runs only on the {runs_on} backend; the Keras backend here "
                f"is {backend!r}. Load it with KERAS_BACKEND={backends[0]} (if that backend is missing: "
                f"{INSTALL[backends[0]]})."
            )
        if package in _KERAS_LIBRARIES and importlib.util.find_spec(package) is None:
            raise PresetError(
                f"{where} holds {_described(obj)} from {package}, which is not installed. Install it with: "
                f"pip install {_KERAS_LIBRARIES[package]}"
            )
        # A registered class is named "package>Name" (a registered function: class_name "function", config "p>f").
        registered = obj.get("config") if class_name == "function" else obj.get("registered_name")
        if isinstance(registered, str) and ">" in registered and keras.saving.get_registered_object(registered) is None:
            written_by = record.get("harmonization_version")
            newer = (f" If it is one of harmonization-hub's own, this preset was written by harmonization-hub "
                     f"{written_by} and this is {library_version()}: upgrade with pip install -U harmonization-hub."
                     if registered.startswith("harmonization>") and isinstance(written_by, str) else "")
            raise PresetError(
                f"{where} needs the custom class {registered!r} ({_described(obj)}), which is not registered in this "
                "process. Import the module that defines it (decorated with "
                f"@keras.saving.register_keras_serializable) before loading.{newer}"
            )


def _deserialize(config: dict[str, Any], directory: Path) -> keras.Model:
    # Importing the architectures registers their classes, so zoo presets deserialise without user imports.
    import harmonization.architectures  # noqa: F401

    try:
        model = keras.saving.deserialize_keras_object(config, safe_mode=True)
    except ModuleNotFoundError as error:  # a class whose code needs a package that is not installed here
        raise PresetError(
            f"Could not build the model in preset {str(directory)!r}: it needs the Python package {error.name!r}, "
            f"which is not installed ({error}). Install it, then load the preset again."
        ) from error
    except RecursionError:
        raise PresetError(
            f"Could not build the model in preset {str(directory)!r}: {CONFIG_FILE} nests layers or models too "
            "deeply for Keras to build.", bad_file=directory / CONFIG_FILE,
        ) from None
    except (TypeError, ValueError, KeyError) as error:  # KeyError: a known class whose config lacks an argument
        raise PresetError(
            f"Could not build the model in preset {str(directory)!r} from {CONFIG_FILE}: {error}\n"
            "Custom classes must be registered with @keras.saving.register_keras_serializable and imported "
            "before loading; code embedded in a config (lambdas) is refused (Keras safe_mode)."
        ) from error
    if not isinstance(model, keras.Model):
        raise PresetError(f"{CONFIG_FILE} in {str(directory)!r} describes a {type(model).__name__}, not a keras.Model.")
    return model


# Constructor arguments that `load_model` may change on a zoo architecture, with the values meaning "as saved".
_VARIANT_DEFAULTS = {"num_classes": None, "include_top": True, "preprocess": True}


def _transfer_weights(source: keras.Model, target: keras.Model, *, fresh: set[str]) -> None:
    """Copy weights layer by layer (by name) from `source` into `target`; layers in `fresh` keep their init."""
    source_layers = {layer.name: layer for layer in source.layers}
    for layer in target.layers:
        if not layer.weights or layer.name in fresh:
            continue
        if layer.name not in source_layers:
            raise PresetError(f"Cannot derive the requested variant: layer {layer.name!r} is not in the preset.")
        values = source_layers[layer.name].get_weights()
        expected = [tuple(w.shape) for w in layer.weights]
        actual = [tuple(v.shape) for v in values]
        if expected != actual:
            raise PresetError(
                f"Cannot derive the requested variant: layer {layer.name!r} expects weight shapes {expected}, "
                f"the preset has {actual}."
            )
        layer.set_weights(values)


def load_preset(
    directory: str | os.PathLike,
    *,
    num_classes: int | None = None,
    include_top: bool = True,
    preprocess: bool = True,
) -> keras.Model:
    """Load a model from a local preset directory, once `verify_preset` passes (see `load_model` for the arguments)."""
    directory = Path(directory)
    return load_verified_preset(directory, verify_preset(directory), num_classes=num_classes,
                                include_top=include_top, preprocess=preprocess)


def load_verified_preset(
    directory: str | os.PathLike,
    record: Mapping[str, Any],
    *,
    num_classes: int | None = None,
    include_top: bool = True,
    preprocess: bool = True,
) -> keras.Model:
    """Load the preset at `directory` for which `verify_preset` has just returned `record`.

    For callers that verified the directory while finding it (`harmonization.loader`): checking every file's
    sha256 again would read the weights a second time. Anyone else should call `load_preset`.
    """
    directory = Path(directory)
    config = _read_config(directory)
    import harmonization.architectures  # noqa: F401  (registers the zoo's classes, which the check looks up)

    _check_buildable(config, directory, record)
    model = _deserialize(config, directory)
    _inside(directory, WEIGHTS_FILE)  # Keras needs the name ending in .weights.h5, which a cache blob lacks
    try:
        model.load_weights(str(directory / WEIGHTS_FILE))
    except (ValueError, OSError, KeyError) as error:
        raise PresetError(
            f"The weights in {str(directory / WEIGHTS_FILE)!r} do not fit the model in {CONFIG_FILE}: {error}"
        ) from error
    names = record.get("class_names")
    if names is not None:
        try:
            names = _check_class_names(names, model, f"{METADATA_FILE} 'class_names' in {str(directory)!r}")
        except (TypeError, ValueError) as error:
            raise PresetError(str(error), bad_file=directory / METADATA_FILE) from None
        # A tuple of str: a plain attribute, which Keras neither tracks nor saves.
        model.class_names = tuple(names)

    overrides = {}
    if num_classes is not None:
        overrides["num_classes"] = check_int(num_classes, "num_classes", minimum=1, expected="a positive int or None")
    if include_top is not True:
        overrides["include_top"] = bool(include_top)
    if preprocess is not True:
        overrides["preprocess"] = bool(preprocess)
    if not overrides:
        return model

    inner = config.get("config", {})
    unsupported = sorted(key for key in overrides if key not in inner)
    if unsupported:
        raise ValueError(
            f"load_model: the model in {str(directory)!r} ({config['class_name']}) does not support "
            f"{unsupported}; only zoo architectures (harmonization.architectures) can swap their head or drop "
            "their preprocessing."
        )
    if all(inner[key] == value for key, value in overrides.items()):
        return model
    variant_config = copy.deepcopy(config)
    variant_config["config"].update(overrides)
    variant = _deserialize(variant_config, directory)
    head = getattr(variant, "classifier_name", "predictions")
    fresh = {head} if "num_classes" in overrides and overrides["num_classes"] != inner["num_classes"] else set()
    _transfer_weights(model, variant, fresh=fresh)
    if names is not None and not fresh and variant_config["config"].get("include_top", True):
        variant.class_names = tuple(names)
    return variant


# `harmonization.presets.load_model` (0.1) is now `harmonization.loader.load_model`: the format module knows nothing
# of zoo names or the Hub, and resolves the old name on use, importing nothing above it.
__getattr__ = moved_names(__name__, {"load_model": "harmonization.loader"})
