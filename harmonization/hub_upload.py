"""Put a preset folder into a Hugging Face Hub repo once: compare, refuse what is not ours, upload, check.

`upload_preset(folder, repo_id)` is the one way a preset reaches the Hub (`harmonization publish`, one model or
the whole zoo with `harmonization.release`). It lists the repo's files at the head of main first: a repo that
holds another model under that name is refused unless `force`, and when every file is already there with the
same sha256 (LFS) or git blob id nothing is uploaded, which makes publishing idempotent and resumable. Otherwise
the folder goes up in one commit on top of the head it saw (`parent_commit`): a commit is all or nothing on the
Hub, and the LFS objects of a failed one are kept there, so the next try does not send them again. The new
commit is listed again and must hold these files, by digest, before its id is returned: only such a commit is
ever pinned. Every request is bounded (`harmonization.network`); failures are one sentence (`PublishError`).

`check_write_access(namespace)` asks the Hub whom the token belongs to before any work: no token, a refused
or read-only one, or a namespace it cannot write to are each one sentence. Nothing here knows the zoo.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from harmonization import network, presets
from harmonization._io import DISTRIBUTION, is_repo_id, sha256_file

__all__ = ["PublishError", "check_write_access", "require_token", "upload_preset"]

#: Files of a repo that say nothing about which model it holds (what `create_repo` itself commits).
_NEUTRAL_FILES = frozenset({".gitattributes", presets.README_FILE})


class PublishError(OSError):
    """Publishing stopped: the preset does not round-trip, the Hub refused or dropped the upload, or the repo
    holds another model. Nothing half-done is left on the Hub (a commit is all or nothing) nor pinned."""


# --- who may write where ----------------------------------------------------------------------------------------


def require_token(token: str | None = None) -> str:
    """`token`, else the standard one (HF_TOKEN, `hf auth login`); PublishError when there is none."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise PublishError(
            "No Hugging Face token: set HF_TOKEN to a token with write access (or run `hf auth login`); nothing "
            "was uploaded."
        )
    return token


def check_write_access(namespace: str, *, token: str | None = None) -> str:
    """The user a token belongs to, once the Hub has said it may write to `namespace` (a user or organisation).

    Raises:
        PublishError: no token, a token the Hub refuses, a read-only token, or a namespace that is neither the
            token's user nor one of its organisations with write rights.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if not isinstance(namespace, str) or not is_repo_id(f"{namespace}/x") or "/" in namespace:
        raise ValueError(f"publish: `namespace` must be a Hub user or organisation name, got {namespace!r}.")
    network.bound_huggingface_hub()
    api = HfApi(token=require_token(token), library_name=DISTRIBUTION)
    try:
        me = api.whoami()
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status == 401:
            raise PublishError("The Hugging Face Hub refused the token (HF_TOKEN or `hf auth login`): it is invalid "
                               "or expired; nothing was uploaded.") from error
        raise PublishError(f"Could not ask the Hub who the token belongs to: {_first_line(error)}") from error
    except OSError as error:
        raise PublishError(f"Could not reach the Hugging Face Hub to check the token: {_first_line(error)}") from error
    user = me.get("name", "?")
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise PublishError(f"The token of {user!r} is read-only; publishing needs a token with write access.")
    if namespace == user:
        return user
    orgs = {org.get("name"): org.get("roleInOrg") for org in me.get("orgs") or []}
    if namespace not in orgs:
        member_of = ", ".join(sorted(name for name in orgs if name)) or "none"
        raise PublishError(f"The token of {user!r} cannot write to {namespace!r}: it is neither that user nor one of "
                           f"its organisations (organisations: {member_of}). Pass --namespace with one of them.")
    if orgs[namespace] == "read":
        raise PublishError(f"{user!r} is a read-only member of {namespace!r}; publishing needs the write role there.")
    return user


# --- compare, upload, check -------------------------------------------------------------------------------------


def _git_blob_id(path: Path) -> str:
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _remote(api, repo_id: str, revision: str = "main") -> tuple[str, dict[str, Any]] | None:
    """(commit sha, {path: file entry}) of `repo_id` at `revision`, or None when the repo does not exist."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        sha = api.repo_info(repo_id, revision=revision).sha
    except RepositoryNotFoundError:
        return None
    files = {item.path: item for item in api.list_repo_tree(repo_id, revision=sha, recursive=True)
             if getattr(item, "blob_id", None) is not None}
    return sha, files


class _LocalFile:
    """A file of the folder to upload, with its digests computed once (weights are hundreds of MB)."""

    def __init__(self, path: Path, sha256: str | None = None) -> None:
        self.path, self.size, self._sha256 = path, path.stat().st_size, sha256

    @functools.cached_property
    def sha256(self) -> str:
        return self._sha256 or sha256_file(self.path)

    @functools.cached_property
    def git_blob_id(self) -> str:
        return _git_blob_id(self.path)

    def same_as(self, remote) -> bool:
        """Whether the repo's file entry `remote` (None: absent) has these bytes, by the digest the Hub keeps."""
        if remote is None or remote.size != self.size:
            return False
        if getattr(remote, "lfs", None) is not None:
            return remote.lfs.sha256 == self.sha256
        return remote.blob_id == self.git_blob_id


def _held_model(api, repo_id: str, sha: str, files: Mapping[str, Any]) -> dict[str, Any] | None:
    """What the repo's `metadata.json` says it holds ({} for an empty repo), or None for something not ours."""
    if presets.METADATA_FILE not in files:
        return {} if set(files) <= _NEUTRAL_FILES else None
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(repo_id, presets.METADATA_FILE, revision=sha)
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError:
        return None


def _refuse_other_model(api, repo_id: str, sha: str, files: Mapping[str, Any], metadata: Mapping[str, Any],
                        force: bool) -> None:
    held = _held_model(api, repo_id, sha, files)
    if held == {} or force:
        return
    if held is None:
        what = f"files that are not a harmonization-hub preset ({', '.join(sorted(set(files) - _NEUTRAL_FILES))})"
    elif held.get("name") != metadata.get("name"):
        what = f"another model, {held.get('name')!r}"
    elif held.get("source_sha256") != metadata.get("source_sha256"):
        what = (f"{held.get('name')!r} converted from another original file (sha256 "
                f"{str(held.get('source_sha256'))[:12]}..., this one {str(metadata.get('source_sha256'))[:12]}...)")
    else:
        return
    raise PublishError(f"hf://{repo_id} already holds {what}; refusing to replace it (pass --force to replace it).")


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _upload_failed(repo_id: str, error: BaseException) -> PublishError:
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status in (401, 403):
        why = (f"the Hub refused to let this token write to {repo_id.split('/')[0]!r} ({_first_line(error)}); log in "
               "with `hf auth login` or set HF_TOKEN to a token with write access there")
    else:
        why = f"{type(error).__name__}: {_first_line(error)}"
    return PublishError(f"Uploading to hf://{repo_id} failed: {why}. Nothing of it was pinned; run the same command "
                        "again to continue (files already on the Hub are not sent again).")


def upload_preset(folder: str | os.PathLike, repo_id: str, *, token: str | None = None, force: bool = False,
                  overwrite_card: bool = False, private: bool | None = None,
                  commit_message: str = "Publish a preset (harmonization-hub)",
                  commit_description: str | None = None,
                  sha256s: Mapping[str, str] | None = None) -> tuple[str, str | None, list[str], bool]:
    """Put preset `folder` into Hub repo `repo_id` unless it is already there; return
    (commit sha, commit URL or None, uploaded file names, kept_hub_card).

    `sha256s` ({file name: sha256}) are the folder's digests when the caller has just computed them.

    Raises:
        PublishError: the repo holds another model (without `force`), the upload failed or stalled, or the commit
            does not hold exactly these files.
    """
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    network.bound_huggingface_hub()
    api = HfApi(token=require_token(token), library_name=DISTRIBUTION)
    metadata = presets.read_metadata(folder)
    known = sha256s or {}
    local = {path.name: _LocalFile(path, known.get(path.name)) for path in sorted(folder.iterdir()) if path.is_file()}
    try:
        remote = _remote(api, repo_id)
        if remote is None:
            api.create_repo(repo_id, exist_ok=True, private=private)
            remote = _remote(api, repo_id)
        sha, files = remote
        _refuse_other_model(api, repo_id, sha, files, metadata, force)
        kept = not overwrite_card and presets.README_FILE in files and presets.README_FILE in local
        wanted = {name: file for name, file in local.items() if not (kept and name == presets.README_FILE)}
        changed = sorted(name for name, file in wanted.items() if not file.same_as(files.get(name)))
        if not changed:
            return sha, None, [], kept
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
            commit_description=commit_description, parent_commit=sha,
            ignore_patterns=[presets.README_FILE] if kept else None,
        )
        _, after = _remote(api, repo_id, commit.oid)
    except PublishError:
        raise
    except (HfHubHTTPError, httpx2.HTTPError, OSError) as error:
        raise _upload_failed(repo_id, error) from error
    differing = sorted(name for name, file in wanted.items() if not file.same_as(after.get(name)))
    if differing:
        raise PublishError(f"Commit {commit.oid} of hf://{repo_id} does not hold the files that were uploaded "
                           f"({', '.join(differing)} differ); it was not pinned. Run again to upload them afresh.")
    return commit.oid, commit.commit_url, changed, kept
