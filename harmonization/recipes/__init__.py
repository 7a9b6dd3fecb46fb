"""Training recipes: small, versioned JSON files that say everything `harmonization train` does.

A recipe names the model, the data (ClickMe, optionally mixed with ImageNet), the optimizer and its schedule,
the harmonizer's weights, precision, epochs, batch size, checkpoints and evaluation. One ships per published
model (`resnet50v2_harmonized.json`, ...) and one, `quickstart`, runs on the quickstart's generated dataset in
a couple of minutes on a CPU. Each recipe's `sources` block says which values are published (and where) and
which are our documented defaults: the published package (serre-lab/Harmonization 0.0.9) ships the loss and
the data pipeline, not the optimizer, schedule, epochs or initialisation of its models.

Everything here is the standard library, so that `harmonization train --help` and recipe errors come at once,
before TensorFlow is imported (the command checks the recipe first). `SCHEMA` is the one list of keys: a recipe file may leave out a key (its
default applies), and an unknown key, a value of the wrong type and a `--set` that does not parse are
refused with the key, what was expected and what came.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

from harmonization._io import json_depth

#: The format of recipe files; a file with another version is refused (its keys may mean something else).
RECIPE_VERSION = 1

#: Keys that may change between the runs of one run directory (extending training, evaluating differently,
#: writing checkpoints more often): everything else fixes what the checkpoints mean.
RESUMABLE_CHANGES = ("epochs", "evaluation", "checkpoint", "description", "sources")

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step")
INITIALISATIONS = ("random", "pretrained")

#: The largest integer any key takes unless it says less: TensorFlow counts steps, sizes and buffers in 32- or
#: 64-bit integers, and a bigger value fails deep inside it (or aborts the process) instead of here.
INT_LIMIT = 2**31 - 1
#: Nesting allowed in a recipe file (and in `sources`, the one free-form block): the schema is two levels deep,
#: and Python's JSON reader and writer recurse, so a deeper file would fail with a RecursionError.
MAX_DEPTH = 16
#: A recipe's name names its default run directory (./harmonization_runs/NAME): one plain folder name.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclasses.dataclass(frozen=True)
class Field:
    """One recipe key: its type(s), default and bounds; `describe` is the expectation errors name."""

    types: tuple[type, ...]
    default: Any
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    nullable: bool = False
    length: int | None = None  # for lists: exactly this many numbers
    above: bool = False  # the minimum itself is refused (strictly greater)
    pattern: re.Pattern | None = None  # for strings: the whole text must match
    pattern_text: str = ""  # what `pattern` means, for errors

    @property
    def upper(self) -> float | None:
        """The largest value allowed: the key's own maximum, else `INT_LIMIT` for integers."""
        if self.maximum is None and self.types == (int,):
            return INT_LIMIT
        return self.maximum

    def describe(self) -> str:
        if self.choices:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.length is not None:
            text = f"a list of {self.length} numbers"
        elif self.types == (bool,):
            text = "true or false"
        elif self.types == (int,):
            text = "an integer"
        elif float in self.types:
            text = "a number"
        elif self.pattern is not None:
            text = f"a string of {self.pattern_text}"
        else:
            text = "a string"
        upper = self.upper
        if self.minimum is not None and upper is not None and not self.above:
            text += f" in [{_bound(self.minimum)}, {_bound(upper)}]"
        elif self.minimum is not None:
            text += f" {'>' if self.above else '>='} {_bound(self.minimum)}"
            if upper is not None:
                text += f" and <= {_bound(upper)}"
        return text + (" or null" if self.nullable else "")

    def check(self, value: Any, key: str) -> Any:
        """`value` if it fits (ints accepted for numbers, as floats); a ValueError naming `key` otherwise."""
        if value is None and self.nullable:
            return None
        ok = True
        if self.length is not None:
            ok = (isinstance(value, list) and len(value) == self.length
                  and all(_is_number(v) for v in value))
            if ok:
                value = [float(v) for v in value]
        elif self.types == (bool,):
            ok = isinstance(value, bool)
        elif self.types == (int,):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif float in self.types:
            try:
                ok = _is_number(value) and math.isfinite(float(value))
            except OverflowError:  # a JSON integer beyond float's range
                ok = False
            value = float(value) if ok else value
        else:
            ok = (isinstance(value, str) and (self.choices is None or value in self.choices)
                  and (self.pattern is None or self.pattern.match(value) is not None))
        if ok and self.minimum is not None and self.length is None and not isinstance(value, str):
            ok = (value > self.minimum if self.above else value >= self.minimum) and (
                self.upper is None or value <= self.upper)
        if not ok:
            raise RecipeError(f"Recipe key `{key}` must be {self.describe()}; got {value!r}.")
        return value


def _bound(number: float) -> str:
    """A bound as people write it: 2147483647, not 2.14748e+09."""
    return str(int(number)) if float(number).is_integer() and abs(number) < 1e16 else f"{number:g}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class RecipeError(ValueError):
    """A recipe (file, name or `--set`) that cannot be used; the message names the key and the value."""


def _f(types, default, **bounds) -> Field:
    return Field(types if isinstance(types, tuple) else (types,), default, **bounds)


# The schema: nested dicts of Fields. The defaults are those of a recipe that says nothing else.
SCHEMA: dict[str, Any] = {
    "recipe_version": _f(int, RECIPE_VERSION, minimum=RECIPE_VERSION, maximum=RECIPE_VERSION),
    "name": _f(str, "custom", pattern=NAME_PATTERN,
               pattern_text="at most 100 letters, digits, '.', '_' or '-', starting with a letter or digit (it "
                            "names the run's folder)"),
    "description": _f(str, ""),
    "model": {
        # A zoo name, an hf://org/repo[@revision] URI, a preset directory, or "quickstart_cnn".
        "source": _f(str, "quickstart_cnn"),
        # "random": the architecture with fresh weights (zoo names and quickstart_cnn); "pretrained": the
        # preset's weights (zoo names, hf:// URIs, preset directories).
        "weights": _f(str, "random", choices=INITIALISATIONS),
    },
    "data": {
        # TFDS dataset with ClickMe's features (image, heatmap, label), optionally with its config.
        "clickme": _f(str, "clickme"),
        "train_split": _f(str, "train"),
        "eval_split": _f(str, "validation"),
        # At most 4096 px: the published models take 224; far larger sizes exhaust memory in TensorFlow's image
        # ops, which abort the process instead of raising.
        "image_size": _f(int, 224, minimum=8, maximum=4096),
        # Share of training examples drawn from ClickMe; the rest come from ImageNet (TFDS imagenet2012,
        # --imagenet-dir) without maps (token 0: cross-entropy only). 1.0: ClickMe only.
        "clickme_fraction": _f(float, 1.0, minimum=0.0, maximum=1.0),
        # Random resized crop + horizontal flip (harmonization.data, the same for image and map).
        "augment": _f(bool, True),
        "crop_scale": _f(float, [0.08, 1.0], length=2),
        "shuffle_buffer": _f(int, 2048, minimum=1),
    },
    "optimizer": {
        "name": _f(str, "sgd", choices=OPTIMIZERS),
        "learning_rate": _f(float, 0.1, minimum=0.0),
        "momentum": _f(float, 0.9, minimum=0.0, maximum=1.0),  # SGD only
        "nesterov": _f(bool, True),  # SGD only
        "weight_decay": _f(float, 0.05, minimum=0.0),  # AdamW's decoupled decay only
        # > 0: Keras silently ignores clipnorm=0 (no clipping at all); null means no clipping.
        "clipnorm": _f(float, None, minimum=0.0, above=True, nullable=True),
    },
    "schedule": {
        "name": _f(str, "cosine", choices=SCHEDULES),
        "warmup_epochs": _f(float, 0.0, minimum=0.0),
        "final_fraction": _f(float, 0.0, minimum=0.0, maximum=1.0),  # cosine: the last rate / the peak
        "step_epochs": _f(int, 30, minimum=1),  # step: multiply by step_gamma every step_epochs
        "step_gamma": _f(float, 0.1, minimum=0.0),
    },
    "harmonizer": {
        # HarmonizedModel's arguments; defaults are the published ones (serre-lab/Harmonization 0.0.9
        # harmonization/training/loss.py: harmonizer_loss and its cross-entropy).
        "lambda_harmonization": _f(float, 1.0, minimum=0.0),
        "lambda_weights": _f(float, 1e-5, minimum=0.0),
        "label_smoothing": _f(float, 0.1, minimum=0.0, maximum=0.999),
        # At most harmonization.losses.MAX_PYRAMID_LEVELS (a test keeps them equal; this module imports no
        # TensorFlow): halving 16 times takes any image to 1x1, and graphs of far more levels never finish.
        "pyramid_levels": _f(int, 5, minimum=1, maximum=16),
        "epsilon": _f(float, 1e-5, minimum=1e-12),
        "saliency": _f(str, "gradient_mean"),
    },
    "precision": _f(str, "float32", choices=PRECISIONS),
    "epochs": _f(int, 1, minimum=1, maximum=100_000),
    "batch_size": _f(int, 64, minimum=1),  # global: split across replicas
    "steps_per_epoch": _f(int, None, minimum=1, nullable=True),  # null: one pass over the training data
    "seed": _f(int, 0, minimum=0, maximum=2**31 - 1),
    # Deterministic ops (tf.config.experimental.enable_op_determinism): a resumed run ends with exactly the
    # weights of an uninterrupted one. Costs some speed on GPUs.
    "deterministic": _f(bool, True),
    "checkpoint": {
        "every_steps": _f(int, 500, minimum=1),  # and at the end of every epoch
        "keep": _f(int, 2, minimum=1),
    },
    "evaluation": {
        "each_epoch": _f(bool, True),  # validation loss, accuracy and Spearman after every epoch
        "limit": _f(int, None, minimum=1, nullable=True),  # at most this many images (null: the whole split)
        "batch_size": _f(int, 64, minimum=1),
        "final": _f(bool, True),  # `harmonization evaluate` on the final preset
    },
    # Free text: where each value comes from (published, or our default and why).
    "sources": _f(dict, {}),
}


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and not (name == "sources"):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


_FIELDS: dict[str, Field] = _flatten(SCHEMA)
KEYS: tuple[str, ...] = tuple(_FIELDS)


# Names people type for a key that has another name here.
_ALIASES = {"lr": "learning_rate", "wd": "weight_decay", "bs": "batch_size", "optimiser": "optimizer",
            "scheduler": "schedule", "lr_schedule": "schedule", "dataset": "clickme", "warmup": "warmup_epochs"}


def _closest(key: str) -> str:
    """" Did you mean `...`?" for a misspelt key: an alias of a leaf first, else the closest key or section."""
    *parents, leaf = key.split(".")
    aliased = ".".join([*parents, _ALIASES.get(leaf, leaf)])
    sections = sorted({k.rpartition(".")[0] for k in KEYS if "." in k})
    for candidate in (aliased, *(k for k in KEYS if k.endswith("." + _ALIASES.get(leaf, leaf)))):
        if candidate in KEYS or candidate in sections:
            return f" Did you mean `{candidate}`?"
    match = difflib.get_close_matches(key, [*KEYS, *sections], n=1, cutoff=0.6)
    return f" Did you mean `{match[0]}`?" if match else ""


def defaults() -> dict[str, Any]:
    """A recipe with every key at its default."""

    def fill(tree):
        return {k: fill(v) if isinstance(v, dict) else copy.deepcopy(v.default) for k, v in tree.items()}

    return fill(SCHEMA)


def _merge(base: dict[str, Any], given: Mapping[str, Any], where: str, prefix: str = "") -> dict[str, Any]:
    """`given` over `base`, refusing keys the schema does not have and checking each value."""
    if not isinstance(given, Mapping):
        raise RecipeError(f"{where}: `{prefix.rstrip('.') or 'the recipe'}` must be a JSON object; got {given!r}.")
    for key, value in given.items():
        name = f"{prefix}{key}"
        if name in _FIELDS:
            field = _FIELDS[name]
            if field.types == (dict,):
                if not isinstance(value, Mapping):
                    raise RecipeError(f"{where}: recipe key `{name}` must be a JSON object; got {value!r}.")
                base[key] = dict(value)
            else:
                base[key] = field.check(list(value) if isinstance(value, tuple) else value, name)
        elif isinstance(base.get(key), dict):
            base[key] = _merge(base[key], value, where, name + ".")
        else:
            raise RecipeError(f"{where}: unknown recipe key `{name}`.{_closest(name)} Known keys: {', '.join(KEYS)}.")
    return base


def _check_consistent(recipe: Mapping[str, Any], where: str) -> None:
    low, high = recipe["data"]["crop_scale"]
    if not 0 < low <= high <= 1:
        raise RecipeError(f"{where}: `data.crop_scale` must be [low, high] with 0 < low <= high <= 1; got "
                          f"{recipe['data']['crop_scale']!r}.")
    if recipe["schedule"]["name"] == "step" and recipe["schedule"]["warmup_epochs"] > 0:
        raise RecipeError(f"{where}: `schedule.warmup_epochs` applies to the cosine and constant schedules, not to "
                          "`step`; set it to 0, or use schedule.name=cosine.")
    if recipe["schedule"]["warmup_epochs"] >= recipe["epochs"] and recipe["schedule"]["warmup_epochs"] > 0:
        raise RecipeError(f"{where}: `schedule.warmup_epochs` ({recipe['schedule']['warmup_epochs']:g}) must be "
                          f"less than `epochs` ({recipe['epochs']}); e.g. --set schedule.warmup_epochs=0.")


def from_dict(data: Mapping[str, Any], where: str = "recipe") -> dict[str, Any]:
    """A complete, checked recipe from a (partial) dict: missing keys take their defaults."""
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where} must be a JSON object of recipe keys; got {type(data).__name__} {data!r:.80}.")
    if json_depth(data, stop_after=MAX_DEPTH) > MAX_DEPTH:
        raise RecipeError(f"{where} nests objects or lists more than {MAX_DEPTH} deep; a recipe has sections of "
                          "keys (and free text in `sources`), nothing deeper.")
    version = data.get("recipe_version", RECIPE_VERSION)
    if version != RECIPE_VERSION:
        raise RecipeError(f"{where}: `recipe_version` is {version!r}; this version of harmonization reads "
                          f"recipe_version {RECIPE_VERSION}.")
    recipe = _merge(defaults(), data, where)
    _check_consistent(recipe, where)
    return recipe


def _shipped() -> Any:
    return resources.files(__name__)


def list_recipes() -> list[str]:
    """The names of the recipes shipped with the package."""
    return sorted(p.name[:-5] for p in _shipped().iterdir() if p.name.endswith(".json"))


def load_recipe(name_or_path: str | os.PathLike, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """A shipped recipe by name (`"quickstart"`, `"vit_b16_harmonized"`) or a recipe file, with `--set` overrides.

    Args:
        name_or_path: a name from `list_recipes()`, or the path of a JSON recipe file.
        overrides: "key=value" strings, e.g. "optimizer.learning_rate=0.01" or "data.augment=false"; the value
            is read as JSON when it parses (numbers, true/false, null, lists), else as a string.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if text in list_recipes():
        where = f"recipe {text!r}"
        raw = (_shipped() / f"{text}.json").read_text(encoding="utf-8")
    elif path.suffix == ".json" or path.exists():
        if path.is_dir():
            raise RecipeError(f"Recipe {text!r} is a directory; pass a recipe JSON file or a shipped recipe's name "
                              f"({', '.join(list_recipes())}).")
        if not path.is_file():
            raise RecipeError(f"Recipe file {text!r} does not exist. Shipped recipes: {', '.join(list_recipes())}.")
        where = f"recipe file {text!r}"
        raw = path.read_text(encoding="utf-8")
    else:
        match = difflib.get_close_matches(text, list_recipes(), n=1, cutoff=0.5)
        hint = f" Did you mean {match[0]!r}?" if match else ""
        raise RecipeError(f"Unknown recipe {text!r}: not a shipped recipe ({', '.join(list_recipes())}) nor a "
                          f"JSON file.{hint}")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as error:
        raise RecipeError(f"{where} is not valid JSON: {error}.") from None
    except RecursionError:  # Python's reader recurses once per level
        raise RecipeError(f"{where} nests objects or lists thousands of levels deep; a recipe has sections of "
                          f"keys, at most {MAX_DEPTH} levels.") from None
    recipe = from_dict(data, where)
    return apply_overrides(recipe, overrides)


def parse_override(text: str) -> tuple[str, Any]:
    """"key=value" -> (key, value); the value as JSON when it parses, else the string itself."""
    key, sep, value = str(text).partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"--set {text!r}: expected KEY=VALUE, e.g. --set optimizer.learning_rate=0.01.")
    if key == "sources":
        raise RecipeError(f"--set {text!r}: `sources` is free text about the values; edit it in a recipe file.")
    if key not in _FIELDS:
        sections = sorted({k.split(".")[0] for k in KEYS if "." in k})
        if key in sections:
            keys = ", ".join(k for k in KEYS if k.startswith(key + "."))
            raise RecipeError(f"--set {text!r}: `{key}` is a section; set one of its keys ({keys}).")
        raise RecipeError(f"--set {text!r}: unknown recipe key `{key}`.{_closest(key)}")
    if _FIELDS[key].types == (str,) and not _FIELDS[key].nullable:
        return key, value  # a text key takes the text as typed (`--set name=1` is the name "1")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key, parsed


def apply_overrides(recipe: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """`recipe` with "key=value" overrides applied and checked (see `load_recipe`)."""
    if isinstance(overrides, (str, bytes)):
        raise RecipeError(f"`overrides` must be a list of 'key=value' strings, e.g. [{overrides!r}]; got the string "
                          f"{overrides!r}, which would be read letter by letter.")
    result = copy.deepcopy(dict(recipe))
    for text in overrides:
        key, value = parse_override(text)
        node = result
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        try:
            node[leaf] = _FIELDS[key].check(value, key)
        except RecipeError as error:
            raise RecipeError(f"--set {text!r}: {error}") from None
    _check_consistent(result, "--set")
    return result


def with_settings(recipe: Mapping[str, Any], **settings: Any) -> dict[str, Any]:
    """`recipe` with top-level keys replaced (the command's --epochs, --batch-size), checked."""
    result = copy.deepcopy(dict(recipe))
    for key, value in settings.items():
        if key not in _FIELDS or "." in key:
            raise RecipeError(f"Unknown top-level recipe key `{key}`.{_closest(key)}")
        if value is not None:
            result[key] = _FIELDS[key].check(value, key)
    _check_consistent(result, "recipe")
    return result


def identity(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """What fixes the meaning of a run's checkpoints: the recipe without `RESUMABLE_CHANGES`."""
    return {k: v for k, v in recipe.items() if k not in RESUMABLE_CHANGES}


def identity_hash(recipe: Mapping[str, Any]) -> str:
    """A short digest of `identity(recipe)` (stable: sorted keys)."""
    text = json.dumps(identity(recipe), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """"key: old -> new" for each flattened key whose value differs."""
    a, b = _flatten(old), _flatten(new)
    return [f"{key}: {a.get(key)!r} -> {b.get(key)!r}" for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]
