"""A local stand-in for the Hugging Face Hub: a real HTTP server on 127.0.0.1 speaking the endpoints
`huggingface_hub` uses to download (measured against huggingface_hub 2.4):

- `GET /api/models/{repo}/revision/{rev}`           -> repo info with the commit `sha` (snapshot_download)
- `GET /api/models/{repo}/tree/{sha}?recursive=true`  -> the file listing (snapshot_download)
- `HEAD|GET /{repo}/resolve/{rev}/{path}`           -> file metadata (`X-Repo-Commit`, `ETag`, size), then bytes;
  `Range: bytes=N-` resumes.

Errors carry the `X-Error-Code` header the client maps to its exceptions (RepoNotFound, RevisionNotFound,
EntryNotFound). Faults can be injected to test what the client does not guard against itself.
Runs in a thread of the test process; not a pytest plugin, so any test module can import it.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".h5", ".bin", ".safetensors")


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Repos of files at commits, served over HTTP. Use as a context manager; `endpoint` is its base URL."""

    def __init__(self):
        self.commits: dict[str, dict[str, bytes]] = {}  # sha -> {path: bytes}
        self.commit_repo: dict[str, str] = {}  # sha -> repo_id
        self.refs: dict[str, dict[str, str]] = {}  # repo_id -> {branch or tag: sha}
        self.requests: list[tuple[str, str]] = []
        # Fault injection:
        self.tree_status: int | None = None  # answer the tree listing with this HTTP status
        self.truncate: set[str] = set()  # file paths whose GET body stops half-way (HEAD still gives full size)
        self.tampered: dict[str, bytes] = {}  # file path -> bytes served instead (consistently, HEAD and GET)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # --- repository content -------------------------------------------------------------------------
    def add_commit(self, repo_id: str, files: dict[str, bytes], *, ref: str = "main") -> str:
        """Store `files` as a new commit of `repo_id` and point `ref` at it; return the commit sha."""
        sha = hashlib.sha1(json.dumps([repo_id, len(self.commits), sorted(files)]).encode()).hexdigest()
        self.commits[sha] = dict(files)
        self.commit_repo[sha] = repo_id
        self.refs.setdefault(repo_id, {})[ref] = sha
        return sha

    def add_preset(self, repo_id: str, directory: str | Path, *, ref: str = "main") -> str:
        directory = Path(directory)
        return self.add_commit(repo_id, {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}, ref=ref)

    def tag(self, repo_id: str, ref: str, sha: str) -> None:
        self.refs[repo_id][ref] = sha

    def _resolve(self, repo_id: str, rev: str) -> str | None:
        refs = self.refs.get(repo_id, {})
        if rev in refs:
            return refs[rev]
        return rev if self.commit_repo.get(rev) == repo_id else None

    def _content(self, path: str, data: bytes) -> bytes:
        return self.tampered.get(path, data)

    # --- server ---------------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


_REVISION = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>[^/]+)$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    def do_HEAD(self):
        self._dispatch(head=True)

    def do_GET(self):
        self._dispatch(head=False)

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False,
              length: int | None = None):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, status: int, code: str | None, message: str, head: bool):
        headers = {"Content-Type": "application/json"}
        if code:
            headers["X-Error-Code"] = code
            headers["X-Error-Message"] = message
        self._send(status, json.dumps({"error": message}).encode(), headers, head)

    def _dispatch(self, head: bool):
        fake = self.fake
        url = urlsplit(self.path)
        path = unquote(url.path)
        with fake._lock:
            fake.requests.append((self.command, self.path))
        if match := _REVISION.match(path):
            return self._revision(match["repo"], match["rev"], head)
        if match := _TREE.match(path):
            return self._tree(match["repo"], match["rev"], head)
        if match := _RESOLVE.match(path):
            return self._resolve(match["repo"], match["rev"], match["path"], head)
        return self._error(404, None, f"no route for {path}", head)

    def _commit_or_error(self, repo_id: str, rev: str, head: bool):
        if repo_id not in self.fake.refs:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head)
            return None
        sha = self.fake._resolve(repo_id, rev)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        return sha

    def _revision(self, repo_id: str, rev: str, head: bool):
        sha = self._commit_or_error(repo_id, rev, head)
        if sha is None:
            return
        files = self.fake.commits[sha]
        body = {"id": repo_id, "modelId": repo_id, "sha": sha, "private": False, "disabled": False,
                "gated": False, "siblings": [{"rfilename": name} for name in sorted(files)]}
        self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)

    def _tree(self, repo_id: str, rev: str, head: bool):
        if self.fake.tree_status is not None:
            return self._error(self.fake.tree_status, None, "tree listing unavailable", head)
        sha = self._commit_or_error(repo_id, rev, head)
        if sha is None:
            return
        entries = []
        for name, data in sorted(self.fake.commits[sha].items()):
            data = self.fake._content(name, data)
            entry = {"type": "file", "oid": _git_blob_id(data), "size": len(data), "path": name}
            if name.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        self._send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, head)

    def _resolve(self, repo_id: str, rev: str, name: str, head: bool):
        sha = self._commit_or_error(repo_id, rev, head)
        if sha is None:
            return
        files = self.fake.commits[sha]
        if name not in files:
            return self._error(404, "EntryNotFound", f"{name} does not exist on {rev}", head)
        data = self.fake._content(name, files[name])
        lfs = name.endswith(LFS_SUFFIXES)
        etag = hashlib.sha256(data).hexdigest() if lfs else _git_blob_id(data)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if lfs:
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(len(data))
        status = 200
        range_header = self.headers.get("Range")
        if range_header and (match := re.fullmatch(r"bytes=(\d+)-", range_header.strip())):
            start = int(match[1])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            data, status = data[start:], 206
        if not head and name in self.fake.truncate:
            data = data[: len(data) // 2]
        self._send(status, data, headers, head)
