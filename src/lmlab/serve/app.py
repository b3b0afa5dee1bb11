"""The dashboard's web app (Starlette) and its server (uvicorn): a JSON API over the stores under
one directory, and a static page that draws it with uPlot (shipped in ``static/vendor``).

- ``GET /``: the page. ``GET /static/...``: its script, styles and the charting library.
- ``GET /api/experiments``: the experiments under the directory (:class:`~.catalog.Listing`).
- ``GET /api/experiment?key=K&x=tokens|step|wall_s&points=N``: one experiment's runs table and
  curves (:func:`~.payload.experiment_payload`). ``K`` is its folder relative to the served
  directory, ``.`` for the directory itself (a query parameter: in a path, browsers would
  resolve ``.`` away).

The page polls the API; each answer carries an ETag derived from the store's state, so a poll of
an experiment that has not changed is answered 304 without rebuilding anything.

Safety: the server binds 127.0.0.1 unless told otherwise, and then answers only requests
addressed to a loopback name (a web page elsewhere cannot reach it by DNS rebinding); every
store is opened read-only; the page fills the DOM with ``textContent`` only, and the
Content-Security-Policy forbids any script but its own files, so a ``<script>`` in an arm name
or a spec stays text.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import sqlite3
from collections.abc import Callable
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmlab.analysis.summary import X_LABEL
from lmlab.errors import UserError
from lmlab.serve.catalog import Catalog, make_etag
from lmlab.serve.payload import DEFAULT_POINTS, MAX_POINTS

STATIC = Path(__file__).parent / "static"
LOOPBACK = ("127.0.0.1", "localhost")
# Scripts, styles and data come from this server only; no inline script, no frames, no plugins.
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'")
_HEADERS = [(b"content-security-policy", _CSP.encode()), (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY")]


class _SecurityHeaders:
    """Adds the headers above to every response (plain ASGI: no buffering of bodies)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _headers(etag: str) -> dict[str, str]:
    return {"ETag": etag, "Cache-Control": "no-cache"}


def _unchanged(request: Request, etag: str) -> Response | None:
    """304 when the client already holds this ``etag`` (the page sends it back on each poll)."""
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=_headers(etag))
    return None


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status,
                        headers={"Cache-Control": "no-store"})


def create_app(root: Path, *, refresh_s: float = 2.0,
               allowed_hosts: tuple[str, ...] = LOOPBACK) -> Starlette:
    """The dashboard over every experiment under ``root`` (``root`` itself may be one)."""
    catalog = Catalog(root)

    def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    def experiments(request: Request) -> Response:
        body = {"root": str(catalog.root), "refresh_s": refresh_s,
                "experiments": [dataclasses.asdict(e) for e in catalog.experiments()]}
        etag = make_etag(json.dumps(body, sort_keys=True))
        return _unchanged(request, etag) or JSONResponse(body, headers=_headers(etag))

    def experiment(request: Request) -> Response:
        key = request.query_params.get("key", "")
        directory = catalog.directory(key)
        if directory is None:
            return _error(404, f"no experiment {key!r} under {catalog.root}")
        x_key = request.query_params.get("x") or None
        if x_key is not None and x_key not in X_LABEL:
            return _error(400, f"x must be one of {', '.join(X_LABEL)} (got {x_key!r})")
        try:
            points = int(request.query_params.get("points", DEFAULT_POINTS))
        except ValueError:
            return _error(400, "points must be a whole number")
        points = min(max(points, 50), MAX_POINTS)
        try:
            etag, payload = catalog.payload(directory, x_key, points)
        except (sqlite3.Error, UserError) as e:
            # A store being created, or one this lmlab cannot read: say so, and the page retries.
            return _error(503, str(e))
        if (unchanged := _unchanged(request, etag)) is not None:
            return unchanged
        body = {"key": key, "path": str(directory), "refresh_s": refresh_s, **payload}
        return JSONResponse(body, headers=_headers(etag))

    routes = [
        Route("/", index),
        Route("/api/experiments", experiments),
        Route("/api/experiment", experiment),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [Middleware(_SecurityHeaders),
                  Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts)),
                  Middleware(GZipMiddleware, minimum_size=2048)]
    return Starlette(routes=routes, middleware=middleware)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port`` (0: any free port); a UserError when it cannot be
    had. Bound here, not by uvicorn, so a port in use is one clear error and the chosen port is
    known before the server starts."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"cannot resolve host {host!r}: {e.strerror}", field="--host") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}",
                        field="--port") from None
    sock.set_inheritable(True)
    return sock


def run(root: Path, *, host: str = "127.0.0.1", port: int = 8765, refresh_s: float = 2.0,
        on_ready: Callable[[str], None] | None = None) -> None:
    """Serve the dashboard until interrupted. ``on_ready`` gets the page's URL once listening."""
    import uvicorn

    local = host in LOOPBACK
    app = create_app(root, refresh_s=refresh_s, allowed_hosts=LOOPBACK if local else ("*",))
    sock = bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    if on_ready:
        on_ready(f"http://{url_host}:{bound_port}/")
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
