"""The conversion check a published model card reports: our converter against the original library's own output.

Why: a card says its weights reproduce the original model. The published full-size `.h5` files can only be run
by their original libraries (vit_keras, keras-cv-attention-models, `efficientnet`, Keras 2), which need
TensorFlow 2.15 with Keras 2 and cannot run beside this package. So the original libraries' behaviour is
recorded once, in a side environment, as reduced-size networks of the same families saved in the published
layouts with their logits on fixed images (`tests/fixtures/keras2/`, made by `tools/make_conversion_fixtures.py`
and described by its `manifest.json`, whose `native_config` names our architecture and the tiny config that is
the same network). At build time each fixture of the entry's family is converted with the same code path as the
published file (`harmonization.convert.load_keras2_weights` into the entry's architecture, with the entry's
in-model preprocessing) and its logits are compared with the original library's. The fixtures ship with a source
checkout only: an installed package reports that the check was not run, never a number it did not measure.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from harmonization import zoo
from harmonization.convert import load_keras2_weights, read_keras2_h5

__all__ = [
    "TOLERANCE",
    "ConversionCheck",
    "ConversionCheckError",
    "FixtureCheck",
    "check_entry",
    "default_fixtures_dir",
    "family_fixtures",
    "load_manifest",
]

#: The largest max |logit difference| the converted fixture may have against the original library's logits.
TOLERANCE = 1e-4
MANIFEST_FILE = "manifest.json"
_REFERENCE_OUTPUTS = ("pre_softmax_logits", "logits")  # the logits: before the softmax where the original had one


class ConversionCheckError(ValueError):
    """The converter does not reproduce the original library's logits on a fixture, or a fixture is unreadable."""


@dataclasses.dataclass(frozen=True)
class FixtureCheck:
    """One fixture converted and compared with the logits its original library recorded.

    Attributes:
        fixture: the fixture's file name (in `tests/fixtures/keras2/`).
        call: the original library call that built it (from the manifest).
        layout: "weights" or "full-model", as the published files.
        images: how many images the logits were compared on.
        image_size: their side, in pixels.
        reference: the recorded output compared with: "logits", or "pre_softmax_logits" where the original
            model ended in a softmax.
        max_abs_diff: max |logit difference| between our converted model and the original library.
    """

    fixture: str
    call: str
    layout: str
    images: int
    image_size: int
    reference: str
    max_abs_diff: float


def default_fixtures_dir() -> Path | None:
    """Where this source checkout keeps the conversion fixtures; None for an installed package (it has none)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "tools" / "make_conversion_fixtures.py").is_file():  # not a checkout: site-packages
        return None
    return root / "tests" / "fixtures" / "keras2"


def load_manifest(fixtures_dir: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The fixtures' `manifest.json` (default: this checkout's), or None when there is none."""
    folder = fixtures_dir if fixtures_dir is not None else default_fixtures_dir()
    path = None if folder is None else Path(folder) / MANIFEST_FILE
    if path is None or not path.is_file():
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(manifest, dict):
        raise ConversionCheckError(f"{str(path)!r} must hold a JSON object, got {type(manifest).__name__}.")
    return manifest


def family_fixtures(manifest: Mapping[str, Any], class_name: str) -> dict[str, dict[str, Any]]:
    """The manifest's fixtures whose native architecture is `class_name`, by name, in name order."""
    return {
        name: record for name, record in sorted(manifest.items())
        if not name.startswith("_") and (record.get("native_config") or {}).get("class_name") == class_name
    }


def _check_fixture(entry: Mapping[str, Any], folder: Path, name: str, record: Mapping[str, Any]) -> FixtureCheck:
    native = record["native_config"]
    # The entry's own module, class and in-model preprocessing, at the fixture's size.
    model = zoo.build({**entry, "architecture": {**entry["architecture"], "config": dict(native["config"])}})
    load_keras2_weights(model, read_keras2_h5(folder / record["file"]))
    with np.load(folder / f"{Path(record['file']).stem}.npz") as data:
        reference = next((key for key in _REFERENCE_OUTPUTS if key in data), None)
        if reference is None or "images" not in data:
            raise ConversionCheckError(f"Fixture {name}: its .npz holds no images or logits ({sorted(data)}).")
        images = data["images"].astype("float32")
        expected = data[reference].astype("float64")
    actual = np.asarray(model(images, training=False), dtype="float64")
    diff = float(np.max(np.abs(actual - expected)))
    if not np.isfinite(diff) or diff > TOLERANCE:
        raise ConversionCheckError(
            f"Converting fixture {record['file']} (made by {record['call']}) into "
            f"{entry['architecture']['class_name']} does not reproduce the original library's {reference}: "
            f"max |difference| {diff:.3g} > {TOLERANCE:g} on {len(images)} images."
        )
    return FixtureCheck(record["file"], record["call"], record["layout"], len(images), int(images.shape[1]),
                        reference, diff)


@dataclasses.dataclass(frozen=True)
class ConversionCheck:
    """What `check_entry` measured for one zoo entry.

    Attributes:
        checks: one `FixtureCheck` per fixture of the entry's family (empty when none was run).
        versions: the library versions that made the fixtures (the manifest's `_versions`).
        not_run: why no fixture was checked (no fixtures here, or none of this family); None when some were.
    """

    checks: tuple[FixtureCheck, ...]
    versions: dict[str, str]
    not_run: str | None = None


def check_entry(entry: Mapping[str, Any], fixtures_dir: str | os.PathLike | None = None) -> ConversionCheck:
    """Convert every fixture of zoo `entry`'s architecture family and compare it with the original library.

    `fixtures_dir` defaults to the source checkout's `tests/fixtures/keras2/`. Without it (an installed package)
    or without a fixture of the family, the result says why in `not_run` and holds no number.

    Raises:
        ConversionCheckError: a fixture's logits differ by more than `TOLERANCE`.
    """
    folder = fixtures_dir if fixtures_dir is not None else default_fixtures_dir()
    manifest = None if folder is None else load_manifest(folder)
    if manifest is None:
        return ConversionCheck((), {}, "the conversion fixtures made by the original libraries (tests/fixtures/"
                                        "keras2/ of a source checkout) were not available to this build")
    class_name = entry["architecture"]["class_name"]
    fixtures = family_fixtures(manifest, class_name)
    if not fixtures:
        return ConversionCheck((), {}, f"no conversion fixture made by an original library exists for {class_name}")
    checks = tuple(_check_fixture(entry, Path(folder), name, record) for name, record in fixtures.items())
    return ConversionCheck(checks, dict(manifest.get("_versions") or {}))
