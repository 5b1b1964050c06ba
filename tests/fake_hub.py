"""A small stand-in for the Hugging Face Hub on loopback, implementing exactly the endpoints huggingface_hub's
``HfApi.create_repo`` / ``create_branch`` / ``create_commit`` call (read from the installed client):

    POST /api/repos/create                          {"name", "organization", "visibility"?} -> {"url"}
    POST /api/validate-yaml                         {"content", "repoType"} -> {"errors": [], "warnings": []}
    POST /api/models/{org}/{name}/branch/{branch}   -> {} (409 if the branch exists)
    POST /api/models/{org}/{name}/preupload/{rev}   {"files": [{"path", "sample", "size"}]} -> every file "regular"
    POST /api/models/{org}/{name}/commit/{rev}      ndjson: a header line, then {"key": "file", "value":
                                                    {"path", "content" (base64), "encoding"}} lines -> {"commitUrl",
                                                    "commitOid"}

Every request must carry ``Authorization: Bearer <token>``; anything else is answered 404 and recorded in
``unexpected``. ``fail_commit = (status, message)`` makes the commit endpoint answer that error, as the Hub does
(JSON ``{"error": message}``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import yaml

REPO_PATH = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<action>preupload|commit|branch)/(?P<rev>.+)$")


@dataclass
class FakeRepo:
    repo_id: str
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict] = field(default_factory=list)


class FakeHub:
    """``with FakeHub(token) as hub: HfApi(endpoint=hub.endpoint) ...``; ``hub.repos[repo_id]`` holds what
    arrived."""

    def __init__(self, token: str, user: str = "tester"):
        self.token = token
        self.user = user
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[dict] = []  # method, path, headers (without Authorization), body bytes
        self.unexpected: list[str] = []
        self.validated_yaml: list[str] = []
        self.fail_commit: tuple[int, str] | None = None
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # ------------------------------------------------------------------------------------------ handlers
    def _handler_class(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _reply(self, status: int, payload) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _handle(self, method: str) -> None:
                body = self._body() if method == "POST" else b""
                path = unquote(urlparse(self.path).path)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "authorization"}
                hub.requests.append({"method": method, "path": path, "headers": headers, "body": body,
                                     "authorization": self.headers.get("Authorization")})
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                status, payload = hub._route(method, path, body)
                self._reply(status, payload)

            def do_POST(self):
                self._handle("POST")

            def do_GET(self):
                self._handle("GET")

            def do_HEAD(self):
                self._handle("HEAD")

        return Handler

    def _route(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            self.validated_yaml.append(content)
            return self._validate_yaml(content)
        match = REPO_PATH.match(path)
        if method == "POST" and match:
            repo = self.repos.get(match["repo"])
            if repo is None:
                return 404, {"error": f"Repository not found: {match['repo']}"}
            action = match["action"]
            if action == "branch":
                if match["rev"] in repo.branches:
                    return 409, {"error": f"Branch {match['rev']} already exists"}
                repo.branches[match["rev"]] = dict(repo.branches["main"])
                return 200, {}
            if match["rev"] not in repo.branches:
                return 404, {"error": f"Revision not found: {match['rev']}"}
            if action == "preupload":
                files = json.loads(body)["files"]
                return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                        "oid": None} for f in files]}
            return self._commit(repo, match["rev"], body)
        self.unexpected.append(f"{method} {path}")
        return 404, {"error": f"fake hub: {method} {path} is not implemented"}

    def _create_repo(self, payload: dict) -> tuple[int, dict]:
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.endpoint}/{repo_id}"}
        self.repos[repo_id] = FakeRepo(repo_id, private=payload.get("visibility") == "private")
        return 200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id}

    @staticmethod
    def _validate_yaml(content: str) -> tuple[int, dict]:
        if not content.startswith("---\n"):
            return 200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]}
        try:
            yaml.safe_load(content.split("---\n")[1])
        except yaml.YAMLError as error:
            return 400, {"errors": [{"message": str(error)}]}
        return 200, {"errors": [], "warnings": []}

    def _commit(self, repo: FakeRepo, revision: str, body: bytes) -> tuple[int, dict]:
        if self.fail_commit is not None:
            status, message = self.fail_commit
            return status, {"error": message}
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        files = {}
        for line in lines:
            if line["key"] == "file":
                value = line["value"]
                assert value["encoding"] == "base64", value["encoding"]
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] != "header":
                self.unexpected.append(f"commit operation {line['key']}")
        repo.branches[revision].update(files)
        oid = hashlib.sha1(body).hexdigest()
        repo.commits.append({"revision": revision, "summary": header["summary"], "files": sorted(files), "oid": oid})
        return 200, {"commitUrl": f"{self.endpoint}/{repo.repo_id}/commit/{oid}", "commitOid": oid,
                     "pullRequestUrl": None}
