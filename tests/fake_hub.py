"""A fake Hugging Face Hub on 127.0.0.1 for testing ``moespeq pull`` without a network.

It serves the endpoints huggingface_hub's ``snapshot_download`` uses (ENVIRONMENT.md):
revision info, the recursive tree, and HEAD/GET of ``/{repo}/resolve/{sha}/{file}`` with
``X-Repo-Commit`` and ``ETag`` headers and Range support. ``drop_once`` makes the first
GET of a file send half its bytes and close the connection.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, bytes]], gated: set[str] = frozenset()):
        self.repos = repos
        self.gated = set(gated)
        self.drop_once: set[tuple[str, str]] = set()
        self.stall: set[tuple[str, str]] = set()  # send half, then nothing until the hub closes
        self.closing = threading.Event()
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.handle(self, head=True)

            def do_GET(self):
                hub.handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def sha(repo: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()

    def error(self, h, code: int, kind: str, message: str = "error") -> None:
        body = json.dumps({"error": message}).encode()
        h.send_response(code)
        h.send_header("X-Error-Code", kind)
        h.send_header("X-Error-Message", message)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def json(self, h, obj, head: bool) -> None:
        body = json.dumps(obj).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def refused(self, h, repo: str, rev: str) -> bool:
        """Answer the hub's error for an unknown or gated repository or an unknown
        revision; whether one was sent."""
        if repo not in self.repos:
            self.error(h, 404, "RepoNotFound", "Repository not found")
        elif repo in self.gated:
            self.error(h, 403, "GatedRepo", "Access to this repo is restricted")
        elif rev not in ("main", self.sha(repo)):
            self.error(h, 404, "RevisionNotFound", "Revision not found")
        else:
            return False
        return True

    def handle(self, h, head: bool) -> None:
        path = h.path.split("?")[0]
        self.requests.append(("HEAD" if head else "GET", path, h.headers.get("Range")))
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path)
        if m:
            repo, rev = m.groups()
            if self.refused(h, repo, rev):
                return
            files = self.repos[repo]
            return self.json(
                h, {"id": repo, "sha": self.sha(repo), "siblings": [{"rfilename": f} for f in files]}, head
            )
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/.*)?", path)
        if m:
            repo, rev = m.groups()
            if self.refused(h, repo, rev):  # as the hub answers: the repository's errors first
                return
            files = self.repos[repo]
            return self.json(
                h,
                [
                    {"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                    for f, b in files.items()
                ],
                head,
            )
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            repo, rev, name = m.groups()
            if repo not in self.repos:
                return self.error(h, 404, "RepoNotFound", "Repository not found")
            if repo in self.gated:
                return self.error(h, 403, "GatedRepo", "Access to this repo is restricted")
            data = self.repos[repo].get(name)
            if data is None:
                return self.error(h, 404, "EntryNotFound", "Entry not found")
            start = 0
            rng = h.headers.get("Range")
            if rng and not head:
                start = int(re.match(r"bytes=(\d+)-", rng).group(1))
            body = data[start:]
            h.send_response(206 if start else 200)
            h.send_header("X-Repo-Commit", self.sha(repo))
            h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            h.send_header("Content-Length", str(len(body)))
            if start:
                h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            h.end_headers()
            if head:
                return
            if (repo, name) in self.stall:
                h.wfile.write(body[: len(body) // 2])
                h.wfile.flush()
                self.closing.wait(60)
                return
            if (repo, name) in self.drop_once:
                self.drop_once.discard((repo, name))
                h.wfile.write(body[: len(body) // 2])
                h.wfile.flush()
                h.close_connection = True
                import socket

                h.connection.shutdown(socket.SHUT_RDWR)
                return
            h.wfile.write(body)
            return
        self.error(h, 404, "EntryNotFound", "not found")
