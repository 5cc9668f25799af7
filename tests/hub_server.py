"""A local stand-in for the Hugging Face Hub's upload API — a **test double**, not a Hub implementation.

It serves the few endpoints ``huggingface_hub.HfApi`` calls to publish a folder (see
``/work/shared/specs/offline-env.md``, "Hub uploads without the Hub") on ``127.0.0.1`` at an ephemeral port, in a
background thread, with the standard library's ``http.server``:

- ``POST /api/repos/create``                              create a model repo (exists already: 409)
- ``GET  /api/models/{repo_id}[/revision/{rev}]``          repo info (404 for unknown repos)
- ``POST /api/models/{repo_id}/branch/{branch}``           create a branch from ``main`` (exists already: 409)
- ``POST /api/models/{repo_id}/preupload/{revision}``      every file is uploaded as a "regular" git blob (no LFS/Xet)
- ``POST /api/models/{repo_id}/commit/{revision}``         NDJSON commit: applied to the revision all at once
- ``POST /api/validate-yaml``                               no errors, no warnings
- anything else                                            404

Every accepted commit is recorded in :attr:`HubTestServer.commits`; a revision's files change only when a whole
commit is accepted. Faults can be injected per endpoint (:meth:`HubTestServer.fail`): an HTTP status, or a dropped
connection with no response (what a connection reset looks like to the client).

Usage::

    with HubTestServer() as hub:
        HfApi(endpoint=hub.endpoint, token="hf_test").create_repo("user/model")
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:
    from typing_extensions import Self

_REPO_ROUTE = re.compile(r"^/api/models/(?P<repo_id>[^/]+(?:/[^/]+)?)/(?P<op>preupload|commit|branch)/(?P<rev>.+)$")
_INFO_ROUTE = re.compile(r"^/api/models/(?P<repo_id>[^/]+(?:/[^/]+)?)(?:/revision/(?P<rev>.+))?$")
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
class Repo:
    private: bool | None
    revisions: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})


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
        "validate-yaml") with ``status`` (or drop the connection when ``status`` is :data:`DROP_CONNECTION`)."""
        with self._lock:
            self._faults.setdefault(endpoint, deque()).extend([status] * times)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files a revision holds now (after every accepted commit)."""
        return dict(self.repos[repo_id].revisions[revision])

    def count(self, endpoint: str) -> int:
        """How many requests reached ``endpoint`` (faulted ones included)."""
        return sum(1 for _, name in self.requests if name == endpoint)

    # ------------------------------------------------------------------ request handling
    def _take_fault(self, endpoint: str) -> int | None:
        with self._lock:
            queue = self._faults.get(endpoint)
            return queue.popleft() if queue else None

    def handle(self, method: str, path: str, query: dict[str, list[str]], headers: Any, body: bytes) -> tuple[int, Any]:
        """Route one request; return ``(status, json_body)`` or ``(DROP_CONNECTION, None)``."""
        name, match = _route(method, path)
        with self._lock:
            self.requests.append((method, name))
        fault = self._take_fault(name)
        if fault is not None:
            return fault, {"error": f"injected failure ({fault}) on {name}"}
        authorized = headers.get("authorization") == f"Bearer {self.token}"
        if self.token is not None and name != "validate-yaml" and not authorized:
            return 401, {"error": "Invalid credentials in Authorization header"}
        if name == "create":
            return self._create(json.loads(body or b"{}"))
        if name == "validate-yaml":
            return 200, {"errors": [], "warnings": []}
        if match is None:
            return 404, {"error": f"no route for {method} {path}"}
        repo_id = unquote(match["repo_id"])
        repo = self.repos.get(repo_id)
        if repo is None:
            return 404, {"error": f"Repository {repo_id} not found"}
        revision = unquote(match["rev"] or "main")
        if name == "info":
            return 200, {"id": repo_id, "private": bool(repo.private), "sha": "0" * 40, "siblings": []}
        if name == "branch":
            if revision in repo.revisions:
                return 409, {"error": f"Reference {revision} already exists"}
            repo.revisions[revision] = dict(repo.revisions["main"])
            return 200, {}
        if name == "preupload":
            files = json.loads(body)["files"]
            return 200, {
                "files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]
            }
        return self._commit(repo_id, repo, revision, body, create_pr=query.get("create_pr") == ["1"])

    def _create(self, payload: dict[str, Any]) -> tuple[int, Any]:
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        with self._lock:
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.endpoint}/{repo_id}"}
            self.repos[repo_id] = Repo(private=payload.get("visibility") == "private" if "visibility" in payload else None)
        return 200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id}

    def _commit(self, repo_id: str, repo: Repo, revision: str, body: bytes, *, create_pr: bool) -> tuple[int, Any]:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return 400, {"error": "commit payload must start with a header line"}
        added: dict[str, bytes] = {}
        for line in lines[1:]:
            if line["key"] != "file" or line["value"].get("encoding") != "base64":
                return 400, {"error": f"unsupported commit operation {line['key']!r} (the test double accepts files)"}
            added[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        oid = hashlib.sha1(body).hexdigest()
        with self._lock:
            target = f"refs/pr/{sum(c.create_pr for c in self.commits if c.repo_id == repo_id) + 1}" if create_pr else revision
            if target not in repo.revisions and not create_pr:
                return 404, {"error": f"Revision {revision} not found"}
            repo.revisions.setdefault(target, dict(repo.revisions["main"])).update(added)
            self.commits.append(Commit(repo_id, target, lines[0]["value"]["summary"], added, oid, create_pr))
        pr_url = f"{self.endpoint}/{repo_id}/discussions/{target.rsplit('/', 1)[-1]}" if create_pr else None
        return 200, {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": pr_url}


def _route(method: str, path: str) -> tuple[str, re.Match[str] | None]:
    if method == "POST" and path == "/api/repos/create":
        return "create", None
    if method == "POST" and path == "/api/validate-yaml":
        return "validate-yaml", None
    match = _REPO_ROUTE.match(path)
    if match and method == "POST":
        return match["op"], match
    match = _INFO_ROUTE.match(path)
    if match and method == "GET":
        return "info", match
    return f"{method} {path}", None


def _make_handler(server: HubTestServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self, method: str) -> None:
            url = urlsplit(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, payload = server.handle(method, url.path, parse_qs(url.query), self.headers, body)
            if status == NEVER_ANSWER:
                server.stopped.wait(timeout=60)
                self.close_connection = True
                return
            if status == DROP_CONNECTION:
                self.close_connection = True
                self.connection.shutdown(2)  # no status line: the client sees the peer disconnect
                return
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status >= 400:
                self.send_header("X-Error-Message", str(payload.get("error", "")))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # http.server's naming
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def log_message(self, format: str, *args: Any) -> None:  # silence per-request logging
            pass

    return Handler
