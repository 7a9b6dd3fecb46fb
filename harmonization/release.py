"""Release the zoo to the Hugging Face Hub in one step: every model built, checked, uploaded once, pinned.

`release(names, namespace=...)` is what `harmonization publish --all` runs. For each zoo model, in order:

1. **Build** its preset folder in `work_dir/NAME` from the published original (downloaded and verified,
   converted, reloaded and compared, card and figure rendered: `harmonization.publish.build_preset`). A folder
   is built in `work_dir/NAME.partial` and renamed once complete, beside a record of every file's sha256; a
   later run reuses it only when the files still have those digests, so a half-built folder is never uploaded.
2. **Compare** with the repo (`ORG/NAME`, main branch). A repo that holds another model under that name is
   refused unless `force`. When every file is already there with the same sha256 (LFS) or git blob id, nothing
   is uploaded: the repo's head is the result. This is what makes the release idempotent and resumable: a run
   that stopped half way finds the models it finished already on the Hub.
3. **Upload** the folder in one commit (`create_repo(exist_ok=True)`, then `upload_folder` with the head seen as
   `parent_commit`): a commit is all or nothing on the Hub, and the LFS objects of a failed one are kept by the
   Hub, so the next try does not send them again. Every request is bounded (`harmonization.network`).
4. **Check** the new commit: the repo's files at that commit must be ours, byte for byte (by digest); only then
   is the model recorded in `work_dir/release.json` and, with `pin`, its repo and commit written into
   `models/NAME.json` (`harmonization.zoo.pin_hub_revision`). Nothing half-uploaded is ever pinned.

Before any of this, the token is checked against the namespace (`check_write_access`): no token, a token the Hub
refuses, or a namespace it cannot write to are one sentence each, before a model is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from harmonization import zoo
from harmonization._io import sha256_file, write_atomic
from harmonization.hub_upload import PublishError, check_write_access, upload_preset
from harmonization.publish import build_preset_from_original

__all__ = ["Released", "release"]

#: What a release writes beside the built folders: each released model's repo, commit and files.
RECORD_FILE = "release.json"
_BUILD_RECORD = "{name}.build.json"
_PARTIAL = "{name}.partial"


@dataclasses.dataclass
class Released:
    """One model of a release.

    Attributes:
        name: the zoo model.
        repo_id: its Hub repo.
        commit_oid: the repo's commit that holds this preset (what `--pin` writes into models/NAME.json).
        commit_url: that commit's URL, when this run made it.
        uploaded: the files this run uploaded; empty when the repo already held them all.
        kept_hub_card: the repo's README.md was left as it was (edited on the Hub; `overwrite_card` replaces it).
        round_trip_max_abs_diff: max |logit difference| of the reloaded preset (from its build).
        pinned: its repo and commit were written into models/NAME.json.
    """

    name: str
    repo_id: str
    commit_oid: str
    commit_url: str | None
    uploaded: list[str]
    kept_hub_card: bool
    round_trip_max_abs_diff: float | None
    pinned: bool = False


# --- build ------------------------------------------------------------------------------------------------------


def _digests(folder: Path) -> dict[str, str]:
    return {path.name: sha256_file(path) for path in sorted(folder.iterdir()) if path.is_file()}


def _built_folder(entry: Mapping[str, Any], work_dir: Path, repo_id: str, *, fixtures: Path | None,
                  report: Callable[[str], None]) -> tuple[Path, dict[str, str], float | None]:
    """The checked preset folder of `entry` for `repo_id`, its files' sha256 and its round-trip difference:
    reused when complete and unchanged, else built.

    `fixtures` is the checkout's conversion fixtures, for the card's check against the original libraries
    (None: `harmonization.conversion_check`'s default, this package's own checkout if it is one).
    """
    name = entry["name"]
    folder, record_path = work_dir / name, work_dir / _BUILD_RECORD.format(name=name)
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record.get("repo_id") == repo_id and folder.is_dir() and _digests(folder) == record.get("files"):
            report(f"{name}: using the preset built earlier in {folder}")
            return folder, record["files"], record.get("round_trip_max_abs_diff")
    except (OSError, ValueError):
        pass
    partial = work_dir / _PARTIAL.format(name=name)
    for stale in (partial, folder):
        shutil.rmtree(stale, ignore_errors=True)
    record_path.unlink(missing_ok=True)
    report(f"{name}: building the preset from its published original")
    options = {"repo_id": repo_id, "check_round_trip": True, "require_card": True,
               "conversion_fixtures": fixtures}
    built = build_preset_from_original(entry, partial, reason="publishing", work_dir=work_dir, **options)
    record = {"repo_id": repo_id, "round_trip_max_abs_diff": built.round_trip_max_abs_diff,
              "files": _digests(partial)}
    write_atomic(record_path, json.dumps(record, indent=2) + "\n")
    os.replace(partial, folder)  # complete: only now does `work_dir/NAME` exist
    return folder, record["files"], built.round_trip_max_abs_diff


# --- the release ------------------------------------------------------------------------------------------------


def _print(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _write_record(work_dir: Path, done: Mapping[str, Released]) -> None:
    """Add this run's models to `release.json` (a resumed run keeps what the stopped one recorded)."""
    try:
        record = json.loads((work_dir / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = {}
    record = {**(record if isinstance(record, dict) else {}),
              **{name: dataclasses.asdict(item) for name, item in done.items()}}
    record = dict(sorted(record.items()))
    write_atomic(work_dir / RECORD_FILE, json.dumps(record, indent=2) + "\n")


def _installed(folder: Path) -> bool:
    """Whether `folder` is inside an installed package (site-packages), where pins would be lost on reinstall."""
    import sysconfig

    roots = {Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib")}
    return any(root == parent for parent in Path(str(folder)).resolve().parents for root in roots)


def release(names: Sequence[str] | None = None, *, namespace: str | None = None,
            work_dir: str | os.PathLike = "release", models_dir: str | os.PathLike | None = None,
            pin: bool = False, force: bool = False, overwrite_card: bool = False, private: bool | None = None,
            token: str | None = None, report: Callable[[str], None] = _print) -> list[Released]:
    """Publish zoo models to `namespace` on the Hub: each built, checked, uploaded when not already there, pinned.

    Args:
        names: zoo names (or the published package's names for them); None for the whole zoo.
        namespace: the Hub user or organisation; None for the zoo's (`harmonization.zoo.default_namespace`,
            set in models/_defaults.json).
        work_dir: where the built folders and `release.json` go; a later run reuses what is complete there.
        models_dir: the `models/` folder whose entries are published and, with `pin`, pinned. Defaults to the
            one the zoo reads.
        pin: write each model's repo and commit into `models_dir/NAME.json` once its upload is checked.
        force: replace a repo that holds another model under the same name.
        overwrite_card: replace a README.md the repo already has (else an edited card is kept).
        private: visibility of repos that do not exist yet (None: the Hub's default).
        token: a Hub token; None uses HF_TOKEN or the one saved by `hf auth login`.
        report: where progress lines go (default: stderr).

    Returns:
        One `Released` per model, in order.

    Raises:
        PublishError: no usable token or write access (before any work), or a model failed: the message names
            it; the models before it are released (and pinned) and a new run continues with it.
    """
    folder = Path(models_dir) if models_dir is not None else zoo._entries_folder()
    entries = zoo.read_entries(folder) if models_dir is not None else {n: zoo.model_info(n) for n in zoo.list_models()}
    if names is None:
        chosen = sorted(entries)
    else:
        chosen = []
        for name in names:
            canonical = name if name in entries else zoo.canonical_name(name)
            if canonical not in entries:
                raise zoo.UnknownModelError(f"Unknown model {name!r}; the zoo in {str(folder)!r} has: "
                                            f"{', '.join(sorted(entries))}.")
            if canonical not in chosen:
                chosen.append(canonical)
    if not chosen:
        raise ValueError(f"publish: the zoo in {str(folder)!r} has no models to publish.")
    if pin and (_installed(folder) or not os.access(folder, os.W_OK)):
        raise PermissionError(f"publish --pin writes models/NAME.json of a source checkout, and {str(folder)!r} is "
                              "an installed copy or not writable; pass --models-dir with a checkout's models/ folder.")
    namespace = namespace or zoo.default_namespace(folder)
    # The checkout whose models/ is released also holds the conversion fixtures its cards report on.
    fixtures = folder.parent / "tests" / "fixtures" / "keras2" if models_dir is not None else None
    fixtures = fixtures if fixtures is not None and fixtures.is_dir() else None
    user = check_write_access(namespace, token=token)
    report(f"Publishing {len(chosen)} model(s) to hf://{namespace}/ as {user!r}.")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    done: dict[str, Released] = {}
    for index, name in enumerate(chosen, 1):
        entry, repo_id = entries[name], f"{namespace}/{name}"
        try:
            built, sha256s, diff = _built_folder(entry, work_dir, repo_id, fixtures=fixtures, report=report)
            commit, url, uploaded, kept = upload_preset(
                built, repo_id, token=token, force=force, overwrite_card=overwrite_card, private=private,
                sha256s=sha256s,
                commit_message=f"Publish {name} (harmonization-hub)",
                commit_description=f"Preset of the harmonization-hub zoo model `{name}`, converted from "
                                   f"{entry['source']['url']} and checked by `harmonization publish`.")
        except PublishError as error:
            raise PublishError(f"[{index}/{len(chosen)}] {name}: {error}" + (
                f" Released before it: {', '.join(done)}." if done else "")) from error
        item = Released(name, repo_id, commit, url, uploaded, kept, diff)
        if pin:
            zoo.pin_hub_revision(folder, name, repo_id, commit)
            item.pinned = True
        done[name] = item
        _write_record(work_dir, done)
        what = f"uploaded {', '.join(uploaded)}" if uploaded else "already on the Hub, nothing uploaded"
        report(f"[{index}/{len(chosen)}] {name}: hf://{repo_id} at {commit} ({what})" +
               (", pinned" if item.pinned else ""))
    return list(done.values())
