"""A training run's directory: what started it, its checkpoints and its history, each written atomically.

    RUN_DIR/
      run.json                 the recipe that fixes what the checkpoints mean (refused if another one comes)
      checkpoints/step-000120/ state.weights.h5 (weights + optimizer), random_state.npz, metrics.npz, state.json
      damaged/                 checkpoints that failed their check, each with a REASON.txt
      history.json, history.csv one row per finished epoch
      tensorboard/             TensorBoard event files
      preset/                  the final model, as a preset (with its card data and the recipe in its metadata)
      evaluation/              `harmonization evaluate` on the preset

A checkpoint is written into a hidden `.tmp-*` folder and renamed into place: a kill at any moment leaves
either a whole checkpoint or none, and a run resumes from the newest whole one (left-over `.tmp-*` folders
are removed). Its `state.json` records each file's size and sha256, as a preset's metadata does: a checkpoint
damaged later (a truncated or deleted file, a disk error, an edit) is found before it is loaded, reported by
path and moved to `RUN_DIR/damaged/` (never deleted: it is evidence), and the run resumes from the newest
whole one. Files are replaced the same way (`write_atomic`). While a run trains, its chief holds an advisory
lock on `RUN_DIR/.lock`: a second run on the same directory (a job requeued while the first still runs) is
refused instead of overwriting the first's checkpoints. Standard library only.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from harmonization import recipes
from harmonization._io import TEMPORARY_PREFIX, file_facts, fsync_dir, sha256_file, write_atomic

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
WEIGHTS_FILE = "state.weights.h5"
RANDOM_STATE_FILE = "random_state.npz"
METRICS_FILE = "metrics.npz"
LOCK_FILE = ".lock"
HISTORY_JSON = "history.json"
HISTORY_CSV = "history.csv"
TENSORBOARD = "tensorboard"
PRESET = "preset"
EVALUATION = "evaluation"
DAMAGED = "damaged"
REASON_FILE = "REASON.txt"
#: The files every checkpoint holds (its `state.json` records their sizes and digests).
CHECKPOINT_FILES = (WEIGHTS_FILE, RANDOM_STATE_FILE, METRICS_FILE)

_CHECKPOINT_NAME = re.compile(r"^step-(\d+)$")


class RunDirError(ValueError):
    """A run directory that cannot be used for this run (another recipe's, or not a run directory)."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder and its `state.json` (step, epoch, step_in_epoch, history, files); `problem` says why
    it cannot be used (None: its state and files check out)."""

    path: Path
    state: dict[str, Any]
    problem: str | None = None

    @property
    def step(self) -> int:
        return int(self.state["step"])


def _is_count(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _state_problem(state: Any, step: int) -> str | None:
    """What is wrong with the shape of a checkpoint's `state.json` (None: nothing), checked before any use."""
    if not isinstance(state, dict):
        return f"its {STATE_FILE} holds {type(state).__name__}, not an object"
    for key, minimum in (("step", 0), ("epoch", 0), ("step_in_epoch", 0), ("steps_per_epoch", 1)):
        if not _is_count(state.get(key), minimum):
            return f"its {STATE_FILE} has {key}={state.get(key)!r}, not an integer >= {minimum}"
    if state["step"] != step or state["step"] != state["epoch"] * state["steps_per_epoch"] + state["step_in_epoch"]:
        return (f"its {STATE_FILE} says step {state['step']} (epoch {state['epoch']}, step {state['step_in_epoch']} "
                f"of {state['steps_per_epoch']}), which does not match itself or the folder's name")
    history = state.get("history", [])
    if not isinstance(history, list) or not all(isinstance(row, dict) for row in history):
        return f"its {STATE_FILE} has a `history` that is not a list of objects"
    files = state.get("files")
    if files is not None and not (isinstance(files, dict) and all(
            isinstance(facts, dict) and _is_count(facts.get("size")) and isinstance(facts.get("sha256"), str)
            for facts in files.values())):
        return f"its {STATE_FILE} has a `files` record that is not {{name: {{size, sha256}}}}"
    return None


def _files_problem(folder: Path, files: Mapping[str, Any] | None) -> str | None:
    """Whether the files of a checkpoint are those its `state.json` recorded (size first, then sha256).

    Checkpoints written before files were recorded (`files` absent) are taken as they are; loading them still
    reports a damaged file by name.
    """
    if files is None:
        return None
    missing = [name for name in CHECKPOINT_FILES if name not in files]
    if missing:
        return f"its {STATE_FILE} records no size or digest for {', '.join(missing)}"
    for name, facts in sorted(files.items()):
        path = folder / name
        if Path(name).name != name or path.is_symlink() or not path.is_file():
            return f"{path} is missing (or is not a plain file in the folder)"
        size = path.stat().st_size
        if size != facts["size"]:
            return f"{path} has {size} bytes; {facts['size']} were written"
        if sha256_file(path) != facts["sha256"]:
            return f"{path} has changed since it was written (sha256 {facts['sha256'][:12]}... expected)"
    return None


def _is_partial(name: str) -> bool:
    return name.startswith(TEMPORARY_PREFIX) or (name.startswith(".") and name.endswith(".partial"))


def _discard(folder: Path) -> None:
    """Delete a checkpoint folder so that a kill midway leaves no part of it that looks whole: it is renamed
    to a `.tmp-*` name first (one atomic step), then deleted (`remove_partial` finishes a killed deletion)."""
    doomed = folder.with_name(f"{TEMPORARY_PREFIX}old-{folder.name}.{os.getpid()}")
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


class RunDirectory:
    """The run directory of one recipe: claims it, lists and writes checkpoints, writes the history."""

    def __init__(self, path: str | os.PathLike, recipe: Mapping[str, Any]):
        self.path = Path(path).expanduser()
        self.recipe = dict(recipe)
        self.checkpoints = self.path / CHECKPOINTS

    # ------------------------------------------------------------------ identity
    def claim(self, *, write: bool = True) -> bool:
        """Check that this directory is new, empty, or this recipe's run; record the recipe when `write`.

        Returns True when the directory already held this run (a resume). A directory started by another
        recipe or model (a key outside `recipes.RESUMABLE_CHANGES` differs), or a non-empty folder that is not
        a run directory, is refused with the differences: its checkpoints would not mean what this run expects.
        """
        run_file = self.path / RUN_FILE
        if run_file.is_file():
            try:
                recorded = json.loads(run_file.read_text(encoding="utf-8"))
            except (ValueError, RecursionError) as error:
                raise RunDirError(f"{run_file} is not a run record ({type(error).__name__}: {error}); use another "
                                  "--out.") from None
            old = recorded.get("identity") if isinstance(recorded, dict) else None
            if not isinstance(old, dict):
                raise RunDirError(f"{run_file} is not a run record (an object with an `identity` object); use "
                                  "another --out.")
            new = recipes.identity(self.recipe)
            if old != new:
                changes = recipes.differences(old, new)
                raise RunDirError(
                    f"Run directory {self.path} belongs to another run (recipe {old.get('name')!r}, model "
                    f"{(old.get('model') or {}).get('source')!r}); this one differs in: {'; '.join(changes)}. "
                    "Resume it with the same settings (only epochs, evaluation and checkpoint may change), or "
                    "choose another --out."
                )
            if write:
                self._record(recorded.get("created"))
            return True
        if self.path.exists():
            if not self.path.is_dir():
                raise RunDirError(f"--out {str(self.path)!r} is a file; a run directory is a folder.")
            # A `.tmp-*` entry is a record being written (another worker's, this instant): not someone's files.
            if any(not _is_partial(item.name) and item.name != LOCK_FILE for item in self.path.iterdir()):
                raise RunDirError(
                    f"--out {str(self.path)!r} is not empty and is not a run directory (it has no {RUN_FILE}); "
                    "choose a new or empty folder, so that nothing there is overwritten."
                )
        if write:
            self.path.mkdir(parents=True, exist_ok=True)
            self._record(None)
        return False

    def _record(self, created: str | None) -> None:
        record = {
            "identity": recipes.identity(self.recipe),
            "identity_hash": recipes.identity_hash(self.recipe),
            "recipe": self.recipe,
            "created": created or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_atomic(self.path / RUN_FILE, json.dumps(record, indent=2) + "\n")

    # ------------------------------------------------------------------ checkpoints
    @contextlib.contextmanager
    def lock(self):
        """Hold the run directory for this process (an advisory `flock`, released when it ends, also by a kill)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / LOCK_FILE, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunDirError(
                    f"Run directory {self.path} is in use by another running `harmonization train` (it holds "
                    f"{self.path / LOCK_FILE}); wait for it to end, or choose another --out."
                ) from None
            try:
                yield self
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def remove_partial(self) -> None:
        """Delete what a killed run left half-written (`.tmp-*` entries, `save_preset`'s `.preset.*.partial`)."""
        for folder in (self.path, self.checkpoints):
            if folder.is_dir():
                for item in folder.iterdir():
                    if _is_partial(item.name):
                        shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)

    def list_checkpoints(self) -> list[Checkpoint]:
        """The checkpoint folders (`step-NNNNNN`), oldest first, each with its `problem` (None when whole).

        Only the state's shape is checked here (cheap, for rotation); `check` also reads the files' digests.
        """
        found = []
        if self.checkpoints.is_dir():
            for item in self.checkpoints.iterdir():
                match = _CHECKPOINT_NAME.match(item.name)
                if not match or not item.is_dir():
                    continue
                step = int(match.group(1))
                try:
                    state = json.loads((item / STATE_FILE).read_text(encoding="utf-8"))
                    problem = _state_problem(state, step)
                except FileNotFoundError:
                    state, problem = {}, f"it has no {STATE_FILE}"
                except (OSError, ValueError, RecursionError) as error:
                    state, problem = {}, f"its {STATE_FILE} cannot be read ({type(error).__name__}: {error})"
                found.append(Checkpoint(item, state if problem is None else {"step": step}, problem))
        return sorted(found, key=lambda c: c.step)

    def check(self, checkpoint: Checkpoint) -> Checkpoint:
        """`checkpoint` with `problem` set if its files are not the ones its `state.json` recorded."""
        if checkpoint.problem is not None:
            return checkpoint
        problem = _files_problem(checkpoint.path, checkpoint.state.get("files"))
        return checkpoint if problem is None else Checkpoint(checkpoint.path, checkpoint.state, problem)

    def latest_checkpoint(self) -> Checkpoint | None:
        """The newest checkpoint whose state has the right shape (its files are not read: see `check`)."""
        checkpoints = [c for c in self.list_checkpoints() if c.problem is None]
        return checkpoints[-1] if checkpoints else None

    def set_aside(self, checkpoint: Checkpoint, problem: str) -> Path:
        """Move a damaged checkpoint to `RUN_DIR/damaged/` with a REASON.txt, out of the resume's way; never
        delete it (it may be all that is left of the run, and it is the evidence of what went wrong)."""
        damaged = self.path / DAMAGED
        damaged.mkdir(parents=True, exist_ok=True)
        target = damaged / checkpoint.path.name
        suffix = 1
        while target.exists():
            suffix += 1
            target = damaged / f"{checkpoint.path.name}.{suffix}"
        os.replace(checkpoint.path, target)
        write_atomic(target / REASON_FILE, f"Set aside {time.strftime('%Y-%m-%dT%H:%M:%S%z')}: {problem}\n")
        fsync_dir(self.checkpoints)
        return target

    def write_checkpoint(self, step: int, state: Mapping[str, Any], write_files: Callable[[Path], None],
                         keep: int) -> Checkpoint:
        """Write a checkpoint atomically: `write_files(folder)` fills a temporary folder, `state.json` goes in
        last, then the folder is renamed to `checkpoints/step-NNNNNN`; all but the newest `keep` are deleted."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        final = self.checkpoints / f"step-{step:06d}"
        temporary = self.checkpoints / f"{TEMPORARY_PREFIX}{final.name}.{os.getpid()}"
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
        write_files(temporary)
        files = {item.name: file_facts(item) for item in sorted(temporary.iterdir()) if item.is_file()}
        state = {**state, "step": int(step), "files": files}
        with open(temporary / STATE_FILE, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(state, indent=2))
            handle.flush()
            os.fsync(handle.fileno())
        for item in temporary.iterdir():  # the weights file too, before the rename publishes it
            if item.is_file():
                with open(item, "rb") as handle:
                    os.fsync(handle.fileno())
        if final.exists():  # the same step written again (a run started over): moved aside whole, then deleted
            _discard(final)
        os.replace(temporary, final)
        fsync_dir(self.checkpoints)
        # Only whole checkpoints count and rotate: a damaged one is never kept in place of a whole one.
        for old in [c for c in self.list_checkpoints() if c.problem is None][:-keep]:
            _discard(old.path)
        return Checkpoint(final, state)

    # ------------------------------------------------------------------ history
    def write_history(self, history: list[Mapping[str, Any]]) -> None:
        """history.json and history.csv, one row per finished epoch (from the checkpoint's state)."""
        write_atomic(self.path / HISTORY_JSON, json.dumps(list(history), indent=2) + "\n")
        columns: list[str] = []
        for row in history:
            columns += [key for key in row if key not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(history)
        write_atomic(self.path / HISTORY_CSV, buffer.getvalue())
