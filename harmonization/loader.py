"""Loading a model by what users call it: a preset directory, an `hf://` URI or a zoo name.

`load_model` resolves its argument to a verified preset directory and loads it (`harmonization.presets`). A zoo
name is looked up once (`harmonization.zoo.model_info`) and its *entry* is what travels from there on. It is
served from the entry's Hub repo (`harmonization.hub`, pinned revision, Hugging Face cache) or, while that repo
does not exist yet or the Hub cannot be reached, from its published original `.h5`: downloaded and verified
(`harmonization.originals`), converted with `harmonization.publish.build_preset` and cached as a preset under
`HARMONIZATION_CACHE` (default `~/.cache/harmonization`), where later calls, offline ones included, find it.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping

import keras

from harmonization import mirrors, network, presets, publish, zoo
from harmonization.hub import HF_SCHEME, HubUnavailableError, download_preset, parse_hf_uri
from harmonization.originals import cache_dir
from harmonization.presets import PresetError, load_preset

__all__ = ["cache_dir", "convert_original", "load_entry", "load_model", "load_resolved", "resolve_entry",
           "resolve_preset"]


def load_model(
    name_or_path_or_uri: str | os.PathLike,
    *,
    revision: str | None = None,
    num_classes: int | None = None,
    include_top: bool = True,
    preprocess: bool = True,
) -> keras.Model:
    """Load a model: a local preset directory, a Hub preset `hf://org/repo[@revision]`, or a zoo name.

    Resolution order: an existing local preset directory; an `hf://` URI; a name from
    `harmonization.list_models()`, served from its Hub repo (pinned revision, Hugging Face cache) or, while that
    repo does not exist yet, from its published original `.h5`, downloaded and converted once
    (`harmonization.convert`) and cached as a preset under `HARMONIZATION_CACHE`. Loading uses Keras
    `safe_mode` (no code from a downloaded config runs).

    Args:
        name_or_path_or_uri: str or path. Where the model is.
        revision: str or None. Hub branch, tag or commit to load (overrides an `@revision` in the URI and the
            zoo's pinned revision). Defaults to None.
        num_classes: int or None. Replace the classification head by a freshly initialised one with this many
            classes (for fine-tuning). Defaults to None (keep the published head).
        include_top: bool. Keep the classification head; False returns pooled features. Defaults to True.
        preprocess: bool. Keep the preprocessing inside the model (inputs are RGB in [0, 255]); False returns
            the bare network, which expects normalised inputs. Defaults to True.

    Returns:
        A `keras.Model` with the preset's weights. When the preset records class names and the head is kept,
        `model.class_names` holds them (a tuple of str, in output order; see `harmonization.presets.class_names`).

    Example:
        >>> model = harmonization.load_model("vit_b16_harmonized")
        >>> logits = model.predict(images_0_255)
    """
    variant = {"num_classes": num_classes, "include_top": include_top, "preprocess": preprocess}
    if isinstance(name_or_path_or_uri, str) and not name_or_path_or_uri.strip():
        raise ValueError(
            "load_model: `name_or_path_or_uri` is empty; expected a zoo name (harmonization.list_models()), "
            "'hf://org/repo[@revision]' or a preset directory."
        )
    if isinstance(name_or_path_or_uri, os.PathLike) or (
        isinstance(name_or_path_or_uri, str) and Path(name_or_path_or_uri).expanduser().is_dir()
    ):
        path = Path(name_or_path_or_uri).expanduser()
        if revision is not None:
            raise ValueError(f"load_model: `revision` applies to Hub models, not to the local preset {str(path)!r}.")
        if not path.is_dir():
            raise FileNotFoundError(f"load_model: no preset directory at {str(path)!r}.")
        return load_preset(path, **variant)
    if not isinstance(name_or_path_or_uri, str):
        raise TypeError(
            "load_model: `name_or_path_or_uri` must be a str or path, got "
            f"{type(name_or_path_or_uri).__name__}."
        )
    return load_resolved(resolve_preset(name_or_path_or_uri, revision=revision), **variant)


def load_entry(entry: Mapping[str, Any], *, revision: str | None = None, **variant: Any) -> keras.Model:
    """`load_model` of zoo `entry` (`harmonization.zoo.model_info(name)`), passed down without looking it up again."""
    return load_resolved(resolve_entry(entry, revision=revision), **variant)


def load_resolved(directory: Path, **variant: Any) -> keras.Model:
    """Load a preset directory that resolution has just verified (checking it again would hash the weights twice)."""
    return presets.load_verified_preset(directory, presets.read_metadata(directory), **variant)


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "~", "/")) or os.sep in text or (os.altsep is not None and os.altsep in text)


def resolve_preset(location: str | os.PathLike, *, revision: str | None = None) -> Path:
    """Turn a local preset directory, an `hf://` URI or a zoo name into a verified preset directory.

    A zoo name is looked up once; from there on its entry is passed down (`resolve_entry`).
    """
    if isinstance(location, os.PathLike):
        location = os.fspath(location)
    if not isinstance(location, str) or not location.strip():
        raise ValueError(
            f"Expected a zoo name (harmonization.list_models()), 'hf://org/repo[@revision]' or a preset directory; "
            f"got {location!r}."
        )
    local = Path(location).expanduser()
    if presets.is_preset_dir(local):
        if revision is not None:
            raise ValueError(f"`revision` ({revision!r}) applies to Hub models, not to the local preset "
                             f"{str(local)!r}; leave it out.")
        presets.verify_preset(local)
        return local
    if local.is_dir() and location not in zoo.list_models():
        presets.verify_preset(local)  # a folder that is no preset: says what it lacks, as load_model does
    if location.startswith(HF_SCHEME):
        repo_id, uri_revision = parse_hf_uri(location)
        return download_preset(repo_id, revision or uri_revision)
    if "://" in location:
        raise ValueError(
            f"Unsupported location {location!r}: use a zoo name (harmonization.list_models()), "
            "'hf://org/repo[@revision]' or a local preset directory."
        )
    if _looks_like_path(location) and location not in zoo.list_models():
        raise FileNotFoundError(
            f"No preset directory at {location!r} (a preset directory holds {presets.CONFIG_FILE}, "
            f"{presets.WEIGHTS_FILE} and {presets.METADATA_FILE})."
        )
    return resolve_entry(zoo.model_info(location), revision=revision)  # UnknownModelError names the closest


def resolve_entry(entry: Mapping[str, Any], *, revision: str | None = None) -> Path:
    """The verified preset of zoo `entry`: its Hub repo, else (no repo yet, or no Hub) its converted original.

    The Hub repo is read at `revision` (default: the entry's pinned revision). While that repo does not exist,
    or when the Hub cannot be reached and no `revision` was asked for, the published original `.h5` converted
    into a cached preset serves instead (`convert_original`).
    """
    from huggingface_hub.errors import RepositoryNotFoundError  # with the Hub client, not at import time

    hub = entry["hub"]
    try:
        return download_preset(hub["repo_id"], revision or hub.get("revision"))
    except RepositoryNotFoundError as error:
        if revision is not None:
            raise  # a pinned Hub revision cannot be served by the original file
        return convert_original(entry, reason=f"the Hub repo {hub['repo_id']!r} does not exist (yet)", cause=error)
    except HubUnavailableError as error:
        if revision is not None:
            raise  # a pinned Hub revision cannot be served by the original file
        # Offline, unreachable, or answering something else than the Hub's API: a conversion of the published
        # original (cached, or downloaded from its own server, which may well be reachable when the Hub is not)
        # serves instead.
        from huggingface_hub import constants

        hub_reason = str(error).split("\n", 1)[0]
        try:
            preset = convert_original(entry, reason="the Hugging Face Hub cannot be reached", cause=error)
        except HubUnavailableError as fallback_error:
            if constants.is_offline_mode():
                raise  # its message says how to get the weights of this zoo name
            original_reason = str(fallback_error).split("\n", 1)[0]
            raise HubUnavailableError(
                f"Zoo model {entry['name']!r} could not be fetched.\n- From the Hugging Face Hub: {hub_reason}\n"
                f"- From its published original: {original_reason}\n{network.offline_advice()}"
            ) from fallback_error
        if not constants.is_offline_mode():  # offline, the cache serving is what was asked for: nothing to say
            print(f"Zoo model {entry['name']!r} is served from its published original instead of the Hub: "
                  f"{hub_reason}", file=sys.stderr, flush=True)
        return preset


# --- the published original `.h5`, converted once -----------------------------------------------------------


def _conversion_dir(entry: Mapping[str, Any]) -> Path:
    # Keyed by the source URL, so that a zoo entry pointing at another file never reuses an old conversion.
    key = hashlib.sha256(entry["source"]["url"].encode()).hexdigest()[:12]
    return cache_dir() / "converted" / f"{entry['name']}-{key}"


def _cached_conversion(entry: Mapping[str, Any]) -> Path | None:
    """The verified converted preset of `entry`, or None (a damaged one is removed)."""
    directory = _conversion_dir(entry)
    if not presets.is_preset_dir(directory):
        return None
    try:
        record = presets.verify_preset(directory)
    except PresetError:
        shutil.rmtree(directory, ignore_errors=True)
        return None
    if record.get("source_url") != entry["source"]["url"]:
        shutil.rmtree(directory, ignore_errors=True)
        return None
    return directory


def convert_original(entry: Mapping[str, Any], *, reason: str = "", cause: BaseException | None = None) -> Path:
    """Serve zoo `entry` from its published original `.h5`: download, convert and cache it once; return the preset.

    `reason` says why the original serves (it starts the errors); `cause` is the error that made it serve.

    Raises:
        HubUnavailableError: offline (`HF_HUB_OFFLINE`) or the URL cannot be reached, and no conversion is cached.
        PresetError: the download is truncated or corrupted (nothing is cached).
        harmonization.convert.ConversionError: the file does not fit the zoo architecture.
    """
    from huggingface_hub import constants

    cached = _cached_conversion(entry)
    if cached is not None:
        return cached
    source = entry["source"]
    why = f"{reason}; " if reason else ""
    if constants.is_offline_mode():
        raise HubUnavailableError(
            f"Zoo model {entry['name']!r}: {why}its original weights ({mirrors.model_file_url(source['url'])}) are "
            f"not converted in {str(cache_dir())!r} and HF_HUB_OFFLINE is set. To get the weights, run "
            f"`harmonization download {entry['name']}` once with network access and HF_HUB_OFFLINE unset, or copy "
            "a preset directory to this machine and pass its path to load_model."
        ) from cause
    target = _conversion_dir(entry)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _conversion_lock(entry, target):
        cached = _cached_conversion(entry)  # converted by another process while we waited
        if cached is not None:
            return cached
        _remove_stale_work(entry, target)
        # Downloaded into `.NAME.*` beside the cache, where `_remove_stale_work` finds what a killed run left.
        publish.build_preset_from_original(entry, target, reason=reason, work_dir=target.parent)
    return target


_LOCK_TIMEOUT = 3600.0  # seconds: the other process's download is itself bounded (`harmonization.network`)


@contextlib.contextmanager
def _conversion_lock(entry: Mapping[str, Any], target: Path) -> Iterator[None]:
    """A lock file per conversion: two processes converting one model do the work once; the other waits, reuses it.

    The lock is an OS file lock (released when its process dies, even by SIGKILL), so it never outlives a crash.
    """
    from filelock import FileLock, Timeout

    lock = FileLock(str(target) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"Waiting for another process converting zoo model {entry['name']!r} (lock {lock.lock_file}) ...",
              file=sys.stderr, flush=True)
        try:
            lock.acquire(timeout=_LOCK_TIMEOUT)
        except Timeout:
            raise TimeoutError(
                f"Zoo model {entry['name']!r}: another process has been converting it for over "
                f"{_LOCK_TIMEOUT:g} s (lock {lock.lock_file}). Stop that process, or wait and try again."
            ) from None
    try:
        yield
    finally:
        lock.release()


def _remove_stale_work(entry: Mapping[str, Any], target: Path) -> None:
    """Delete what a killed conversion of `entry` left: its download folder and half-saved presets.

    Called with the conversion lock held, so no live process is using them.
    """
    for prefix in (f".{entry['name']}.", f".{target.name}."):
        for leftover in target.parent.glob(f"{glob.escape(prefix)}*"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
