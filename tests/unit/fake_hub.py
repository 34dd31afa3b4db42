"""A small in-process fake of the Hugging Face Hub HTTP API, for upload tests.

Speaks exactly the endpoints ``HfApi.create_repo`` / ``create_branch`` / ``create_commit`` use
(huggingface_hub 1.x/2.x, plain LFS; xet is never advertised):

- ``POST /api/repos/create``                                    create a repo (409 if it exists)
- ``POST /api/models/{ns}/{name}/branch/{branch}``              create a branch
- ``POST /api/validate-yaml``                                   README.md metadata check
- ``POST /api/models/{ns}/{name}/preupload/{rev}``              upload mode per file (regular | lfs)
- ``POST /{ns}/{name}.git/info/lfs/objects/batch``              LFS batch: where to PUT each object
- ``PUT  /lfs-upload/{oid}``                                    the LFS object bytes (basic transfer)
- ``POST /api/models/{ns}/{name}/commit/{rev}``                 NDJSON commit
- ``GET  /api/whoami-v2``                                       the token's user

Listens on 127.0.0.1 on a free port, serves from a daemon thread, and shuts itself down after
``lifetime_s`` even if a test forgets to stop it. Everything that arrives is kept on the
:class:`FakeHub` object (``repos``, ``requests``) so tests can check it. ``failures`` injects HTTP
errors: ``hub.failures["commit"] = [503]`` fails the next commit request once with a 503.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".png", ".gguf", ".pt", ".pth", ".zip")
LFS_MIN_SIZE = 1_000_000


@dataclass
class Commit:
    revision: str
    summary: str
    description: str
    paths: list[str]
    oid: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[Commit] = field(default_factory=list)

    @property
    def files(self) -> dict[str, bytes]:
        return self.branches["main"]


class FakeHub:
    """The server plus what it received. Use as a context manager or call start()/stop()."""

    def __init__(self, token: str = "hf_fake_token", user: str = "alice", lifetime_s: float = 120.0):
        self.token = token
        self.user = user
        self.lifetime_s = lifetime_s
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.failures: dict[str, list[int]] = {}
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None

    # ---------------------------------------------------------------- lifecycle
    @property
    def endpoint(self) -> str:
        assert self._server is not None, "FakeHub not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        server = self._server
        if self._timer is not None:
            self._timer.cancel()
        if server is not None and self._thread is not None and self._thread.is_alive():
            server.shutdown()
            server.server_close()
            if threading.current_thread() is not self._thread:
                self._thread.join(timeout=5)

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- helpers for tests
    def commit_count(self, repo_id: str | None = None) -> int:
        repos = [self.repos[repo_id]] if repo_id else list(self.repos.values())
        return sum(len(r.commits) for r in repos if r is not None)

    def take_failure(self, name: str) -> int | None:
        with self.lock:
            queue = self.failures.get(name)
            if queue:
                return queue.pop(0)
        return None


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"
    timeout = 10  # a stuck client cannot hold a handler thread forever

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    # ---------------------------------------------------------------- plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload=None, headers: dict | None = None) -> None:
        body = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": message}, {"X-Error-Message": message})

    def _authorized(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {self.fake.token}":
            return True
        self._error(401, "Invalid credentials in Authorization header")
        return False

    def _inject(self, name: str) -> bool:
        status = self.fake.take_failure(name)
        if status is None:
            return False
        self._error(status, f"injected failure for {name}")
        return True

    def _repo(self, ns: str, name: str) -> Repo | None:
        repo = self.fake.repos.get(f"{ns}/{name}")
        if repo is None:
            self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        return repo

    # ---------------------------------------------------------------- routes
    def do_GET(self):  # noqa: N802
        path = urlsplit(self.path).path
        self._body()
        self.fake.requests.append(("GET", path))
        if path == "/api/whoami-v2":
            if self._authorized():
                self._send(200, {"type": "user", "name": self.fake.user, "auth": {"accessToken": {"role": "write"}}})
            return
        self._error(404, f"no route GET {path}")

    def do_PUT(self):  # noqa: N802
        path = urlsplit(self.path).path
        body = self._body()
        self.fake.requests.append(("PUT", path))
        if self._inject("lfs_upload"):
            return
        m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)
        if not m:
            return self._error(404, f"no route PUT {path}")
        if hashlib.sha256(body).hexdigest() != m.group(1):
            return self._error(400, "sha256 mismatch")
        with self.fake.lock:
            self.fake.lfs_objects[m.group(1)] = body
        self._send(200, {})

    def do_POST(self):  # noqa: N802
        path = unquote(urlsplit(self.path).path)
        body = self._body()
        self.fake.requests.append(("POST", path))
        if path == "/api/repos/create":
            return self._create(body)
        if path == "/api/validate-yaml":
            return self._send(200, {"errors": [], "warnings": []})
        if m := re.fullmatch(r"/api/models/([^/]+)/([^/]+)/branch/(.+)", path):
            return self._branch(*m.groups())
        if m := re.fullmatch(r"/api/models/([^/]+)/([^/]+)/preupload/(.+)", path):
            return self._preupload(*m.groups(), body)
        if m := re.fullmatch(r"/([^/]+)/([^/]+)\.git/info/lfs/objects/batch", path):
            return self._lfs_batch(*m.groups(), body)
        if m := re.fullmatch(r"/api/models/([^/]+)/([^/]+)/commit/(.+)", path):
            return self._commit(*m.groups(), body)
        self._error(404, f"no route POST {path}")

    def _create(self, body: bytes) -> None:
        if not self._authorized() or self._inject("create"):
            return
        payload = json.loads(body)
        repo_id = f"{payload.get('organization') or self.fake.user}/{payload['name']}"
        with self.fake.lock:
            if repo_id in self.fake.repos:
                url = f"{self.fake.endpoint}/{repo_id}"  # the Hub answers a 409 with the url too
                msg = "You already created this model repo"
                return self._send(409, {"error": msg, "url": url}, {"X-Error-Message": msg})
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            self.fake.repos[repo_id] = Repo(repo_id, private)
        self._send(200, {"url": f"{self.fake.endpoint}/{repo_id}", "name": repo_id})

    def _branch(self, ns: str, name: str, branch: str) -> None:
        if not self._authorized() or (repo := self._repo(ns, name)) is None:
            return
        with self.fake.lock:
            if branch in repo.branches:
                return self._error(409, "Reference already exists")
            repo.branches[branch] = dict(repo.files)
        self._send(200, {})

    def _preupload(self, ns: str, name: str, revision: str, body: bytes) -> None:
        if not self._authorized() or self._inject("preupload") or (repo := self._repo(ns, name)) is None:
            return
        if revision not in repo.branches:
            return self._error(404, f"Invalid rev id: {revision}")
        files = []
        for f in json.loads(body)["files"]:
            lfs = f["path"].lower().endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False})
        self._send(200, {"files": files, "commitOid": "0" * 40})

    def _lfs_batch(self, ns: str, name: str, body: bytes) -> None:
        if not self._authorized() or self._inject("lfs_batch") or self._repo(ns, name) is None:
            return
        payload = json.loads(body)
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.fake.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{self.fake.endpoint}/lfs-upload/{obj['oid']}"}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _commit(self, ns: str, name: str, revision: str, body: bytes) -> None:
        if not self._authorized() or self._inject("commit") or (repo := self._repo(ns, name)) is None:
            return
        if revision not in repo.branches:
            return self._error(404, f"Invalid rev id: {revision}")
        header, staged = None, {}
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                staged[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                data = self.fake.lfs_objects.get(value["oid"])
                if data is None or len(data) != value["size"]:
                    return self._error(400, f"LFS object {value['oid']} for {value['path']} was not uploaded")
                staged[value["path"]] = data
            else:
                return self._error(400, f"unsupported commit operation {key}")
        if header is None or not header.get("summary"):
            return self._error(400, "commit header missing")
        oid = hashlib.sha1(body).hexdigest()
        with self.fake.lock:
            repo.branches[revision].update(staged)
            repo.commits.append(Commit(revision, header["summary"], header.get("description", ""), sorted(staged), oid))
        url = f"{self.fake.endpoint}/{repo.repo_id}/commit/{oid}"
        self._send(200, {"commitUrl": url, "commitOid": oid, "pullRequestUrl": None, "success": True})
