"""A local stand-in for the Hugging Face Hub: a real HTTP server on 127.0.0.1 speaking the endpoints
`huggingface_hub` uses (read from huggingface_hub 2.4's `hf_api.py`, `_commit_api.py` and `lfs.py`).

Download:
- `GET /api/models/{repo}/revision/{rev}`           -> repo info with the commit `sha` (snapshot_download)
- `GET /api/models/{repo}/tree/{sha}?recursive=true`  -> the file listing (snapshot_download)
- `HEAD|GET /{repo}/resolve/{rev}/{path}`           -> file metadata (`X-Repo-Commit`, `ETag`, size), then bytes;
  `Range: bytes=N-` resumes.

Upload (`create_repo`, then `upload_folder` -> `create_commit`):
- `POST /api/repos/create`                          -> 200 `{"url": ...}`, or 409 when the repo exists
  (`exist_ok=True` accepts it); the new repo gets a first commit holding `.gitattributes`, as on the Hub;
- `POST /api/validate-yaml`                          -> the README's front matter must parse as YAML (400 else);
- `POST /api/models/{repo}/preupload/{rev}`          -> `uploadMode` per file: "lfs" for weights and binary
  samples (a PNG), "regular" else,
  with the `oid` of the file already at that path (the client skips unchanged files);
- `POST /{repo}.git/info/lfs/objects/batch`          -> LFS "basic" transfer actions (no `actions` when the
  object is already stored), then `PUT` of the bytes (sha256 and size checked) and `POST` verify;
- `POST /api/models/{repo}/commit/{rev}`             -> the NDJSON commit: a header line, then `file` (base64)
  and `lfsFile` (oid of an uploaded object) lines; answers `commitOid` and `commitUrl`.
- `GET /api/whoami-v2`                               -> the token's user and organisations (401 for another token).
Write endpoints require `Authorization: Bearer <token>` when `FakeHub.token` is set (401 otherwise), as the Hub
does, and writing to a namespace that is neither the user nor one of `FakeHub.orgs` is refused (403). huggingface_hub uploads LFS files through Xet when `hf_xet` is installed; tests set
`HF_HUB_DISABLE_XET` (a supported client setting) so that the LFS protocol above is used.

Plain files (the originals' public URLs) are served at any other path added with `add_static`.
Errors carry the `X-Error-Code` header the client maps to its exceptions (RepoNotFound, RevisionNotFound,
EntryNotFound). Faults can be injected (truncated or tampered bodies, a tree listing error, paths that
stall forever, that trickle one byte at a time under a 10 MB `Content-Length`, that answer a web page, or that
redirect to themselves) to test what the client does not guard against itself.
Uploads can fail too: write paths that stall, or whose connection is dropped once the request is read
(`drop`, as a proxy or a restarting server does), each counted so a test can see the client gave up.
Runs in a thread of the test process; not a pytest plugin, so any test module can import it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".h5", ".bin", ".safetensors")
#: What a captive portal or a misconfigured mirror answers for any path (79 bytes, as in issue 22).
HTML_PAGE = b"<!DOCTYPE html><html><head><title>Mirror</title></head><body>Hi!!</body></html>"
#: The length a trickling answer announces.
TRICKLE_LENGTH = 10_000_000


def _is_lfs(path: str, data: bytes) -> bool:
    """Whether the Hub keeps a file in LFS: by name, past 10 MB, or binary content (NUL bytes in its first 512)."""
    return path.endswith(LFS_SUFFIXES) or len(data) > 10 * 1024 * 1024 or b"\0" in data[:512]


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
        # URL paths starting with one of these are accepted and never answered (a stalled endpoint or proxy):
        self.stall: set[str] = set()
        self.delay: dict[str, float] = {}  # URL path -> seconds to wait before answering (a slow server)
        # URL path prefix -> seconds between bytes: a GET is answered `Content-Length: 10000000`, then one byte per
        # interval, for at most `trickle_limit` seconds (so that code without a deadline fails, not hangs, a test).
        self.trickle: dict[str, float] = {}
        self.trickle_limit = 10.0
        # How each trickle ended: "client hung up" (a deadline cut it off), "time limit" or "server stopped".
        self.trickle_endings: list[str] = []
        self._trickle_ended = threading.Semaphore(0)
        self.html: set[str] = set()  # URL path prefixes answered "200 OK" with a small web page (a portal, a proxy)
        self.redirect_loop: set[str] = set()  # URL path prefixes answered "302 Found" to themselves
        self._released = threading.Event()  # set at shutdown, so that stalled handlers end
        # Upload side:
        self.token: str | None = None  # when set, write endpoints require "Authorization: Bearer <token>"
        self.user = "test-user"  # whom the token belongs to (`/api/whoami-v2`)
        self.orgs: dict[str, str] = {"test-org": "write"}  # the user's organisations and role in each
        self.drop: set[str] = set()  # write URL path prefixes whose connection is closed once the request is read
        self.dropped: list[str] = []  # the paths of the requests that were dropped
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> bytes uploaded through the LFS protocol
        self.commit_log: list[dict] = []  # {"repo_id", "sha", "summary", "files": {path: "file" | "lfsFile"}}
        self.validated_yaml: list[str] = []  # README contents sent to /api/validate-yaml
        self.static: dict[str, bytes] = {}  # URL path -> bytes, for plain files (the originals' public URLs)
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

    def wait_for_trickles(self, count: int, guard: float = 60.0) -> list[str]:
        """How the first `count` trickles ended, once they have (`guard` only keeps a broken test from hanging)."""
        for _ in range(count):
            if not self._trickle_ended.acquire(timeout=guard):
                break
        return list(self.trickle_endings)

    def tag(self, repo_id: str, ref: str, sha: str) -> None:
        self.refs[repo_id][ref] = sha

    def add_static(self, path: str, data: bytes) -> str:
        """Serve `data` at URL path `path` (e.g. "/bucket/model.h5"); return its full URL."""
        self.static[path] = data
        return self.endpoint + path

    def files(self, repo_id: str, ref: str = "main") -> dict[str, bytes]:
        """The files of `repo_id` at `ref` (a copy)."""
        return dict(self.commits[self.refs[repo_id][ref]])

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
        self._released.set()
        self._server.shutdown()
        self._server.server_close()


_REVISION = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>[^/]+)$")
_PREUPLOAD = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)$")
_COMMIT = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)$")
_LFS_BATCH = re.compile(r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$")
_LFS_OBJECT = re.compile(r"^/__lfs__/(?P<oid>[0-9a-f]{64})$")
_LFS_VERIFY = re.compile(r"^/__lfs_verify__/(?P<oid>[0-9a-f]{64})$")
GITATTRIBUTES = b"*.h5 filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
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

    def do_POST(self):
        self._dispatch_write()

    def do_PUT(self):
        self._dispatch_write()

    # --- upload side ----------------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _json(self, status: int, body) -> None:
        self._send(status, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def _authorized(self) -> bool:
        token = self.fake.token
        if token is None or self.headers.get("Authorization") == f"Bearer {token}":
            return True
        self._error(401, None, "Invalid credentials in Authorization header", head=False)
        return False

    def _dispatch_write(self):
        fake = self.fake
        path = unquote(urlsplit(self.path).path)
        body = self._read_body()
        with fake._lock:
            fake.requests.append((self.command, self.path))
        if any(path.startswith(prefix) for prefix in fake.stall):
            fake._released.wait()  # the request was read; no byte of an answer ever comes
            return None
        if any(path.startswith(prefix) for prefix in fake.drop):
            with fake._lock:
                fake.dropped.append(path)
            self.close_connection = True  # hang up without answering: "Server disconnected"
            return None
        if self.command == "PUT":
            if match := _LFS_OBJECT.match(path):
                return self._lfs_put(match["oid"], body)
            return self._error(404, None, f"no route for PUT {path}", head=False)
        if path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body))
        if match := _LFS_VERIFY.match(path):
            return self._lfs_verify(match["oid"], json.loads(body))
        if not self._authorized():
            return None
        if path == "/api/repos/create":
            return self._create_repo(json.loads(body))
        namespace = self._namespace_of(path)
        if namespace is not None and not self._may_write(namespace):
            return self._error(403, None, f"You don't have the rights to write to {namespace}", head=False)
        if match := _PREUPLOAD.match(path):
            return self._preupload(match["repo"], match["rev"], json.loads(body))
        if match := _LFS_BATCH.match(path):
            return self._lfs_batch(match["repo"], json.loads(body))
        if match := _COMMIT.match(path):
            return self._commit(match["repo"], match["rev"], body)
        return self._error(404, None, f"no route for POST {path}", head=False)

    @staticmethod
    def _namespace_of(path: str) -> str | None:
        for pattern in (_PREUPLOAD, _LFS_BATCH, _COMMIT):
            if match := pattern.match(path):
                return match["repo"].split("/")[0]
        return None

    def _may_write(self, namespace: str) -> bool:
        return namespace == self.fake.user or self.fake.orgs.get(namespace) in ("admin", "write")

    def _whoami(self):
        if self.fake.token is not None and self.headers.get("Authorization") != f"Bearer {self.fake.token}":
            return self._error(401, None, "Invalid credentials in Authorization header", head=False)
        orgs = [{"type": "org", "name": name, "roleInOrg": role} for name, role in sorted(self.fake.orgs.items())]
        return self._json(200, {"type": "user", "name": self.fake.user, "orgs": orgs,
                                "auth": {"type": "access_token",
                                         "accessToken": {"displayName": "test", "role": "write"}}})

    def _create_repo(self, payload: dict):
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if "/" not in repo_id:
            repo_id = f"{self.fake.user}/{repo_id}"
        url = f"{self.fake.endpoint}/{repo_id}"
        if repo_id in self.fake.refs:
            return self._json(409, {"error": "You already created this model repo", "url": url})
        if not self._may_write(repo_id.split("/")[0]):
            return self._error(403, None, f"You don't have the rights to create a model under the namespace "
                                          f"{repo_id.split('/')[0]!r}", head=False)
        self.fake.add_commit(repo_id, {".gitattributes": GITATTRIBUTES})
        return self._json(200, {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()})

    def _validate_yaml(self, payload: dict):
        import yaml

        content = payload.get("content", "")
        self.fake.validated_yaml.append(content)
        match = re.match(r"^---\n(.*?)\n---\n", content, re.DOTALL)
        if match is None:
            return self._json(200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
        try:
            metadata = yaml.safe_load(match[1])
        except yaml.YAMLError as error:
            return self._json(400, {"errors": [{"message": f"YAML parse error: {error}"}], "warnings": []})
        if not isinstance(metadata, dict):
            return self._json(400, {"errors": [{"message": "metadata must be a mapping"}], "warnings": []})
        return self._json(200, {"errors": [], "warnings": []})

    def _preupload(self, repo_id: str, rev: str, payload: dict):
        sha = self._commit_or_error(repo_id, rev, head=False)
        if sha is None:
            return None
        current = self.fake.commits[sha]
        files = []
        for item in payload["files"]:
            path = item["path"]
            sample = base64.b64decode(item.get("sample") or "")
            lfs = path.endswith(LFS_SUFFIXES) or item["size"] > 10 * 1024 * 1024 or b"\0" in sample
            oid = None
            if path in current:
                data = current[path]
                oid = hashlib.sha256(data).hexdigest() if lfs else _git_blob_id(data)
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return self._json(200, {"files": files, "commitOid": sha})

    def _lfs_batch(self, repo_id: str, payload: dict):
        if repo_id not in self.fake.refs:
            return self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head=False)
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.fake.lfs_objects:
                entry["actions"] = {
                    "upload": {"href": f"{self.fake.endpoint}/__lfs__/{obj['oid']}", "header": {}},
                    "verify": {"href": f"{self.fake.endpoint}/__lfs_verify__/{obj['oid']}", "header": {}},
                }
            objects.append(entry)
        return self._json(200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, oid: str, body: bytes):
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, None, f"uploaded bytes do not hash to {oid}", head=False)
        self.fake.lfs_objects[oid] = body
        return self._send(200)

    def _lfs_verify(self, oid: str, payload: dict):
        data = self.fake.lfs_objects.get(oid)
        if data is None or len(data) != payload.get("size"):
            return self._error(404, None, f"object {oid} was not uploaded whole", head=False)
        return self._json(200, {"success": True})

    def _commit(self, repo_id: str, rev: str, body: bytes):
        parent = self._commit_or_error(repo_id, rev, head=False)
        if parent is None:
            return None
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return self._error(400, None, "the commit payload must start with a header line", head=False)
        files = dict(self.fake.commits[parent])
        kinds = {}
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                data = self.fake.lfs_objects.get(value["oid"])
                if data is None or len(data) != value["size"]:
                    return self._error(400, None, f"LFS object {value['oid']} of {value['path']} was not uploaded",
                                       head=False)
                files[value["path"]] = data
            elif key == "deletedFile":
                files.pop(value["path"], None)
            else:
                return self._error(400, None, f"unsupported commit operation {key!r}", head=False)
            kinds[value["path"]] = key
        sha = self.fake.add_commit(repo_id, files, ref=rev)
        self.fake.commit_log.append({"repo_id": repo_id, "sha": sha, "summary": lines[0]["value"]["summary"],
                                     "files": kinds})
        return self._json(200, {"commitUrl": f"{self.fake.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha,
                                "pullRequestUrl": None})

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
        if any(path.startswith(prefix) for prefix in fake.stall):
            fake._released.wait()  # the connection is open; no byte of an answer ever comes
            return None
        if path == "/api/whoami-v2" and not head:
            return self._whoami()
        if path in fake.delay:
            fake._released.wait(fake.delay[path])
        if any(path.startswith(prefix) for prefix in fake.redirect_loop):
            return self._send(302, b"", {"Location": self.path}, head)
        if any(path.startswith(prefix) for prefix in fake.html):
            return self._send(200, HTML_PAGE, {"Content-Type": "text/html; charset=utf-8"}, head)
        interval = next((seconds for prefix, seconds in fake.trickle.items() if path.startswith(prefix)), None)
        if interval is not None and not head:
            return self._trickle(interval)
        if match := _REVISION.match(path):
            return self._revision(match["repo"], match["rev"], head)
        if match := _TREE.match(path):
            return self._tree(match["repo"], match["rev"], head)
        if match := _RESOLVE.match(path):
            return self._resolve(match["repo"], match["rev"], match["path"], head)
        if path in fake.static:
            return self._static(path, head)
        return self._error(404, None, f"no route for {path}", head)

    def _trickle(self, interval: float):
        """Announce 10 MB, then send one byte per `interval` seconds until the client hangs up or time is up."""
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(TRICKLE_LENGTH))
        self.end_headers()
        deadline = time.monotonic() + self.fake.trickle_limit
        ending = "time limit"
        try:
            while time.monotonic() < deadline:
                if self.fake._released.wait(interval):
                    ending = "server stopped"
                    break
                self.wfile.write(b"\0")
                self.wfile.flush()
        except OSError:  # the client gave up: what a deadline does
            ending = "client hung up"
        self.close_connection = True
        with self.fake._lock:
            self.fake.trickle_endings.append(ending)
        self.fake._trickle_ended.release()

    def _static(self, path: str, head: bool):
        data = self.fake.static[path]
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes",
                   "ETag": f'"{hashlib.md5(data).hexdigest()}"'}
        length = len(data)
        if not head and path in self.fake.truncate:
            # Announce the full length, send half and close: what a dropped connection looks like.
            self.send_response(200)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.write(data[: length // 2])
            self.wfile.flush()
            self.close_connection = True
            return None
        return self._send(200, data, headers, head)

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
            if _is_lfs(name, data):
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
        lfs = _is_lfs(name, data)
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


def point_huggingface_hub_at(fake: FakeHub, monkeypatch, cache: Path, *, token: str | None = None) -> None:
    """Point the already-imported huggingface_hub at `fake`, with an empty cache and (optionally) a token.

    What HF_ENDPOINT / HF_HUB_CACHE / HF_TOKEN do when set before the import; `HF_HUB_DISABLE_XET` makes the
    client upload LFS files with the LFS protocol the stand-in speaks. The saved-token file is pointed at a
    path that does not exist, so no real credential is ever read.
    """
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", fake.endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(cache / "no-saved-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(cache / "no-stored-tokens"))
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("HARMONIZATION_CACHE", str(cache / "harmonization-cache"))


def patch_zoo_entry(monkeypatch, name: str, *, url: str | None = None, config: dict | None = None) -> dict:
    """Replace zoo entry `name`'s source URL and/or architecture config for this test (the registry is data).

    Returns the patched registry ({model name: entry}), which `zoo` reads until `monkeypatch` undoes it.
    """
    from harmonization import zoo  # here, not at the top: the stand-in Hub itself needs nothing of the package

    registry = {n: zoo.model_info(n) for n in zoo.list_models()}
    if url is not None:
        registry[name]["source"]["url"] = url
    if config is not None:
        registry[name]["architecture"]["config"] = config
    monkeypatch.setattr(zoo, "_registry", lambda: registry)
    return registry
