"""Build the preset of a zoo model from its published original, and publish it to the Hugging Face Hub.

`build_preset(entry, source, out)` is the one way a published Keras-2 `.h5` becomes a preset: build the entry's
architecture (`harmonization.zoo.build`), load the file into it (`harmonization.convert`), record where it came
from, save it (`harmonization.presets`) and render its model card (`harmonization.model_card`). The loader's
cache of converted originals (`harmonization.loader`) and `publish` both use it.

A preset built for publishing (`check_round_trip=True`) also carries the evidence its card states: the round
trip, the converter against the original library on its reduced-size fixtures (`harmonization.conversion_check`),
and a saliency figure, `saliency.png` (`harmonization.card_figure`). The whole folder is a pure function of the
original file and the library versions, so a release built again uploads nothing new.

`publish(name, repo_id)` builds the preset (from `source`, else from the published original, downloaded and
verified), reloads it from disk and checks that its logits are those of the model it was saved from, renders
`MODEL_CARD.md` into its `README.md`, then creates the Hub repo (`exist_ok=True`) and uploads the folder in one
commit with the standard Hub token (`HF_TOKEN` or `hf auth login`). `dry_run=True` stops after writing the
folder. Uploads are staged in a temporary directory unless a folder is given, and the returned commit id is
what the zoo entry's `hub.revision` pins.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from harmonization import originals, presets, zoo
from harmonization._io import is_repo_id
from harmonization.card_figure import FIGURE_FILE, draw_saliency_figure
from harmonization.conversion_check import ConversionCheck, ConversionCheckError, check_entry
from harmonization.convert import Keras2File, load_keras2_weights, read_keras2_h5, source_facts
from harmonization.hub_upload import PublishError, require_token, upload_preset
from harmonization.model_card import TemplateNotFoundError, render_model_card

__all__ = [
    "BuiltPreset",
    "PublishError",
    "PublishResult",
    "build_preset",
    "build_preset_from_original",
    "build_publish_folder",
    "conversion_metadata",
    "convert",
    "convert_to_preset",
    "publish",
]

ROUND_TRIP_TOLERANCE = 1e-6


@dataclasses.dataclass
class PublishResult:
    """What `publish` did.

    Attributes:
        name: the zoo model.
        repo_id: the Hub repo.
        folder: the preset folder that was (or, in a dry run, would be) uploaded; None once a temporary
            staging folder is removed.
        round_trip_max_abs_diff: max |logit difference| between the model and the preset reloaded from disk.
        dry_run: True when nothing was uploaded.
        commit_oid: the Hub commit of the upload (pin it as `hub.revision` in models/NAME.json).
        commit_url: its URL.
        kept_hub_card: True when the repo already had a README.md that was left as it is.
    """

    name: str
    repo_id: str
    folder: Path | None
    round_trip_max_abs_diff: float
    dry_run: bool
    commit_oid: str | None = None
    commit_url: str | None = None
    kept_hub_card: bool = False


_ROUND_TRIP_IMAGES = 2  # random images the reloaded preset must reproduce the logits of


def _sample_images(model, count: int = _ROUND_TRIP_IMAGES, seed: int = 0) -> np.ndarray:
    shape = tuple(model.input_shape[1:])
    if any(d is None for d in shape):
        raise PublishError(f"Cannot check the round trip of a model with unknown input shape {model.input_shape}.")
    return np.random.default_rng(seed).uniform(0, 255, (count, *shape)).astype("float32")


def _entry_metadata(entry: Mapping[str, Any], source_url: str | None, num_classes: int | None) -> dict[str, Any]:
    """What a converted preset records about the zoo model it is: name, where the original was published, classes."""
    metadata: dict[str, Any] = {
        "architecture": entry["name"],
        "name": entry["name"],
        "source_url": source_url or entry["source"]["url"],
        "source_format": entry["source"]["format"],
    }
    imagenet_head = ((entry.get("training") or {}).get("dataset") == "imagenet-1k"
                     and entry["architecture"]["config"].get("num_classes") == 1000)
    if imagenet_head and num_classes in (None, 1000):
        metadata["class_names"] = zoo.imagenet_class_names()
    return metadata


def conversion_metadata(source: str | os.PathLike, arch: str, *, source_url: str | None = None,
                        keras2=None, num_classes: int | None = None) -> dict[str, Any]:
    """The `metadata.json` facts of a converted preset: where it comes from and how it was converted.

    A zoo model with its ImageNet-1k head also records the ImageNet `class_names`; `num_classes` (the converted
    model's outputs, default the zoo config's) leaves them out when the head was changed.
    """
    metadata = {"architecture": arch, **source_facts(source, keras2)}
    zoo_name = zoo.canonical_name(arch)
    if zoo_name is not None:
        metadata.update(_entry_metadata(zoo.model_info(zoo_name), source_url, num_classes))
    elif source_url:
        metadata["source_url"] = source_url
    return metadata


def _round_trip(model, folder: Path) -> float:
    """Max |logit difference| between `model` and the preset at `folder` reloaded from disk (PublishError if large)."""
    reloaded = presets.load_preset(folder)
    images = _sample_images(model)
    expected = np.asarray(model(images, training=False))
    actual = np.asarray(reloaded(images, training=False))
    diff = float(np.max(np.abs(expected - actual)))
    if not np.isfinite(diff) or diff > ROUND_TRIP_TOLERANCE:
        raise PublishError(
            f"The preset written to {str(folder)!r} does not reproduce the model: max |logit difference| {diff:.3g} "
            f"> {ROUND_TRIP_TOLERANCE:g} on {len(images)} images. Nothing was uploaded."
        )
    return diff


@dataclasses.dataclass
class BuiltPreset:
    """What `build_preset` wrote.

    Attributes:
        path: the preset directory.
        parameter_count: the converted model's parameters.
        round_trip_max_abs_diff: max |logit difference| after reloading, when `check_round_trip` was asked.
        card: True when a model card (README.md) was written.
        metadata: what `metadata.json` records about the source and the entry (beside what `save_preset` adds).
        conversion: the check against the original library's fixtures, when `check_round_trip` was asked.
        figure: the saliency figure (`saliency.png` in the folder), when one was drawn.
    """

    path: Path
    parameter_count: int
    round_trip_max_abs_diff: float | None = None
    card: bool = False
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    conversion: ConversionCheck | None = None
    figure: Path | None = None


def build_preset(entry: Mapping[str, Any], source: str | os.PathLike | Keras2File, out: str | os.PathLike, *,
                 source_url: str | None = None, config: Mapping[str, Any] | None = None,
                 repo_id: str | None = None, check_round_trip: bool = False, card: bool = True,
                 require_card: bool = False, source_sha256: str | None = None, figure: bool | None = None,
                 conversion_fixtures: str | os.PathLike | None = None) -> BuiltPreset:
    """Convert zoo `entry`'s published original `source` into a preset at `out`, with its model card.

    Args:
        entry: a zoo entry (`harmonization.zoo.model_info(name)`).
        source: the Keras-2 `.h5` file, or that file already read (`harmonization.convert.read_keras2_h5`).
        out: the preset directory to write.
        source_url: where the file was published. Defaults to the entry's `source.url`.
        config: constructor arguments overriding the entry's architecture config (e.g. a smaller `image_size`).
        repo_id: the Hub repo the card is for. Defaults to the entry's.
        check_round_trip: the checks of a published card, each shown on it with its numbers: reload the preset
            and compare its logits with the converted model's, and convert the family's fixtures made by the
            original library and compare with their logits (`harmonization.conversion_check`); PublishError when
            either differs.
        card: render the model card into `README.md`.
        require_card: raise TemplateNotFoundError when `MODEL_CARD.md` is not available, instead of writing
            the preset without a card.
        source_sha256: the source file's sha256 when already known (a verified download); else it is read.
        figure: draw the card's saliency figure into the folder (`saliency.png`, byte-for-byte the same for the
            same weights) and show it on the card. Defaults to `check_round_trip` (the cards that are published);
            drawn only with a card.
        conversion_fixtures: the folder of conversion fixtures. Defaults to the source checkout's
            `tests/fixtures/keras2/`; without it the card says the check against the original library was not run.

    Raises:
        harmonization.convert.ConversionError: the file does not fit the entry's architecture.
        PublishError: with `check_round_trip`, the reloaded preset or a converted fixture gives other logits.
    """
    keras2 = source if isinstance(source, Keras2File) else read_keras2_h5(source)
    model = zoo.build(entry, **dict(config or {}))
    report = load_keras2_weights(model, keras2)
    metadata = {**source_facts(keras2.path, keras2, sha256=source_sha256),
                **_entry_metadata(entry, source_url, model.output_shape[-1])}
    folder = presets.save_preset(model, out, metadata=metadata)
    checks: dict[str, tuple[str, str]] = {}
    diff = conversion = drawn = None
    if check_round_trip:
        diff = _round_trip(model, Path(folder))
        checks["Preset round trip: max abs logit difference after reloading"] = (
            f"{diff:.1e}", f"`harmonization publish`, {_ROUND_TRIP_IMAGES} random images")
        checks["Conversion from the original file"] = (
            f"{report.weights} of {keras2.weight_count} weights ({report.parameters:,} parameters) of "
            f"{metadata['source_file']} (sha256 {metadata['source_sha256'][:12]}...) loaded by name",
            "`harmonization.convert`")
        try:
            conversion = check_entry(entry, conversion_fixtures)
        except ConversionCheckError as error:
            raise PublishError(f"{error} Nothing was uploaded.") from error
    text = None
    if card:
        try:
            render = functools.partial(render_model_card, entry, repo_id=repo_id,
                                       parameter_count=model.count_params(), checks=checks or None,
                                       conversion=conversion)
            text = render()  # fails before the figure is drawn when there is no template
            if check_round_trip if figure is None else figure:
                drawn = draw_saliency_figure(model, Path(folder) / FIGURE_FILE, class_names=metadata.get("class_names"))
                text = render(figure=FIGURE_FILE)
        except TemplateNotFoundError:
            if require_card:
                raise
    if text is not None:
        (Path(folder) / presets.README_FILE).write_text(text, encoding="utf-8")
    return BuiltPreset(Path(folder), model.count_params(), diff, text is not None, metadata, conversion, drawn)


def build_preset_from_original(entry: Mapping[str, Any], out: str | os.PathLike, *, reason: str = "",
                               work_dir: str | os.PathLike | None = None, **options: Any) -> BuiltPreset:
    """`build_preset` from zoo `entry`'s published original, downloaded and verified (`originals.download_original`).

    The download goes to a temporary folder `.NAME.*` in `work_dir` (default: the system's), removed afterwards.
    An original without a published sha256 that was seen here for the first time is trusted from now on, once
    it has converted (its digest is recorded: `originals.record_first_download`). `options` go to `build_preset`.
    """
    with tempfile.TemporaryDirectory(prefix=f".{entry['name']}.", dir=work_dir) as work:
        original, how, sha256 = originals.download_original(entry, work, reason=reason)
        built = build_preset(entry, original, out, source_sha256=sha256, **options)  # hashed as it downloaded
    if how == "none":
        originals.record_first_download(entry["source"]["url"], built.metadata["source_sha256"],
                                        built.metadata["source_size"])
    return built


def convert(source: str | os.PathLike, arch: str, *, config: Mapping[str, Any] | None = None,
            preprocess: bool = True):
    """Build the native `arch` and load a published Keras-2 `.h5` file into it; return the Keras 3 model.

    Args:
        source: str or path. The `.h5` file (weights-only or full-model layout).
        arch: str. A zoo name (its architecture and config are used) or an architecture class name.
        config: mapping or None. Constructor arguments overriding the zoo config (e.g. a smaller
            `image_size`). Defaults to None.
        preprocess: bool. Keep the published normalisation inside the model (inputs RGB in [0, 255]).
            Defaults to True.

    Raises:
        ConversionError: the file does not fit the architecture (names, shapes, unused weights).
    """
    model = zoo.build_native(arch, {**dict(config or {}), "preprocess": preprocess})
    load_keras2_weights(model, source)
    return model


def convert_to_preset(source: str | os.PathLike | Keras2File, arch: str, out: str | os.PathLike, *,
                      config: Mapping[str, Any] | None = None, source_url: str | None = None,
                      model_card: bool = True) -> Path:
    """Convert `source` into `arch` (a zoo name or an architecture class) and save it as a preset at `out`.

    The preset records the source's sha256 and URL in `metadata.json`; for zoo models a model card is rendered
    into `README.md` when the `MODEL_CARD.md` template is available (`build_preset`).
    """
    zoo_name = zoo.canonical_name(arch)
    if zoo_name is not None:
        return build_preset(zoo.model_info(zoo_name), source, out, source_url=source_url, config=config,
                            card=model_card).path
    keras2 = source if isinstance(source, Keras2File) else read_keras2_h5(source)
    model = zoo.build_native(arch, config)
    load_keras2_weights(model, keras2)
    metadata = conversion_metadata(keras2.path, arch, source_url=source_url, keras2=keras2,
                                   num_classes=model.output_shape[-1])
    return Path(presets.save_preset(model, out, metadata=metadata))


def build_publish_folder(name: str, folder: str | os.PathLike, *, source: str | os.PathLike | None = None,
                         repo_id: str | None = None) -> tuple[Path, float]:
    """Write the preset of zoo model `name` with its model card to `folder`; return (folder, round-trip diff).

    `source` is the published original `.h5`; None downloads it (verified like `load_model`'s downloads).

    Raises:
        PublishError: the preset reloaded from disk does not give the logits of the model it was saved from.
    """
    entry = zoo.model_info(name)
    options = {"repo_id": repo_id, "check_round_trip": True, "require_card": True}
    if source is None:
        built = build_preset_from_original(entry, folder, reason="publishing", **options)
    else:
        built = build_preset(entry, source, folder, **options)
    return built.path, built.round_trip_max_abs_diff


def publish(name: str, repo_id: str, *, source: str | os.PathLike | None = None, dry_run: bool = False,
            folder: str | os.PathLike | None = None, private: bool | None = None,
            commit_message: str | None = None, overwrite_card: bool = False, force: bool = False,
            token: str | None = None) -> PublishResult:
    """Build, check and upload the preset of zoo model `name` to Hub repo `repo_id` (unless it is already there).

    The upload is `harmonization.hub_upload.upload_preset`'s: one commit, nothing sent that the repo already holds
    with the same digest, a repo holding another model refused unless `force`, and the commit checked after.
    `harmonization.release.release` publishes the whole zoo this way and pins it.

    Args:
        name: str. A zoo name (`harmonization.list_models()`).
        repo_id: str. The Hub repo, "org/name".
        source: path or None. The published original `.h5` to convert; None downloads it from its published
            URL (or `HARMONIZATION_MODELS_URL`), verified as `load_model` verifies it. Defaults to None.
        dry_run: bool. Write the folder only (to `folder`, required). Defaults to False.
        folder: path or None. Where to write the preset; None stages it in a temporary directory that is removed
            after the upload. Defaults to None.
        private: bool or None. Visibility of a repo that does not exist yet. Defaults to None (Hub default).
        commit_message: str or None. Defaults to "Publish NAME (harmonization-hub)".
        overwrite_card: bool. Replace a README.md the repo already has (it may hold edits made on the Hub).
            Defaults to False: only a repo without a card gets the rendered one.
        force: bool. Replace a repo that holds another model under this name. Defaults to False.
        token: str or None. A Hub token; None uses the standard one (`HF_TOKEN`, or `hf auth login`).

    Returns:
        A `PublishResult`; `commit_oid` is the revision to pin in models/NAME.json (`commit_url` is None when the
        repo already held this preset and nothing was uploaded).
    """
    zoo.model_info(name)  # an unknown name fails before any work
    if not is_repo_id(repo_id):
        raise ValueError(f"publish: `repo_id` must look like 'org/name', got {repo_id!r}.")
    if dry_run and folder is None:
        raise ValueError("publish: a dry run writes the preset folder only, so it needs `folder` (--out).")
    if not dry_run:
        require_token(token)  # before the download and conversion it would waste

    staging = None
    if folder is None:
        staging = tempfile.mkdtemp(prefix=f"harmonization-publish-{name}-")
        folder = Path(staging) / name
    try:
        folder, diff = build_publish_folder(name, folder, source=source, repo_id=repo_id)
        if dry_run:
            return PublishResult(name, repo_id, folder, diff, dry_run=True)
        commit, url, _, kept = upload_preset(
            folder, repo_id, token=token, force=force, overwrite_card=overwrite_card, private=private,
            commit_message=commit_message or f"Publish {name} (harmonization-hub)",
            commit_description=f"Preset of the harmonization-hub zoo model `{name}`, written by "
                               "`harmonization publish` after a reload round-trip check.")
        return PublishResult(name, repo_id, None if staging else folder, diff, dry_run=False,
                             commit_oid=commit, commit_url=url, kept_hub_card=kept)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
