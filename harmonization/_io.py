"""Small I/O helpers the package shares: file digests, atomic file writes, Hub repo ids, the versions we record.

One copy each, so that a preset, a converted original, a published model and a ClickMe shard are hashed and
described the same way. Nothing here imports TensorFlow at import time (`harmonization list` stays fast).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import platform
import re
from importlib import metadata as importlib_metadata
from pathlib import Path

__all__ = ["DISTRIBUTION", "TEMPORARY_PREFIX", "file_facts", "fsync_dir", "is_repo_id", "json_depth",
           "library_version", "library_versions", "moved_names", "sha256_file", "write_atomic"]

#: The name this library is installed under (what `pip install` and the Hub's user agent see).
DISTRIBUTION = "harmonization-hub"
# A Hugging Face repo id, "org/name" (the characters the Hub accepts in either part).
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


#: The prefix of what `write_atomic` (and a run directory) writes before renaming it into place: a name that
#: starts with it is never a finished file, and clean-ups may delete it.
TEMPORARY_PREFIX = ".tmp-"


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename in it) to disk, where the platform can open directories."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform opens directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text` all at once: a reader (or a kill) sees the old file or the new, never half."""
    path = Path(path)
    temporary = path.with_name(f"{TEMPORARY_PREFIX}{path.name}.{os.getpid()}")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_dir(path.parent)


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """The hex sha256 of the file at `path`, read in chunks (weights files are hundreds of MB).

    `path` may also be a path object with its own `open` (a TFDS `epath.Path`, which can be a cloud path).
    """
    digest = hashlib.sha256()
    with (path.open("rb") if hasattr(path, "open") else open(path, "rb")) as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_facts(path: str | os.PathLike) -> dict[str, int | str]:
    """{"size", "sha256"} of the file at `path`: what a preset's metadata and a checkpoint's state record of each
    of their files, to find one damaged later before it is loaded."""
    return {"size": os.stat(path).st_size, "sha256": sha256_file(path)}


def json_depth(value: object, stop_after: int | None = None) -> int:
    """How deeply JSON-like `value` nests lists, tuples and dicts (0 for a scalar), counted without recursion.

    Python's JSON reader and writer, `copy.deepcopy` and Keras's deserialisation recurse once per level, so a
    file nested thousands deep fails there with a RecursionError; callers check the depth of what they read
    first. Counting stops once past `stop_after`, if given (the answer is then only "deeper than that").
    """
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (dict, list, tuple)):
            deepest = max(deepest, depth)
            if stop_after is not None and depth > stop_after:
                break
            pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def is_repo_id(value: object) -> bool:
    """True for a Hub repo id of the form "org/name"."""
    return isinstance(value, str) and _REPO_ID.match(value) is not None


def library_version() -> str:
    """This library's version: the installed distribution's, else the source checkout's `__version__`."""
    try:
        return importlib_metadata.version(DISTRIBUTION)
    except importlib_metadata.PackageNotFoundError:  # imported from a clone that was not pip-installed
        import harmonization  # already imported: we are inside it

        return getattr(harmonization, "__version__", "unknown")


def library_versions() -> dict[str, str]:
    """The versions a saved preset records (`metadata.json`): Keras, TensorFlow, Python and this library.

    TensorFlow's is read from its installed metadata: importing it to read a string would cost seconds on JAX or
    PyTorch, and it may not be installed there at all.
    """
    # Imported here, not at the top: Keras is only needed once a model is saved.
    import importlib.metadata

    import keras

    versions = {"keras_version": keras.__version__, "python_version": platform.python_version()}
    try:
        versions["tensorflow_version"] = importlib.metadata.version("tensorflow")
    except importlib.metadata.PackageNotFoundError:
        versions["tensorflow_version"] = "not installed"
    versions["harmonization_version"] = library_version()
    return versions


def moved_names(module: str, moved: dict[str, str]):
    """A module `__getattr__` answering the names in `moved` (name -> the module that holds it now) on use.

    For 0.1 names that moved up a layer: the old module keeps answering them without importing anything above
    it at import time (`tests/test_structure.py` does not count these hooks as dependencies).
    """

    def __getattr__(name: str):
        if name in moved:
            return getattr(importlib.import_module(moved[name]), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
