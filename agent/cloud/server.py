"""A small static server for a registry folder, for development and tests.

It does what devices need from any production server (nginx, S3, a CDN): GET and HEAD, single byte
ranges (resumed downloads), ETag with If-None-Match (cheap polling), and nothing outside the root.
`throttle_bps` slows bodies down, to watch progress bars or to interrupt downloads on purpose.

Its state is bounded: a thread per connection that ends with it, and the last REQUESTS_KEPT requests
(what tests read), nothing that grows with the requests it has served.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

CHUNK = 16 * 1024
REQUESTS_KEPT = 1024  # the newest requests kept for `requests`; older ones are forgotten


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | Literal[False]:
    """(start, end inclusive), None when absent or unusable (serve it all), False when unsatisfiable."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, _, last = header[6:].strip().partition("-")
    try:
        if first == "":
            n = int(last)
            if n <= 0:
                return False
            return max(0, size - n), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size or end < start:
        return False
    return start, min(end, size - 1)


class RegistryHandler(BaseHTTPRequestHandler):
    server: RegistryHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        if not self.server.quiet:
            super().log_message(format, *args)

    def do_HEAD(self) -> None:  # http.server's naming
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def resolve(self) -> Path | None:
        rel = unquote(urlsplit(self.path).path).lstrip("/")
        root = self.server.root
        target = (root / rel).resolve()
        if target != root and root not in target.parents:
            return None
        if any(part.startswith(".") for part in Path(rel).parts):
            return None  # temp files of a publish in progress are never served
        return target

    def etag(self, path: Path, stat: os.stat_result) -> str:
        if path.parent.name == "sha256" and path.parent.parent.name == "blobs":
            return f'"{path.name}"'  # content-addressed: the name is the content's hash
        return f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"'

    def _serve(self, body: bool) -> None:
        self.server.record(self)
        path = self.resolve()
        if path is None or not path.is_file():
            self._status_only(HTTPStatus.NOT_FOUND)
            return
        stat = path.stat()
        etag = self.etag(path, stat)
        immutable = path.parent.name == "sha256"
        common = {
            "ETag": etag,
            "Accept-Ranges": "bytes",
            "Cache-Control": "public, max-age=31536000, immutable" if immutable else "no-cache",
        }
        inm = self.headers.get("If-None-Match")
        if inm and (inm.strip() == "*" or etag in [t.strip() for t in inm.split(",")]):
            self._status_only(HTTPStatus.NOT_MODIFIED, common)
            return
        size = stat.st_size
        span = parse_range(self.headers.get("Range"), size)
        if span is False:
            self._status_only(
                HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, {**common, "Content-Range": f"bytes */{size}"}
            )
            return
        start, end = span if span else (0, size - 1)
        self.send_response(HTTPStatus.PARTIAL_CONTENT if span else HTTPStatus.OK)
        for k, v in common.items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json" if path.suffix == ".json" else "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1 if size else 0))
        if span:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if body and size:
            self.send_body(path, start, end)

    def send_body(self, path: Path, start: int, end: int) -> None:
        rate = self.server.throttle_bps
        with open(path, "rb") as f:
            f.seek(start)
            left = end - start + 1
            t0, sent = time.monotonic(), 0
            while left > 0:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    break
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return
                left -= len(chunk)
                sent += len(chunk)
                if rate:
                    ahead = sent / rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)

    def _status_only(self, status: HTTPStatus, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()


class RegistryHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        root: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        throttle_bps: float | None = None,
        quiet: bool = True,
        handler: type[RegistryHandler] = RegistryHandler,
    ) -> None:
        self.root = Path(root).resolve()
        self.throttle_bps = throttle_bps
        self.quiet = quiet
        self._requests: deque[dict[str, str | None]] = deque(maxlen=REQUESTS_KEPT)
        self._lock = threading.Lock()
        super().__init__((host, port), handler)

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]  # server_address, typed as bytes or str by typeshed
        return f"http://{host}:{port}/"

    @property
    def requests(self) -> list[dict[str, str | None]]:
        """The newest requests served (up to REQUESTS_KEPT), oldest first: method, path, Range, If-None-Match."""
        with self._lock:
            return list(self._requests)

    def record(self, handler: RegistryHandler) -> None:
        with self._lock:
            self._requests.append(
                {
                    "method": handler.command,
                    "path": urlsplit(handler.path).path,
                    "range": handler.headers.get("Range"),
                    "if_none_match": handler.headers.get("If-None-Match"),
                }
            )

    def start(self) -> RegistryHTTPServer:
        """Serve in a background thread (tests, the demo)."""
        threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, name="registry-http", daemon=True
        ).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
