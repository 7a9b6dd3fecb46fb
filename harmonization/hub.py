"""Remote access: verified preset directories from the Hugging Face Hub, and verified files from any URL.

Downloads go through `huggingface_hub.snapshot_download`, so its cache, progress bars and environment
(`HF_ENDPOINT`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE`, `HF_TOKEN`) apply unchanged. What it does not guarantee
we check ourselves before a model is built: the snapshot holds every preset file (it can silently return
a partial cached snapshot when the Hub cannot be listed), and each file has the size and sha256 recorded
in `metadata.json` and opens as HDF5. A file that fails is removed from the cache, so the next call
downloads it again instead of trusting it.

`download_file` fetches any other file (a published original, a ClickMe shard) with a progress bar, a bounded
wait (a timeout and a minimum rate) and retries (`harmonization.network`); a short or corrupted download, or a
web page served in its place, is detected and deleted. This module
knows nothing of the zoo: `harmonization.loader` turns names into the repos and URLs it fetches.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

from harmonization import network, presets
from harmonization._io import DISTRIBUTION, is_repo_id, library_version, moved_names
from harmonization.presets import PresetError

__all__ = ["HF_SCHEME", "HubUnavailableError", "download_file", "download_preset", "fetch_file", "parse_hf_uri"]

HF_SCHEME = "hf://"
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
    if not is_repo_id(repo_id) or (body.count("@") and not revision):
        raise ValueError(f"Invalid Hub URI {uri!r}: expected 'hf://org/repo' or 'hf://org/repo@revision'.")
    return repo_id, revision or None


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

    Every request has a timeout and every body a minimum rate (`harmonization.network`): a Hub that accepts the
    connection and never answers, or trickles, ends in `HubUnavailableError`, not in a wait without end. So does
    an endpoint that answers but not as the Hub does (a web page, a redirect loop), unless a complete snapshot
    is cached.

    Raises:
        HubUnavailableError: offline (`HF_HUB_OFFLINE=1`), or the Hub is unreachable, stalled, trickling or
            answers something else than the Hub's API, and nothing is cached.
        huggingface_hub.errors.RepositoryNotFoundError / RevisionNotFoundError: no such repo or revision.
        PresetError: the download is incomplete or a file is corrupted (the bad file is evicted from the cache).
    """
    import httpx2
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    network.timeout(), network.min_rate()  # a bad variable is named before any request
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
                library_name=DISTRIBUTION,
                library_version=library_version(),
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
    except (httpx2.RequestError, json.JSONDecodeError) as error:
        # The endpoint answered, but not as the Hub does (a web page, a redirect loop, a body that trickled or
        # dropped): as unreachable as a refused connection. The client serves its cache for the latter; so do we.
        snapshot = _complete_cached_snapshot(repo_id, revision)
        if snapshot is None:
            raise HubUnavailableError(
                f"Could not use the Hugging Face Hub at {constants.ENDPOINT} (HF_ENDPOINT) for {where}, and it is "
                f"not in the Hugging Face cache: {_unusable_answer(error)} ({_first_line(error)}).\n"
                f"{network.offline_advice()}"
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


def _complete_cached_snapshot(repo_id: str, revision: str) -> Path | None:
    """The cached snapshot of `repo_id` at `revision` when it holds every preset file, else None."""
    import huggingface_hub

    try:
        snapshot = Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=PRESET_PATTERNS,
                                                          local_files_only=True))
    except OSError:  # LocalEntryNotFoundError is one: nothing cached at that revision
        return None
    return snapshot if all((snapshot / name).is_file() for name in presets.REQUIRED_FILES) else None


def _unusable_answer(error: BaseException) -> str:
    """What was wrong with the Hub endpoint's answer, in words."""
    import httpx2

    if isinstance(error, httpx2.TooManyRedirects):
        return "it redirects in a loop"
    if isinstance(error, json.JSONDecodeError):
        return "it answered something that is not the Hub's JSON (a web page or a proxy's answer?)"
    if isinstance(error, httpx2.TransportError):
        return "the download failed"
    return "its answer is not the Hub's"


def _first_line(error: BaseException) -> str:
    """`error`'s type and the first line of its message."""
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _cause(error: BaseException) -> str:
    """The first line of the deepest cause of `error` (the network error behind the client's wrapper)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return _first_line(error)


def download_file(url: str, destination: str | os.PathLike, *, expected_sha256: str | None = None,
                  expected_size: int | None = None, timeout: float | None = None, progress: bool = True,
                  check: Callable[[Path], str | None] | None = None) -> Path:
    """Download `url` to `destination` (see `fetch_file`); return its path."""
    return fetch_file(url, destination, expected_sha256=expected_sha256, expected_size=expected_size,
                      timeout=timeout, progress=progress, check=check)[0]


def fetch_file(url: str, destination: str | os.PathLike, *, expected_sha256: str | None = None,
               expected_size: int | None = None, timeout: float | None = None, progress: bool = True,
               check: Callable[[Path], str | None] | None = None) -> tuple[Path, str]:
    """Download `url` to `destination` with a progress bar; only a complete, verified file is ever moved there.
    Returns (its path, its sha256, taken while it streamed: a caller that records the digest need not read a
    weights file of hundreds of MB again).

    The bytes go to a temporary `.incomplete` file first. A body shorter than its `Content-Length`, a size or
    sha256 different from the expected ones, an HTML page (a server's or proxy's answer instead of the file), or
    a file that `check` (given the complete temporary file, it returns what is wrong with it, or None) refuses
    raises `PresetError` and leaves nothing behind. Connecting and each read wait at most `timeout` seconds
    (default `harmonization.network.timeout()`), and the body must arrive at `network.min_rate()`; a connection
    that fails, stalls or trickles is tried again, `network.attempts()` times in all, then raises
    `HubUnavailableError`. `progress=False` hides the progress bar (for callers that show their own).
    """
    import urllib.error

    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".incomplete")
    timeout = network.timeout() if timeout is None else timeout
    minimum = network.min_rate()  # a bad variable is named before any request, and leaves no file behind

    def transient(error: BaseException) -> bool:
        if isinstance(error, urllib.error.HTTPError):
            return error.code == 429 or error.code >= 500
        return isinstance(error, OSError)  # refused, reset, timed out, too slow (URLError is an OSError)

    try:
        announced, received, sha256 = network.retry(
            lambda: _fetch(url, partial, destination.name, timeout, minimum, progress), transient=transient
        )
    except OSError as error:
        partial.unlink(missing_ok=True)
        if isinstance(error, urllib.error.HTTPError):
            raise HubUnavailableError(f"Could not download {url}: HTTP {error.code} {error.reason}.") from error
        if isinstance(error, network.TooSlowError):
            raise HubUnavailableError(
                f"Could not download {url}: the last of {network.attempts()} tries sent {error.received} bytes in "
                f"{error.seconds:.1f} s ({network.format_rate(error.rate)}), slower than the minimum of "
                f"{network.format_rate(error.minimum)} ({network.MIN_RATE_ENV})."
            ) from error
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
    wrong = _html_page(partial) or (check(partial) if check is not None else None)
    if wrong:
        partial.unlink(missing_ok=True)
        raise PresetError(f"The download of {url} is not the file asked for and was deleted: {wrong}; check the URL "
                          "(or the mirror that serves it).")
    os.replace(partial, destination)
    return destination, sha256


def _html_page(path: Path) -> str | None:
    """A sentence when the file at `path` is an HTML page (what a server or proxy answers instead of a missing
    file), else None. None of the files we download (HDF5, TFRecord) starts like one."""
    with open(path, "rb") as handle:
        head = handle.read(256)
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return f"the server answered an HTML page, not the file (it starts with {head[:40]!r})"
    return None


def _fetch(url: str, partial: Path, label: str, timeout: float, minimum: float,
           progress: bool) -> tuple[int | None, int, str]:
    """One attempt: stream `url` into `partial`; return (announced length, bytes received, sha256).

    Writes whatever has arrived (`read1`), not 1 MiB at a time: a read that waits for a whole chunk would keep
    a trickling server's download (and its progress bar) still, beyond the reach of the read timeout.
    Raises `network.TooSlowError` when the body arrives slower than `minimum` bytes/s over a `timeout` window.
    """
    import http.client
    import urllib.request

    from huggingface_hub.utils import tqdm as hf_tqdm

    digest, received = hashlib.sha256(), 0
    request = urllib.request.Request(url, headers={"User-Agent": f"{DISTRIBUTION}/{library_version()}"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(partial, "wb") as handle:
        announced = response.headers.get("Content-Length")
        announced = int(announced) if announced is not None else None
        read = getattr(response, "read1", None) or response.read
        guard = network.RateGuard(url, minimum=minimum, window=timeout)
        with hf_tqdm(total=announced, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=f"Downloading {label}", disable=not progress) as bar:
            while True:
                try:
                    chunk = read(1 << 20)
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
                guard.add(len(chunk))
    return announced, received, digest.hexdigest()


# 0.1 names that turn zoo names into presets now live in `harmonization.loader`, above the zoo. Resolved on use,
# so that this module imports nothing above it (`harmonization.hub.resolve_preset(...)` keeps working).
__getattr__ = moved_names(__name__, {
    "cache_dir": "harmonization.originals",
    "convert_original": "harmonization.loader",
    "resolve_preset": "harmonization.loader",
})
