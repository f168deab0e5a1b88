"""The status page's HTTP server: a few endpoints on their own threads, bounded in clients and time.

A failing callable or a bad request is an HTTP error for that request and a debug log line; it never
reaches the daemon. No authentication: bind to loopback unless a proxy in front adds it.
"""

from __future__ import annotations

import functools
import json
import logging
import socket
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from importlib import resources
from typing import Any
from urllib.parse import unquote, urlsplit

from agent.service.statuspage.frames import FrameCache, FrameGetter
from agent.service.statuspage.metrics import CONTENT_TYPE, render_metrics
from agent.service.statuspage.snapshot import StatusSnapshot
from agent.util.httpserver import BoundedHTTPServer, DeadlineHandler

log = logging.getLogger(__name__)

Snapshot = Callable[[], StatusSnapshot]
Alive = Callable[[], str | None]
# (HTTP status, content type, body)
Answer = tuple[int, str, bytes]

MAX_CLIENTS = 16  # concurrent requests; a status page on a small device must not become its load
CLIENT_TIMEOUT_S = 10.0  # for a request to arrive from accept, and for each write of the answer
TEXT = "text/plain; charset=utf-8"
PAGE_FILE = "page.html"


class StatusPageError(RuntimeError):
    """The status page could not start (address taken, not an address of this machine, ...)."""


def parse_address(address: str) -> tuple[str, int]:
    """'127.0.0.1:8790' or '[::1]:8790' -> (host, port); port 0 asks the system for a free one."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise StatusPageError(f"expected host:port such as 127.0.0.1:8790, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


@functools.cache
def page() -> bytes:
    """The page, shipped beside this module as package data (pyproject's package-data lists it)."""
    return resources.files(__package__).joinpath(PAGE_FILE).read_bytes()


class StatusServer:
    """The status page's HTTP server on its own threads, started and stopped by the daemon."""

    def __init__(self, address: str, snapshot: Snapshot, frame: FrameGetter, alive: Alive) -> None:
        self.address = address
        self.host, self.port = parse_address(address)
        self.snapshot = snapshot
        self.frame = frame
        self.alive = alive
        self._frames = FrameCache()
        self._server: _Server | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> StatusServer:
        if self._server is not None:
            return self
        page()  # an install without the page fails here, at start, not at the first visit
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            family = infos[0][0]
        except socket.gaierror as exc:
            raise StatusPageError(f"status page: cannot resolve {self.host!r}: {exc.strerror}") from None
        server_class = type("_BoundServer", (_Server,), {"address_family": family})
        try:
            server = server_class((self.host, self.port), _Handler, status=self)
        except OSError as exc:
            raise StatusPageError(f"status page: cannot listen on {self.address}: {exc.strerror or exc}") from None
        self._server = server
        self.port = server.server_address[1]
        server.serve_in_background()
        log.info("status page on %s", self.url)
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()

    def __enter__(self) -> StatusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what each endpoint answers ----------------------------------------------------------------

    def answer(self, path: str) -> Answer:
        if path == "/healthz":
            return self.healthz()
        if path == "/metrics":
            return 200, CONTENT_TYPE, render_metrics(self.snapshot()).encode()
        if path == "/api/status":
            return 200, "application/json", json.dumps(self.snapshot().to_json(), allow_nan=False).encode()
        if path in ("/", "/index.html"):
            return 200, "text/html; charset=utf-8", page()
        if path.startswith("/frame/") and path.endswith(".jpg"):
            name = unquote(path[len("/frame/") : -len(".jpg")])
            jpeg = self.frame_jpeg(name)
            if jpeg is None:
                return 404, TEXT, f"no frame for pipeline {name!r}\n".encode()
            return 200, "image/jpeg", jpeg
        return 404, TEXT, f"not found: {path}\n".encode()

    def healthz(self) -> Answer:
        try:
            reason = self.alive()
        except Exception as exc:  # noqa: BLE001 (a broken check is unhealthy, not a crash)
            reason = f"health check failed: {exc.__class__.__name__}: {exc}"
        if reason is None:
            return 200, TEXT, b"ok\n"
        return 503, TEXT, f"{reason}\n".encode()

    def frame_jpeg(self, pipeline: str) -> bytes | None:
        got = self.frame(pipeline)
        if got is None:
            return None
        image, boxes = got
        return self._frames.render(pipeline, image, boxes)


class _Server(BoundedHTTPServer):
    name = "status page"
    thread = "statuspage"

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *, status: StatusServer
    ) -> None:
        self.status = status
        super().__init__(address, handler, MAX_CLIENTS)


class _Handler(DeadlineHandler):
    server: _Server
    timeout = CLIENT_TIMEOUT_S  # per write of the answer
    request_timeout = CLIENT_TIMEOUT_S  # for the whole request, from accept (one request per connection)
    server_version = "edge-agent"

    def do_GET(self) -> None:  # http.server's naming
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _serve(self, body: bool) -> None:
        path = urlsplit(self.path).path
        try:
            code, kind, data = self.server.status.answer(path)
        except Exception as exc:  # one failed request must not reach the daemon
            log.debug("status page: %s failed", path, exc_info=True)
            code, kind, data = 500, TEXT, f"{exc.__class__.__name__}: {exc}\n".encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            if body:
                self.wfile.write(data)
        except OSError:
            log.debug("status page: client went away during %s", path)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        log.debug("status page: %s %s", self.address_string(), format % args)
