"""The published original files on this machine: where they are cached, and how a download of one is verified.

An original whose sha256 was published (the zoo entry's `source.sha256`) is checked against it. The 0.0.9
weights were published without digests, so for them we trust on first use: the sha256 of the first complete
download is recorded in `trusted_originals.json` in the cache, and every later download of that URL must have
the same digest — a file replaced on the server (or by a proxy) is refused instead of silently converted.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any, Mapping

from harmonization._io import write_atomic

__all__ = [
    "cache_dir", "download_original", "expected_sha256", "record_first_download", "trust_store", "verification",
]

_TRUST_FILE = "trusted_originals.json"
_LOCK_TIMEOUT = 60.0  # seconds; the store is only held for a read-modify-write


def cache_dir() -> Path:
    """Where converted originals are cached: `HARMONIZATION_CACHE`, else `$XDG_CACHE_HOME/harmonization`."""
    explicit = os.environ.get("HARMONIZATION_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "harmonization"


def trust_store() -> Path:
    """The file recording the sha256 of each original first downloaded here without a published digest."""
    return cache_dir() / _TRUST_FILE


def _read_store() -> dict[str, Any]:
    path = trust_store()
    if not path.is_file():
        return {}
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise OSError(
            f"The record of trusted original files {str(path)!r} cannot be read ({error}). It protects against "
            "replaced downloads; restore it, or delete it to trust the next downloads afresh."
        ) from None
    if not isinstance(records, dict):
        raise OSError(f"The record of trusted original files {str(path)!r} must hold a JSON object.")
    return records


def _first_use_record(url: str) -> dict[str, Any] | None:
    """The trust store's record of `url` ({"sha256", "size", "recorded"}), or None when there is none."""
    record = _read_store().get(url)
    return record if isinstance(record, dict) and isinstance(record.get("sha256"), str) else None


def expected_sha256(source: Mapping[str, Any]) -> tuple[str | None, str]:
    """(the sha256 a download of `source["url"]` must have, or None; "published" | "first-use" | "none")."""
    if source.get("sha256"):
        return source["sha256"], "published"
    record = _first_use_record(source["url"])
    return (record["sha256"], "first-use") if record is not None else (None, "none")


def record_first_download(url: str, sha256: str, size: int) -> None:
    """Remember the digest of the first download of `url` (kept if one is already recorded)."""
    from filelock import FileLock

    path = trust_store()
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=_LOCK_TIMEOUT):
        records = _read_store()
        if url in records:
            return
        records[url] = {
            "sha256": sha256,
            "size": int(size),
            "recorded": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        write_atomic(path, json.dumps(records, indent=2, sort_keys=True))


def verification(source: Mapping[str, Any]) -> str:
    """One sentence saying how a download of the original `source` is checked, for `model_info` and the CLI."""
    if source.get("sha256"):
        return f"checked against the published sha256 {source['sha256']}"
    try:
        record = _first_use_record(source["url"])  # the store is read once
    except OSError as error:
        return str(error)
    if record is not None:
        return (f"no published sha256; trusted on first use: every download must match the sha256 "
                f"{record['sha256']} recorded at the first download ({record.get('recorded', 'an earlier run')}) "
                f"in {str(trust_store())!r}")
    return ("no published sha256; trusted on first use: the first download's sha256 will be recorded in "
            f"{str(trust_store())!r} and every later download must match it")


def download_original(entry: Mapping[str, Any], directory: str | os.PathLike, *,
                      reason: str = "") -> tuple[Path, str, str]:
    """Download zoo `entry`'s published original `.h5` into `directory`, verified; return (path, how it was
    checked, its sha256).

    From `HARMONIZATION_MODELS_URL` when set (`harmonization.mirrors`). The file must have its published sha256,
    or the one recorded at its first download here; `how` is "published", "first-use" or "none" (nothing to check
    against yet: once the caller has used the file, `record_first_download` makes its digest the trusted one).

    Raises:
        harmonization.hub.HubUnavailableError: the file cannot be downloaded (the message starts with `reason`).
        harmonization.presets.PresetError: truncated, or not the file that was published or first downloaded.
    """
    # Imported here: the zoo imports this module to describe verification, and must not pull in Keras for that.
    from harmonization import mirrors
    from harmonization.hub import HubUnavailableError, fetch_file
    from harmonization.presets import PresetError

    source = entry["source"]
    why = f"{reason}; " if reason else ""
    original = Path(directory) / source["url"].rsplit("/", 1)[-1]
    # From HARMONIZATION_MODELS_URL when set; caches stay keyed by the published URL (same file).
    url = mirrors.model_file_url(source["url"])
    expected, how = expected_sha256(source)
    try:
        _, sha256 = fetch_file(url, original, expected_sha256=expected, expected_size=source.get("size"))
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
            f"recorded in {str(trust_store())!r}); it was deleted, nothing was converted. If the "
            "file was replaced on purpose, delete its record from that file to trust the new one."
        ) from error
    return original, how, sha256
