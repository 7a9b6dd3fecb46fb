"""Publish a zoo model to the Hugging Face Hub as a preset with its model card.

`publish(name, repo_id)` builds the preset (converting the published original `.h5` when `source` is given,
else from what `load_model(name)` resolves), reloads it from disk and checks that its logits are those of the
model it was saved from, renders `MODEL_CARD.md` into its `README.md`, then creates the Hub repo
(`exist_ok=True`) and uploads the folder in one commit with the standard Hub token (`HF_TOKEN` or
`hf auth login`). `dry_run=True` stops after writing the folder. Uploads are staged in a temporary directory
unless a folder is given, and the returned commit id is what the zoo entry's `hub.revision` pins.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PublishError", "PublishResult", "build_publish_folder", "publish"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
ROUND_TRIP_TOLERANCE = 1e-6


class PublishError(OSError):
    """Publishing stopped: the preset does not round-trip, or the Hub refused the upload (nothing half-done is
    left on the Hub: the upload is one commit)."""


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


def _sample_images(model, count: int = 2, seed: int = 0) -> np.ndarray:
    shape = tuple(model.input_shape[1:])
    if any(d is None for d in shape):
        raise PublishError(f"Cannot check the round trip of a model with unknown input shape {model.input_shape}.")
    return np.random.default_rng(seed).uniform(0, 255, (count, *shape)).astype("float32")


def _source_model(name: str, source: str | os.PathLike | None) -> tuple[Any, dict[str, Any], list[str]]:
    """The model to publish, the metadata to record and the conversion checks to show on the card."""
    from harmonization import hub, presets
    from harmonization.convert import build_native, conversion_metadata, load_keras2_weights, read_keras2_h5

    if source is not None:
        keras2 = read_keras2_h5(source)
        model = build_native(name)
        report = load_keras2_weights(model, keras2)
        metadata = conversion_metadata(source, name, keras2=keras2, num_classes=model.output_shape[-1])
        checks = [f"{report.weights} of {keras2.weight_count} weights ({report.parameters:,} parameters) of "
                  f"{Path(source).name} (sha256 {metadata['source_sha256'][:12]}...) loaded by name"]
        return model, metadata, checks
    directory = hub.resolve_preset(name)
    model = presets.load_preset(directory)
    recorded = presets.read_metadata(directory)
    metadata = {k: v for k, v in recorded.items() if k not in presets._RESERVED_METADATA_KEYS}
    metadata.setdefault("name", name)
    return model, metadata, []


def build_publish_folder(name: str, folder: str | os.PathLike, *, source: str | os.PathLike | None = None,
                         repo_id: str | None = None) -> tuple[Path, float]:
    """Write the preset of zoo model `name` with its model card to `folder`; return (folder, round-trip diff).

    Raises:
        PublishError: the preset reloaded from disk does not give the logits of the model it was saved from.
    """
    from harmonization import presets, zoo
    from harmonization.model_card import render_model_card

    entry = zoo.model_info(name)
    model, metadata, conversion_checks = _source_model(name, source)
    folder = presets.save_preset(model, folder, metadata=metadata)
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
    checks = {"Preset round trip: max abs logit difference after reloading": (
        f"{diff:.1e}", f"`harmonization publish`, {len(images)} random images")}
    for line in conversion_checks:
        checks["Conversion from the original file"] = (line, "`harmonization.convert`")
    card = render_model_card(entry, repo_id=repo_id, parameter_count=model.count_params(), checks=checks)
    (Path(folder) / presets.README_FILE).write_text(card, encoding="utf-8")
    return Path(folder), diff


def publish(name: str, repo_id: str, *, source: str | os.PathLike | None = None, dry_run: bool = False,
            folder: str | os.PathLike | None = None, private: bool | None = None,
            commit_message: str | None = None, overwrite_card: bool = False,
            token: str | None = None) -> PublishResult:
    """Build, check and upload the preset of zoo model `name` to Hub repo `repo_id`.

    Args:
        name: str. A zoo name (`harmonization.list_models()`).
        repo_id: str. The Hub repo, "org/name".
        source: path or None. The published original `.h5` to convert; None publishes what
            `harmonization.load_model(name)` resolves. Defaults to None.
        dry_run: bool. Write the folder only (to `folder`, required). Defaults to False.
        folder: path or None. Where to write the preset; None stages it in a temporary directory that is removed
            after the upload. Defaults to None.
        private: bool or None. Visibility of a repo that does not exist yet. Defaults to None (Hub default).
        commit_message: str or None. Defaults to "Publish NAME (harmonization-hub)".
        overwrite_card: bool. Replace a README.md the repo already has (it may hold edits made on the Hub).
            Defaults to False: only a repo without a card gets the rendered one.
        token: str or None. A Hub token; None uses the standard one (`HF_TOKEN`, or `hf auth login`).

    Returns:
        A `PublishResult`; `commit_oid` is the revision to pin in models/NAME.json.
    """
    from harmonization import presets, zoo

    zoo.model_info(name)  # an unknown name fails before any work
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id):
        raise ValueError(f"publish: `repo_id` must look like 'org/name', got {repo_id!r}.")
    if dry_run and folder is None:
        raise ValueError("publish: a dry run writes the preset folder only, so it needs `folder` (--out).")

    staging = None
    if folder is None:
        staging = tempfile.mkdtemp(prefix=f"harmonization-publish-{name}-")
        folder = Path(staging) / name
    try:
        folder, diff = build_publish_folder(name, folder, source=source, repo_id=repo_id)
        if dry_run:
            return PublishResult(name, repo_id, folder, diff, dry_run=True)
        commit, kept = _upload(folder, repo_id, name=name, private=private, token=token,
                               commit_message=commit_message or f"Publish {name} (harmonization-hub)",
                               overwrite_card=overwrite_card, readme=presets.README_FILE)
        return PublishResult(name, repo_id, None if staging else folder, diff, dry_run=False,
                             commit_oid=commit.oid, commit_url=commit.commit_url, kept_hub_card=kept)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _upload(folder: Path, repo_id: str, *, name: str, private: bool | None, token: str | None,
            commit_message: str, overwrite_card: bool, readme: str):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token, library_name="harmonization-hub")
    try:
        api.create_repo(repo_id, exist_ok=True, private=private)
        kept = not overwrite_card and api.file_exists(repo_id, readme)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            commit_message=commit_message,
            commit_description=f"Preset of the harmonization-hub zoo model `{name}`, written by "
                               "`harmonization publish` after a reload round-trip check.",
            ignore_patterns=[readme] if kept else None,
        )
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        hint = ""
        if status in (401, 403):
            hint = ("\nThe Hub refused the credentials: log in with `hf auth login` or set HF_TOKEN to a token with "
                    f"write access to {repo_id.split('/')[0]!r}.")
        raise PublishError(f"Uploading {str(folder)!r} to hf://{repo_id} failed: {error}{hint}") from error
    return commit, kept
