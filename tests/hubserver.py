"""A minimal stand-in for the Hugging Face hub's file endpoint, for download tests offline.

``huggingface_hub.hf_hub_download`` (2.x) sends ``HEAD {endpoint}/{datasets/}{repo}/resolve/{rev}/
{file}`` and reads the commit (``X-Repo-Commit``), the ``ETag`` and the size (``Content-Length``)
from the answer, then ``GET``s the same URL. A missing file is a 404 carrying
``X-Error-Code: EntryNotFound``, which it maps to its "entry not found" error. No ``X-Xet-*``
headers are sent, so the plain HTTP download path is taken even where ``hf_xet`` is installed.
"""

from __future__ import annotations

import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class HubServer:
    """Serves ``files[(repo_type, repo_id, filename)]`` on 127.0.0.1 at a free port."""

    def __init__(self) -> None:
        self.files: dict[tuple[str, str, str], bytes] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def add(self, repo_id: str, filename: str, data: bytes, repo_type: str = "model") -> None:
        self.files[(repo_type, repo_id, filename)] = data

    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                self._answer(with_body=False)

            def do_GET(self) -> None:
                self._answer(with_body=True)

            def _answer(self, with_body: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                hub.requests.append((self.command, path))
                data = hub.lookup(path)
                if data is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("X-Error-Message", "Entry not found")
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if with_body:
                    self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def lookup(self, path: str) -> bytes | None:
        match = RESOLVE.match(path)
        if match is None:
            return None
        kind, repo_id, _revision, filename = match.groups()
        repo_type = {"datasets": "dataset", "spaces": "space"}.get(kind or "", "model")
        return self.files.get((repo_type, repo_id, filename))
