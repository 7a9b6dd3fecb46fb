"""The model zoo registry: one JSON entry per published harmonized model.

The entries live in the repository's top-level `models/` folder and are installed as the package data of
`harmonization.models.entries` (never as a top-level `models` package, which would collide with users' own).

An entry keeps the architecture (a class of `harmonization.architectures` and its constructor arguments)
apart from where the weights live (Hub repo and pinned revision, original URL and file format) and how
inputs are prepared, like timm's `PretrainedCfg`. Entries are data, so they are read with
`importlib.resources` and work from a wheel as well as from a source checkout.

Each entry also records what its network outputs (`output`: ours always returns logits, the original file
may have returned probabilities) and the paper's numbers (`metrics`, see `paper_metrics`), each with where it
was read, so that cards and `harmonization evaluate` never show a number without its source.
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from harmonization import originals
from harmonization._io import write_atomic

__all__ = [
    "UnknownModelError",
    "build",
    "build_architecture",
    "build_native",
    "canonical_name",
    "closest_names",
    "default_namespace",
    "imagenet_class_names",
    "list_models",
    "model_for_file",
    "model_info",
    "normalization",
    "paper_metrics",
    "pin_hub_revision",
    "read_entries",
    "validate_entry",
    "with_family_defaults",
]

#: Where an installed package keeps the entries (setup.py maps the repository's `models/` folder here).
ZOO_PACKAGE = "harmonization.models.entries"
#: Where a source checkout keeps them, when `harmonization` is imported from the checkout itself.
_CHECKOUT_ENTRIES = Path(__file__).resolve().parent.parent / "models"
REQUIRED_KEYS = (
    "name", "description", "architecture", "parameter_count", "hub", "source", "preprocessing", "output", "license",
    "metrics",
)
_ARCHITECTURES_PACKAGE = "harmonization.architectures"
# What a network's last layer gives: `output.native` (the converted model) and `output.original` (the published file).
OUTPUT_KINDS = ("logits", "probabilities")
# The paper's numbers of a model (and of its baseline); both in %, or None where nothing was published.
PAPER_METRICS = ("imagenet_top1", "clickme_alignment")
_METRICS_KEYS = frozenset((*PAPER_METRICS, "baseline", "source", "source_url"))
IMAGENET_CLASSES_FILE = "imagenet_classes.txt"
# The keys of an in-model normalisation (harmonization.architectures.base.NORMALIZATION_KEYS; repeated here so
# that reading the zoo does not import Keras).
NORMALIZATION_KEYS = ("scale", "mean", "std")
#: What every entry of the family shares, merged under each entry (the leading "_" keeps it out of the zoo).
FAMILY_DEFAULTS_FILE = "_defaults.json"


class UnknownModelError(KeyError):
    """A name that is not in the zoo. Subclasses KeyError (a failed look-up) but prints as a sentence."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def validate_entry(entry: Any, filename: str) -> dict[str, Any]:
    """`entry` itself when it is a complete zoo entry (family defaults included); a ValueError naming the file
    and the key otherwise."""
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
    aliases = entry.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
        raise ValueError(f"Zoo entry {filename}: 'aliases' must be a list of names, got {aliases!r}.")
    _validate_output(entry["output"], filename)
    _validate_metrics(entry["metrics"], filename)
    return entry


def _validate_output(output: Any, filename: str) -> None:
    if not isinstance(output, dict):
        raise ValueError(f"Zoo entry {filename}: 'output' must be an object, got {output!r}.")
    for key in ("native", "original"):
        if output.get(key) not in OUTPUT_KINDS:
            raise ValueError(
                f"Zoo entry {filename}: 'output.{key}' must be one of {list(OUTPUT_KINDS)}, got {output.get(key)!r}."
            )
    if not isinstance(output.get("evidence"), str) or not output["evidence"].strip():
        raise ValueError(
            f"Zoo entry {filename}: 'output.evidence' must say how the original output is known (a non-empty "
            f"string), got {output.get('evidence')!r}."
        )


def _check_percent(value: Any, filename: str, key: str) -> None:
    # A JSON number (not `_numbers.is_number`: it imports NumPy, which reading the zoo does without).
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if value is not None and not (is_number and 0 <= value <= 100):
        raise ValueError(f"Zoo entry {filename}: '{key}' must be a percentage in [0, 100] or null, got {value!r}.")


def _validate_metrics(metrics: Any, filename: str) -> None:
    if not isinstance(metrics, dict):
        raise ValueError(f"Zoo entry {filename}: 'metrics' must be an object, got {metrics!r}.")
    missing = sorted(_METRICS_KEYS - set(metrics))
    unknown = sorted(set(metrics) - _METRICS_KEYS)
    if missing or unknown:
        raise ValueError(
            f"Zoo entry {filename}: 'metrics' must have exactly the keys {sorted(_METRICS_KEYS)}; "
            f"missing {missing}, unknown {unknown}."
        )
    baseline = metrics["baseline"]
    if not isinstance(baseline, dict) or set(baseline) != set(PAPER_METRICS):
        raise ValueError(
            f"Zoo entry {filename}: 'metrics.baseline' must be an object with the keys {list(PAPER_METRICS)} "
            f"(null where not published), got {baseline!r}."
        )
    for key in PAPER_METRICS:
        _check_percent(metrics[key], filename, f"metrics.{key}")
        _check_percent(baseline[key], filename, f"metrics.baseline.{key}")
    for key in ("source", "source_url"):
        if not isinstance(metrics[key], str) or not metrics[key].strip():
            raise ValueError(
                f"Zoo entry {filename}: 'metrics.{key}' must say where the numbers come from (a non-empty "
                f"string), got {metrics[key]!r}."
            )


def _entries_folder():
    """The folder of JSON entries: the installed package data, else the source checkout's `models/`."""
    try:
        return resources.files(ZOO_PACKAGE)
    except ModuleNotFoundError:
        # Imported from a clone without an editable install (e.g. `python -m pytest` in the clone).
        if _CHECKOUT_ENTRIES.is_dir():
            return _CHECKOUT_ENTRIES
        raise RuntimeError(
            f"The zoo's entries are missing: neither the package {ZOO_PACKAGE} nor {str(_CHECKOUT_ENTRIES)!r} "
            "exists. Reinstall harmonization-hub (`python -m pip install --force-reinstall --no-deps .` in a clone)."
        ) from None


def _fill(value: Any, fields: dict[str, str]) -> Any:
    """`value` with `{name}`-style fields of its strings filled in (the family defaults are templates)."""
    if isinstance(value, str):
        return value.format_map(fields)
    if isinstance(value, dict):
        return {key: _fill(item, fields) for key, item in value.items()}
    if isinstance(value, list):
        return [_fill(item, fields) for item in value]
    return value


def _merged(defaults: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """`entry` over `defaults`, object by object (the entry wins; lists and values are replaced whole)."""
    merged = copy.deepcopy(defaults)
    for key, value in entry.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def with_family_defaults(entry: Any, filename: str, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """A `models/NAME.json` entry completed by the family defaults (`models/_defaults.json`), then validated.

    Like timm's `_cfg()`: what the published models share is written once, and each entry holds only what
    differs. `{name}` and `{display_name}` in the defaults' strings become the entry's.
    """
    if not isinstance(entry, dict):
        raise ValueError(f"Zoo entry {filename} must be a JSON object, got {type(entry).__name__}.")
    defaults = _family_defaults() if defaults is None else defaults
    fields = {"name": str(entry.get("name", "")), "display_name": str(entry.get("display_name", entry.get("name", "")))}
    return validate_entry(_merged(_fill(defaults, fields), entry), filename)


def _read_defaults(folder) -> dict[str, Any]:
    defaults = json.loads(folder.joinpath(FAMILY_DEFAULTS_FILE).read_text(encoding="utf-8"))
    if not isinstance(defaults, dict):
        raise ValueError(f"{FAMILY_DEFAULTS_FILE} must be a JSON object, got {type(defaults).__name__}.")
    defaults.pop("doc", None)  # says what the file is; not part of any entry
    return defaults


def read_entries(folder: str | os.PathLike | Any) -> dict[str, dict[str, Any]]:
    """Every entry of a `models/` folder, completed by that folder's own `_defaults.json` and validated.

    The zoo reads the installed folder; `harmonization publish --all --models-dir DIR` reads (and pins) a
    checkout's.
    """
    folder = Path(folder) if isinstance(folder, (str, os.PathLike)) else folder
    defaults = _read_defaults(folder)
    entries = {}
    for item in sorted(folder.iterdir(), key=lambda item: item.name):
        if item.name.endswith(".json") and not item.name.startswith("_"):
            entry = with_family_defaults(json.loads(item.read_text(encoding="utf-8")), item.name, defaults)
            entries[entry["name"]] = entry
    return entries


@functools.lru_cache(maxsize=None)
def _family_defaults() -> dict[str, Any]:
    return _read_defaults(_entries_folder())


def default_namespace(folder: str | os.PathLike | None = None) -> str:
    """The Hub organisation the zoo is published under: the owner in `models/_defaults.json`'s `hub.repo_id`.

    Set in that one place; `harmonization publish --namespace ORG` publishes elsewhere for one run.
    """
    defaults = _family_defaults() if folder is None else _read_defaults(Path(folder))
    return defaults["hub"]["repo_id"].split("/", 1)[0]


def pin_hub_revision(folder: str | os.PathLike, name: str, repo_id: str, revision: str) -> Path:
    """Write `hub.repo_id` and `hub.revision` into `folder/NAME.json`: the zoo then loads exactly that commit.

    Only the `hub` object changes (key order and the rest of the file are kept); written atomically.
    """
    path = Path(folder) / f"{name}.json"
    entry = json.loads(path.read_text(encoding="utf-8"))
    hub = dict(entry.get("hub") or {})
    hub.update({"repo_id": repo_id, "revision": revision})
    hub.pop("note", None)  # the family's "not published yet" note no longer applies
    entry["hub"] = hub
    write_atomic(path, json.dumps(entry, indent=2, ensure_ascii=False) + "\n")
    return path


@functools.lru_cache(maxsize=None)
def _registry() -> dict[str, dict[str, Any]]:
    return read_entries(_entries_folder())


@functools.lru_cache(maxsize=None)
def _aliases() -> dict[str, str]:
    """Other name -> zoo name: each entry's `aliases` and the stem of its published file's name.

    The published package cached its files as `tiny_convnext_harmonized`, `vit-b16_harmonized`, ...
    (serre-lab/Harmonization 0.0.9 `models/*.py`, `tf.keras.utils.get_file(name, url)`), and the files are
    named `vit-b16_harmonized.h5`, `efficientnetB0_harmonized.h5`, ...: each of those names one zoo model.
    """
    registry = _registry()
    aliases: dict[str, str] = {}
    for name, entry in registry.items():
        stem = entry["source"]["url"].rsplit("/", 1)[-1].removesuffix(".h5")
        for alias in {*entry.get("aliases", []), stem} - {name}:
            if alias in registry or aliases.get(alias, name) != name:
                raise ValueError(f"Zoo alias {alias!r} of {name!r} is already the name or alias of another model.")
            aliases[alias] = name
    return aliases


def canonical_name(name: str) -> str | None:
    """The zoo name that `name` stands for (itself, or the model of a published name), or None.

    Example:
        >>> harmonization.zoo.canonical_name("tiny_convnext_harmonized")
        'convnext_tiny_harmonized'
    """
    if not isinstance(name, str):
        return None
    return name if name in _registry() else _aliases().get(name)


def model_for_file(path: str | os.PathLike) -> str | None:
    """The zoo model whose published file `path` is, judged by its name (`vit-b16_harmonized.h5`, or the
    extension-less name the published package cached it under, `~/.keras/models/vit-b16_harmonized`); or None.
    """
    stem = Path(path).name
    stem = stem[: -len(".h5")] if stem.lower().endswith(".h5") else stem
    exact = canonical_name(stem)
    if exact is not None:
        return exact
    folded = {known.lower(): known for known in (*_registry(), *_aliases())}
    return canonical_name(folded[stem.lower()]) if stem.lower() in folded else None


def closest_names(name: str, candidates: list[str] | None = None) -> list[str]:
    """The zoo names (and published names) closest to a misspelt `name`, best first (at most one)."""
    pool = candidates if candidates is not None else [*list_models(), *_aliases()]
    # Compared case-insensitively ("VGG16_Harmonized" is a case away from a name, not a misspelling).
    by_lower = {candidate.lower(): candidate for candidate in reversed(pool)}
    matches = difflib.get_close_matches(str(name).lower(), list(by_lower), n=1, cutoff=0.5)
    return [by_lower[match] for match in matches]


def list_models() -> list[str]:
    """Names of the models in the zoo, sorted.

    Example:
        >>> harmonization.list_models()
        ['convnext_tiny_harmonized', ..., 'vit_b16_harmonized']
    """
    return sorted(_registry())


def _unknown(name: str) -> UnknownModelError:
    names = list_models()
    close = closest_names(name)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return UnknownModelError(
        f"Unknown model {name!r}.{hint} The zoo has: {', '.join(names)}. "
        "Other accepted forms: a local preset directory, or 'hf://org/repo[@revision]'."
    )


def model_info(name: str) -> dict[str, Any]:
    """The zoo entry of `name` (a copy): architecture, weights location, preprocessing, licence, metrics.

    `name` is a zoo name or one of the published package's names for it (`tiny_convnext_harmonized`, ...).
    `source.verification` says how a download of the published original is checked on this machine (its
    published sha256, else trust on first use: `harmonization.originals`).

    Raises:
        UnknownModelError: `name` is not in the zoo; the message lists the zoo and the closest name.
    """
    entry = _entry(name)
    entry["source"]["verification"] = originals.verification(entry["source"])  # reads the trust store
    return entry


def _entry(name: str) -> dict[str, Any]:
    """`model_info` without the verification sentence: for lookups that only build or read the paper's numbers."""
    canonical = canonical_name(name)
    if canonical is None:
        raise _unknown(name)
    return copy.deepcopy(_registry()[canonical])


def paper_metrics(name: str) -> dict[str, Any]:
    """The paper's numbers for zoo model `name` and its baseline, with their source (a copy).

    Returns the entry's `metrics`: `imagenet_top1` (ImageNet-1k top-1 accuracy, %) and `clickme_alignment` (the
    ClickMe alignment score, %: mean Spearman correlation with the human maps divided by the human inter-rater
    ceiling `harmonization.HUMAN_CEILING`, times 100), each a float or None where nothing was published;
    `baseline` with the same two keys for the same architecture trained without harmonization; `source` and
    `source_url`, saying where each number was read (figure values are read off a plot, ±0.5 points).

    Example:
        >>> harmonization.zoo.paper_metrics("vgg16_harmonized")["clickme_alignment"]
        61.5
    """
    return _entry(name)["metrics"]


@functools.lru_cache(maxsize=None)
def _imagenet_class_names() -> tuple[str, ...]:
    text = resources.files("harmonization").joinpath(IMAGENET_CLASSES_FILE).read_text(encoding="utf-8")
    return tuple(text.splitlines())


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in class-index order ('tench', 'goldfish', ..., 'toilet tissue').

    Shipped with the package (made by tools/make_imagenet_classes.py), so no download is needed: the zoo's
    heads use this order.
    """
    return list(_imagenet_class_names())


def normalization(entry: Mapping[str, Any]) -> dict[str, Any] | bool:
    """What the entry's `preprocessing` block makes the model do to its input: `{"scale", "mean", "std"}`, or
    False when the block says the preprocessing is not inside the model (`in_model: false`)."""
    preprocessing = entry["preprocessing"]
    if not preprocessing.get("in_model", True):
        return False
    missing = [key for key in NORMALIZATION_KEYS if key not in preprocessing]
    if missing:
        raise ValueError(f"Zoo entry {entry['name']!r}: 'preprocessing' lacks {missing} (an in-model normalisation "
                         f"needs {list(NORMALIZATION_KEYS)}).")
    return {key: preprocessing[key] for key in NORMALIZATION_KEYS}


def build(entry: Mapping[str, Any], **overrides: Any):
    """Build the (randomly initialised) architecture of zoo `entry`; `overrides` update its config.

    The entry's `preprocessing` block is the normalisation layer inside the model (unless `preprocess`
    is overridden, e.g. `preprocess=False` for the bare network).
    """
    architecture = entry["architecture"]
    try:
        module = importlib.import_module(architecture["module"])
    except ModuleNotFoundError as error:
        raise NotImplementedError(
            f"The native Keras 3 architecture of {entry['name']!r} ({architecture['class_name']}) is not available "
            f"in this version of harmonization-hub ({error})."
        ) from None
    cls = getattr(module, architecture["class_name"])
    config = {**architecture["config"], **overrides}
    if config.get("preprocess", True) is True:
        config["preprocess"] = normalization(entry)
    return cls(**config)


def build_architecture(name: str, **overrides: Any):
    """Build the (randomly initialised) architecture of zoo model `name`; `overrides` update its config."""
    return build(_entry(name), **overrides)


def build_native(arch: str, config: Mapping[str, Any] | None = None):
    """Build the native architecture `arch`: a zoo name (its entry) or a class of `harmonization.architectures`."""
    # Imported here: reading the zoo (`harmonization list`) must not import Keras; building needs it anyway.
    import harmonization.architectures as architectures

    config = dict(config or {})
    zoo_name = canonical_name(arch)
    if zoo_name is not None:
        return build_architecture(zoo_name, **config)
    classes = sorted(n for n in architectures.__all__ if n not in ("ImageClassifier", "ImageNetNormalization"))
    cls = getattr(architectures, arch, None) if arch in classes else None
    if cls is None:
        close = closest_names(arch, [*list_models(), *classes]) or closest_names(arch)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"Unknown architecture {arch!r}.{hint} Use a zoo name ({', '.join(list_models())}), a published "
            f"file's name (e.g. vit-b16_harmonized) or an architecture class ({', '.join(classes)})."
        )
    return cls(**config)
