"""Resolving zoo names and `hf://` URIs to verified preset directories in the Hugging Face cache.

Downloads go through `huggingface_hub.snapshot_download`, so its cache, progress bars and environment
(`HF_ENDPOINT`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE`, `HF_TOKEN`) apply unchanged. What it does not guarantee
we check ourselves before a model is built: the snapshot holds every preset file (it can silently return
a partial cached snapshot when the Hub cannot be listed), and each file has the size and sha256 recorded
in `metadata.json` and opens as HDF5. A file that fails is removed from the cache, so the next call
downloads it again instead of trusting it.

A zoo model whose Hub repo does not exist yet is served from its published original: the Keras-2 `.h5` is
downloaded from its public URL (with a progress bar; a short or corrupted download is detected and deleted),
converted once with `harmonization.convert`, and cached as a preset under `HARMONIZATION_CACHE` (default
`~/.cache/harmonization`), where later calls, offline ones included, find it. `HARMONIZATION_MODELS_URL` points
that download at a mirror (`harmonization.mirrors`).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

from harmonization import mirrors, network, originals, presets
from harmonization.originals import cache_dir
from harmonization.presets import PresetError

__all__ = [
    "HF_SCHEME",
    "HubUnavailableError",
    "cache_dir",
    "convert_original",
    "download_file",
    "download_preset",
    "parse_hf_uri",
    "resolve_preset",
]

HF_SCHEME = "hf://"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# Files a preset is made of; nothing else in the repo is downloaded.
PRESET_PATTERNS = [presets.CONFIG_FILE, presets.WEIGHTS_FILE, presets.METADATA_FILE, presets.README_FILE]


class HubUnavailableError(OSError):
    """The weights are not in the local cache and cannot be downloaded now (offline, or the Hub is unreachable)."""


def parse_hf_uri(uri: str) -> tuple[str, str | None]:
    """`hf://org/repo[@revision]` -> (`org/repo`, revision or None), with a clear error on anything else."""
    if not uri.startswith(HF_SCHEME):
        raise ValueError(f"Expected a Hub URI 'hf://org/repo[@revision]', got {uri!r}.")
    body = uri[len(HF_SCHEME):]
    repo_id, _, revision = body.partition("@")
    if not _REPO_ID.match(repo_id) or (body.count("@") and not revision):
        raise ValueError(f"Invalid Hub URI {uri!r}: expected 'hf://org/repo' or 'hf://org/repo@revision'.")
    return repo_id, revision or None


def _library_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("harmonization-hub")
    except metadata.PackageNotFoundError:
        return "unknown"


def _evict(snapshot: Path, filename: str) -> None:
    """Remove a cached file (the snapshot's link and the blob it points to) so it is downloaded again."""
    path = snapshot / filename
    try:
        blob = path.resolve(strict=True) if path.is_symlink() else None
    except OSError:
        blob = None
    for victim in (path, blob):
        if victim is not None:
            try:
                victim.unlink()
            except FileNotFoundError:
                pass


def download_preset(repo_id: str, revision: str | None = None, *, force_download: bool = False) -> Path:
    """Download the preset in Hub repo `repo_id` at `revision` (default "main") and return its verified directory.

    Every request has a timeout (`harmonization.network`): a Hub that accepts the connection and never answers
    ends in `HubUnavailableError`, not in a wait without end.

    Raises:
        HubUnavailableError: offline (`HF_HUB_OFFLINE=1`), or the Hub is unreachable or stalled, and nothing is
            cached.
        huggingface_hub.errors.RepositoryNotFoundError / RevisionNotFoundError: no such repo or revision.
        PresetError: the download is incomplete or a file is corrupted (the bad file is evicted from the cache).
    """
    import httpx2
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    network.bound_huggingface_hub()
    revision = revision or "main"
    where = f"hf://{repo_id}@{revision}"
    try:
        snapshot = Path(
            huggingface_hub.snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=PRESET_PATTERNS,
                force_download=force_download,
                library_name="harmonization-hub",
                library_version=_library_version(),
            )
        )
    except LocalEntryNotFoundError as error:  # includes IncompleteSnapshotError's cousins raised offline
        if constants.is_offline_mode():
            raise HubUnavailableError(
                f"{where} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set. "
                "To get the weights, run `harmonization download "
                f"hf://{repo_id}@{revision}` (or call harmonization.load_model) once with network access and "
                "HF_HUB_OFFLINE unset, or copy a preset directory to this machine and pass its path to load_model."
            ) from error
        raise HubUnavailableError(
            f"Could not reach the Hugging Face Hub at {constants.ENDPOINT} (HF_ENDPOINT) for {where}, and it is "
            f"not in the Hugging Face cache ({constants.HF_HUB_CACHE}): {_cause(error)}.\n{network.offline_advice()}"
        ) from error
    except HfHubHTTPError:
        raise  # repo/revision not found, gated, server errors: the client's own message is the clearest
    except httpx2.TransportError as error:  # a file download that timed out or dropped after the client's retries
        raise HubUnavailableError(
            f"The download of {where} from {constants.ENDPOINT} (HF_ENDPOINT) failed: "
            f"{type(error).__name__}: {error}.\n{network.offline_advice()}"
        ) from error
    except OSError as error:
        # E.g. "Consistency check failed": the body was shorter than announced. huggingface_hub kept it as
        # `.incomplete` (resumed next time), never as a cached file.
        raise PresetError(
            f"The download of {where} was interrupted or truncated and was not kept: {error}\n"
            "Run again to resume the download."
        ) from error

    missing = [name for name in presets.REQUIRED_FILES if not (snapshot / name).is_file()]
    if missing:
        # snapshot_download returns a cached snapshot as-is when the Hub cannot list the repo.
        raise PresetError(
            f"The snapshot of {where} at {str(snapshot)!r} is incomplete: missing {missing}. Either the "
            "download was interrupted while the Hub could not be reached, or the repo is not a preset. "
            "Retry with network access; a preset repo must hold " + ", ".join(presets.REQUIRED_FILES) + "."
        )
    try:
        presets.verify_preset(snapshot)
    except PresetError as error:
        if error.bad_file is not None:
            _evict(snapshot, Path(error.bad_file).name)
        raise PresetError(
            f"The download of {where} is corrupted and was removed from the cache: {error}\n"
            "Run again to download it afresh; if this persists the file on the Hub is damaged."
        ) from error
    return snapshot


def _cause(error: BaseException) -> str:
    """The first line of the deepest cause of `error` (the network error behind the client's wrapper)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "~", "/")) or os.sep in text or (os.altsep is not None and os.altsep in text)


def resolve_preset(name_or_uri: str, *, revision: str | None = None) -> Path:
    """Turn a local preset directory, an `hf://` URI or a zoo name into a verified local preset directory.

    A zoo name resolves to its Hub repo at `revision` (default: the zoo's pinned revision). While that repo does
    not exist, or when the Hub cannot be reached and no `revision` was asked for, the published original `.h5`
    converted into a cached preset serves instead (`convert_original`).
    """
    if not isinstance(name_or_uri, str) or not name_or_uri.strip():
        raise ValueError(
            f"Expected a zoo name (harmonization.list_models()), 'hf://org/repo[@revision]' or a preset directory; "
            f"got {name_or_uri!r}."
        )
    local = Path(name_or_uri).expanduser()
    if presets.is_preset_dir(local):
        if revision is not None:
            raise ValueError(f"`revision` ({revision!r}) applies to Hub models, not to the local preset "
                             f"{str(local)!r}; leave it out.")
        presets.verify_preset(local)
        return local
    if name_or_uri.startswith(HF_SCHEME):
        repo_id, uri_revision = parse_hf_uri(name_or_uri)
        return download_preset(repo_id, revision or uri_revision)
    if "://" in name_or_uri:
        raise ValueError(
            f"Unsupported location {name_or_uri!r}: use a zoo name (harmonization.list_models()), "
            "'hf://org/repo[@revision]' or a local preset directory."
        )
    from harmonization import zoo

    if _looks_like_path(name_or_uri) and name_or_uri not in zoo.list_models():
        raise FileNotFoundError(
            f"No preset directory at {name_or_uri!r} (a preset directory holds {presets.CONFIG_FILE}, "
            f"{presets.WEIGHTS_FILE} and {presets.METADATA_FILE})."
        )
    entry = zoo.model_info(name_or_uri)  # UnknownModelError lists the zoo and the closest name
    hub = entry["hub"]
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return download_preset(hub["repo_id"], revision or hub.get("revision"))
    except RepositoryNotFoundError as error:
        if revision is not None:
            raise  # a pinned Hub revision cannot be served by the original file
        return convert_original(entry, reason=f"the Hub repo {hub['repo_id']!r} does not exist (yet)", cause=error)
    except HubUnavailableError as error:
        if revision is not None:
            raise  # a pinned Hub revision cannot be served by the original file
        # Offline or unreachable: a conversion of the published original (cached, or downloaded from its
        # own server, which may well be reachable when the Hub is not) serves instead.
        try:
            return convert_original(entry, reason="the Hugging Face Hub cannot be reached", cause=error)
        except HubUnavailableError as fallback_error:
            from huggingface_hub import constants

            if constants.is_offline_mode():
                raise  # its message says how to get the weights of this zoo name
            hub_reason, original_reason = (str(e).split("\n", 1)[0] for e in (error, fallback_error))
            raise HubUnavailableError(
                f"Zoo model {name_or_uri!r} could not be fetched.\n- From the Hugging Face Hub: {hub_reason}\n"
                f"- From its published original: {original_reason}\n{network.offline_advice()}"
            ) from fallback_error


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


def download_file(url: str, destination: str | os.PathLike, *, expected_sha256: str | None = None,
                  expected_size: int | None = None, timeout: float | None = None, progress: bool = True) -> Path:
    """Download `url` to `destination` with a progress bar; only a complete, verified file is ever moved there.

    The bytes go to a temporary `.incomplete` file first. A body shorter than its `Content-Length`, or a size
    or sha256 different from the expected ones, raises `PresetError` and leaves nothing behind. Connecting and
    each read wait at most `timeout` seconds (default `harmonization.network.timeout()`); a connection that
    fails or stalls is tried again, `network.attempts()` times in all, then raises `HubUnavailableError`.
    `progress=False` hides the progress bar (for callers that show their own).
    """
    import urllib.error

    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".incomplete")
    timeout = network.timeout() if timeout is None else timeout

    def transient(error: BaseException) -> bool:
        if isinstance(error, urllib.error.HTTPError):
            return error.code == 429 or error.code >= 500
        return isinstance(error, OSError)  # refused, reset, timed out (URLError is an OSError)

    try:
        announced, received, sha256 = network.retry(
            lambda: _fetch(url, partial, destination.name, timeout, progress), transient=transient
        )
    except OSError as error:
        partial.unlink(missing_ok=True)
        if isinstance(error, urllib.error.HTTPError):
            raise HubUnavailableError(f"Could not download {url}: HTTP {error.code} {error.reason}.") from error
        reason = getattr(error, "reason", error)
        raise HubUnavailableError(
            f"Could not download {url} (tried {network.attempts()} times, waiting up to {timeout:g} s for each "
            f"answer): {reason}.\n{network.offline_advice()}"
        ) from error
    problems = []
    if announced is not None and received != announced:
        problems.append(f"received {received} of the {announced} bytes announced (the connection dropped)")
    if expected_size is not None and received != expected_size:
        problems.append(f"expected {expected_size} bytes, received {received}")
    if expected_sha256 is not None and sha256 != expected_sha256:
        problems.append(f"expected sha256 {expected_sha256}, got {sha256}")
    if problems:
        partial.unlink(missing_ok=True)
        raise PresetError(f"The download of {url} is truncated or corrupted and was deleted: {'; '.join(problems)}. "
                          "Run again to download it afresh.")
    os.replace(partial, destination)
    return destination


def _fetch(url: str, partial: Path, label: str, timeout: float, progress: bool) -> tuple[int | None, int, str]:
    """One attempt: stream `url` into `partial`; return (announced length, bytes received, sha256)."""
    import http.client
    import urllib.request

    from huggingface_hub.utils import tqdm as hf_tqdm

    digest, received = hashlib.sha256(), 0
    request = urllib.request.Request(url, headers={"User-Agent": f"harmonization-hub/{_library_version()}"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(partial, "wb") as handle:
        announced = response.headers.get("Content-Length")
        announced = int(announced) if announced is not None else None
        with hf_tqdm(total=announced, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=f"Downloading {label}", disable=not progress) as bar:
            while True:
                try:
                    chunk = response.read(1 << 20)
                except http.client.IncompleteRead as error:  # the connection dropped: reported by the caller
                    chunk = error.partial
                    handle.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    break
                if not chunk:
                    break
                handle.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    return announced, received, digest.hexdigest()


def convert_original(entry: Mapping[str, Any], *, reason: str = "", cause: BaseException | None = None) -> Path:
    """Serve zoo `entry` from its published original `.h5`: download, convert and cache it once; return the preset.

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
    from harmonization.convert import convert_to_preset

    target = _conversion_dir(entry)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _conversion_lock(entry, target):
        cached = _cached_conversion(entry)  # converted by another process while we waited
        if cached is not None:
            return cached
        _remove_stale_work(entry, target)
        with tempfile.TemporaryDirectory(prefix=f".{entry['name']}.", dir=target.parent) as work:
            original = Path(work) / source["url"].rsplit("/", 1)[-1]
            # From HARMONIZATION_MODELS_URL when set; the cache stays keyed by the published URL (same file).
            url = mirrors.model_file_url(source["url"])
            expected, how = originals.expected_sha256(source)
            try:
                download_file(url, original, expected_sha256=expected, expected_size=source.get("size"))
            except HubUnavailableError as error:
                raise HubUnavailableError(
                    f"Zoo model {entry['name']!r}: {why}and its original weights could not be downloaded: {error}"
                ) from error
            except PresetError as error:
                if how != "first-use" or "expected sha256" not in str(error):
                    raise
                raise PresetError(
                    f"The original of zoo model {entry['name']!r} ({url}) was published without a sha256, and the "
                    f"file downloaded now differs from the one first downloaded here (expected sha256 {expected}, "
                    f"recorded in {str(originals.trust_store())!r}); it was deleted, nothing was converted. If the "
                    "file was replaced on purpose, delete its record from that file to trust the new one."
                ) from error
            convert_to_preset(original, entry["name"], target, source_url=source["url"])
        if how == "none":  # trusted on first use: the digest the conversion recorded (no second read)
            converted = presets.read_metadata(target)
            originals.record_first_download(source["url"], converted["source_sha256"], converted["source_size"])
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
