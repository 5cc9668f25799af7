"""A local stand-in for the Hugging Face Hub's upload and download APIs — a **test double**, not a Hub implementation.

It serves the endpoints ``huggingface_hub`` calls to publish a folder (see ``/work/shared/specs/offline-env.md``,
"Hub uploads without the Hub") and to download one (``snapshot_download``, ``hf_hub_download``) on ``127.0.0.1`` at
an ephemeral port, in a background thread, with the standard library's ``http.server``:

- ``POST /api/repos/create``                              create a model repo (exists already: 409)
- ``GET  /api/models/{repo_id}[/revision/{rev}]``          repo info: ``sha`` (the revision's commit), ``siblings``
- ``GET  /api/models/{repo_id}/tree/{rev}[/{path}]``       the file listing (``?recursive=true``), with git blob oids
- ``HEAD /{repo_id}/resolve/{rev}/{path}``                 file metadata: ``ETag``, ``X-Repo-Commit``, ``Content-Length``
- ``GET  /{repo_id}/resolve/{rev}/{path}``                 the file's bytes, with the same headers
- ``POST /api/models/{repo_id}/branch/{branch}``           create a branch from ``main`` (exists already: 409)
- ``POST /api/models/{repo_id}/preupload/{revision}``      every file is uploaded as a "regular" git blob (no LFS/Xet)
- ``POST /api/models/{repo_id}/commit/{revision}``         NDJSON commit: applied to the revision all at once
- ``POST /api/validate-yaml``                               no errors, no warnings
- anything else                                            404

A revision is a branch or a commit sha; every commit keeps its files, so an old commit stays downloadable. Unknown
repos, revisions and files answer 404 with the ``X-Error-Code`` the real Hub sends (``RepoNotFound``,
``RevisionNotFound``, ``EntryNotFound``), which huggingface_hub turns into its typed errors. Writes need the token;
reads of a public repo do not (a private repo without the token is "not found", as on the Hub).

Every accepted commit is recorded in :attr:`HubTestServer.commits`; a revision's files change only when a whole
commit is accepted. Faults can be injected per endpoint (:meth:`HubTestServer.fail`): an HTTP status, or a dropped
connection with no response (what a connection reset looks like to the client). :meth:`HubTestServer.publish` seeds
a repo without going through the upload API.

Usage::

    with HubTestServer() as hub:
        HfApi(endpoint=hub.endpoint, token="hf_test").create_repo("user/model")
        commit = hub.publish("org/model", {"config.json": b"{}"})
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:
    from typing_extensions import Self

_REPO_ROUTE = re.compile(r"^/api/models/(?P<repo_id>[^/]+(?:/[^/]+)?)/(?P<op>preupload|commit|branch)/(?P<rev>.+)$")
_INFO_ROUTE = re.compile(r"^/api/models/(?P<repo_id>[^/]+(?:/[^/]+)?)(?:/revision/(?P<rev>.+))?$")
_TREE_ROUTE = re.compile(r"^/api/models/(?P<repo_id>[^/]+(?:/[^/]+)?)/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$")
_FILE_ROUTE = re.compile(r"^/(?P<repo_id>[^/]+(?:/[^/]+)?)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_READS = ("info", "tree", "resolve")
DROP_CONNECTION = 0  # pass as ``status`` to :meth:`HubTestServer.fail` to close the socket without an answer
NEVER_ANSWER = -1  # pass as ``status``: accept the request and never answer it (until the server stops, at most 60 s)


@dataclass
class Commit:
    """One accepted commit: where it went, its message, and the files it added (path → bytes)."""

    repo_id: str
    revision: str
    summary: str
    files: dict[str, bytes]
    oid: str
    create_pr: bool = False


@dataclass
class Reply:
    """One answer: a status (or :data:`DROP_CONNECTION` / :data:`NEVER_ANSWER`), a body and extra headers."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _json(status: int, payload: Any, error_code: str | None = None, **headers: str) -> Reply:
    extra = {"Content-Type": "application/json", **headers}
    if status >= 400:
        extra["X-Error-Message"] = str(payload.get("error", ""))
        if error_code is not None:
            extra["X-Error-Code"] = error_code
    return Reply(status, json.dumps(payload).encode(), extra)


def blob_oid(data: bytes) -> str:
    """The git blob sha1 of ``data`` (what the Hub gives as a regular file's oid and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    """A repo's branches (name → files, and name → head commit) and every commit's files (sha → files)."""

    private: bool | None
    revisions: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    heads: dict[str, str] = field(default_factory=dict)
    snapshots: dict[str, dict[str, bytes]] = field(default_factory=dict)

    def lookup(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        """``(commit, files)`` of a branch or a commit sha; ``None`` when there is no such revision."""
        if revision in self.revisions:
            return self.heads[revision], self.revisions[revision]
        if revision in self.snapshots:
            return revision, self.snapshots[revision]
        return None

    def advance(self, branch: str, files: dict[str, bytes], oid: str) -> None:
        """Point ``branch`` at a new commit ``oid`` holding ``files``."""
        self.revisions[branch] = files
        self.heads[branch] = oid
        self.snapshots[oid] = dict(files)


class HubTestServer:
    """The test double. ``endpoint`` is its base URL; ``requests`` lists ``(method, path)`` of every request."""

    def __init__(self, token: str | None = "hf_test") -> None:
        self.token = token  # requests must carry ``Authorization: Bearer <token>`` (401 otherwise); None: no check
        self.repos: dict[str, Repo] = {}
        self.commits: list[Commit] = []
        self.requests: list[tuple[str, str]] = []
        self._faults: dict[str, deque[int]] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-test-server", daemon=True)
        self.stopped = threading.Event()  # releases requests held by NEVER_ANSWER

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # ------------------------------------------------------------------ test controls
    def fail(self, endpoint: str, status: int, times: int = 1) -> None:
        """Answer the next ``times`` requests to ``endpoint`` ("create", "preupload", "commit", "branch", "info",
        "tree", "resolve", "validate-yaml") with ``status`` (or drop the connection when ``status`` is
        :data:`DROP_CONNECTION`)."""
        with self._lock:
            self._faults.setdefault(endpoint, deque()).extend([status] * times)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files a revision holds now (after every accepted commit)."""
        return dict(self.repos[repo_id].revisions[revision])

    def publish(self, repo_id: str, files: Mapping[str, bytes] | str | Path, *, revision: str = "main",
                private: bool = False) -> str:
        """Commit ``files`` (``{path: bytes}``, or every file under a local folder) to ``revision`` of ``repo_id``
        (the repo, and a branch other than ``main``, created as needed); return the commit sha."""
        if not isinstance(files, Mapping):
            root = Path(files)
            files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        with self._lock:
            repo = self.repos.get(repo_id)
            if repo is None:
                repo = self.repos[repo_id] = self._new_repo(repo_id, private)
            current = repo.revisions.get(revision, repo.revisions["main"])
            oid = hashlib.sha1(json.dumps([repo_id, revision, repo.heads.get(revision, repo.heads["main"]),
                                           sorted((p, blob_oid(d)) for p, d in files.items())]).encode()).hexdigest()
            repo.advance(revision, {**current, **files}, oid)
            self.commits.append(Commit(repo_id, revision, "publish", dict(files), oid))
        return oid

    @staticmethod
    def _new_repo(repo_id: str, private: bool | None) -> Repo:
        repo = Repo(private=private)
        repo.advance("main", {}, hashlib.sha1(f"initial commit of {repo_id}".encode()).hexdigest())
        return repo

    def count(self, endpoint: str) -> int:
        """How many requests reached ``endpoint`` (faulted ones included)."""
        return sum(1 for _, name in self.requests if name == endpoint)

    # ------------------------------------------------------------------ request handling
    def _take_fault(self, endpoint: str) -> int | None:
        with self._lock:
            queue = self._faults.get(endpoint)
            return queue.popleft() if queue else None

    def handle(self, method: str, path: str, query: dict[str, list[str]], headers: Any, body: bytes) -> Reply:
        """Route one request to its answer."""
        name, match = _route(method, path)
        with self._lock:
            self.requests.append((method, name))
        fault = self._take_fault(name)
        if fault is not None:
            return _json(fault, {"error": f"injected failure ({fault}) on {name}"})
        authorization = headers.get("authorization")
        authorized = authorization == f"Bearer {self.token}"
        if self.token is not None and authorization is not None and not authorized:
            return _json(401, {"error": "Invalid credentials in Authorization header"})
        if self.token is not None and name not in ("validate-yaml", *_READS) and not authorized:
            return _json(401, {"error": "Invalid credentials in Authorization header"})
        if name == "create":
            return self._create(json.loads(body or b"{}"))
        if name == "validate-yaml":
            return _json(200, {"errors": [], "warnings": []})
        if match is None:
            return _json(404, {"error": f"no route for {method} {path}"})
        repo_id = unquote(match["repo_id"])
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and self.token is not None and not authorized):
            return _json(404, {"error": f"Repository {repo_id} not found"}, "RepoNotFound")
        revision = unquote(match["rev"] or "main")
        if name in _READS:
            return self._read(name, repo_id, repo, revision, match, query, head=method == "HEAD")
        if name == "branch":
            if revision in repo.revisions:
                return _json(409, {"error": f"Reference {revision} already exists"})
            repo.revisions[revision] = dict(repo.revisions["main"])
            repo.heads[revision] = repo.heads["main"]
            return _json(200, {})
        if name == "preupload":
            files = json.loads(body)["files"]
            return _json(200, {
                "files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]
            })
        return self._commit(repo_id, repo, revision, body, create_pr=query.get("create_pr") == ["1"])

    def _read(self, name: str, repo_id: str, repo: Repo, revision: str, match: re.Match[str],
              query: dict[str, list[str]], *, head: bool) -> Reply:
        """Repo info, a tree listing, or a file (its metadata only for ``HEAD``) at ``revision``."""
        with self._lock:
            found = repo.lookup(revision)
        if found is None:
            return _json(404, {"error": f"Invalid rev id: {revision}"}, "RevisionNotFound")
        commit, files = found
        if name == "info":
            return _json(200, {"id": repo_id, "private": bool(repo.private), "sha": commit,
                               "siblings": [{"rfilename": p} for p in sorted(files)]})
        path = unquote(match["path"] or "")
        if name == "tree":
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            return _json(200, _tree(files, path, recursive))
        data = files.get(path)
        if data is None:
            return _json(404, {"error": f"Entry not found: {path}"}, "EntryNotFound", **{"X-Repo-Commit": commit})
        headers = {"Content-Type": "application/octet-stream", "ETag": f'"{blob_oid(data)}"', "X-Repo-Commit": commit,
                   "Content-Length": str(len(data))}
        return Reply(200, b"" if head else data, headers)

    def _create(self, payload: dict[str, Any]) -> Reply:
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        with self._lock:
            if repo_id in self.repos:
                return _json(409, {"error": "You already created this model repo", "url": f"{self.endpoint}/{repo_id}"})
            private = payload.get("visibility") == "private" if "visibility" in payload else None
            self.repos[repo_id] = self._new_repo(repo_id, private)
        return _json(200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id})

    def _commit(self, repo_id: str, repo: Repo, revision: str, body: bytes, *, create_pr: bool) -> Reply:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return _json(400, {"error": "commit payload must start with a header line"})
        added: dict[str, bytes] = {}
        for line in lines[1:]:
            if line["key"] != "file" or line["value"].get("encoding") != "base64":
                return _json(400, {"error": f"unsupported commit operation {line['key']!r} (the test double accepts "
                                            "files)"})
            added[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        oid = hashlib.sha1(body).hexdigest()
        with self._lock:
            target = f"refs/pr/{sum(c.create_pr for c in self.commits if c.repo_id == repo_id) + 1}" if create_pr else revision
            if target not in repo.revisions and not create_pr:
                return _json(404, {"error": f"Revision {revision} not found"}, "RevisionNotFound")
            repo.advance(target, {**repo.revisions.get(target, repo.revisions["main"]), **added}, oid)
            self.commits.append(Commit(repo_id, target, lines[0]["value"]["summary"], added, oid, create_pr))
        pr_url = f"{self.endpoint}/{repo_id}/discussions/{target.rsplit('/', 1)[-1]}" if create_pr else None
        return _json(200, {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid,
                           "pullRequestUrl": pr_url})


def _tree(files: Mapping[str, bytes], path: str, recursive: bool) -> list[dict[str, Any]]:
    """The ``/tree`` entries under ``path``: files (git blob oid, size) and folders, one level or all."""
    prefix = f"{path.rstrip('/')}/" if path else ""
    entries: dict[str, dict[str, Any]] = {}
    for name, data in sorted(files.items()):
        if not name.startswith(prefix):
            continue
        parts = name[len(prefix):].split("/")
        for depth in range(1, len(parts)):
            folder = prefix + "/".join(parts[:depth])
            if recursive or depth == 1:
                entries.setdefault(folder, {"type": "directory", "oid": blob_oid(folder.encode()), "size": 0,
                                            "path": folder})
        if recursive or len(parts) == 1:
            entries[name] = {"type": "file", "oid": blob_oid(data), "size": len(data), "path": name}
    return list(entries.values())


def _route(method: str, path: str) -> tuple[str, re.Match[str] | None]:
    if method == "POST" and path == "/api/repos/create":
        return "create", None
    if method == "POST" and path == "/api/validate-yaml":
        return "validate-yaml", None
    match = _REPO_ROUTE.match(path)
    if match and method == "POST":
        return match["op"], match
    match = _TREE_ROUTE.match(path)
    if match and method == "GET":
        return "tree", match
    match = _INFO_ROUTE.match(path)
    if match and method == "GET":
        return "info", match
    match = _FILE_ROUTE.match(path)
    if match and method in ("GET", "HEAD") and not path.startswith("/api/"):
        return "resolve", match
    return f"{method} {path}", None


def _make_handler(server: HubTestServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self, method: str) -> None:
            url = urlsplit(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            reply = server.handle(method, url.path, parse_qs(url.query), self.headers, body)
            if reply.status == NEVER_ANSWER:
                server.stopped.wait(timeout=60)
                self.close_connection = True
                return
            if reply.status == DROP_CONNECTION:
                self.close_connection = True
                self.connection.shutdown(2)  # no status line: the client sees the peer disconnect
                return
            self.send_response(reply.status)
            headers = {"Content-Length": str(len(reply.body)), **reply.headers}
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(reply.body)

        def do_GET(self) -> None:  # http.server's naming
            self._serve("GET")

        def do_HEAD(self) -> None:
            self._serve("HEAD")

        def do_POST(self) -> None:
            self._serve("POST")

        def log_message(self, format: str, *args: Any) -> None:  # silence per-request logging
            pass

    return Handler
