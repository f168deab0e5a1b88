"""The endpoint's HTTP server: KServe v2 routes on bounded threads, behind a token or mTLS.

Each connection has a thread of its own (HTTP/1.1 keep-alive, as tritonclient uses it), at most
`max_clients` at once; inferences run at most `concurrency` at a time on the handler threads, in the
pipelines' own shared sessions. Every refusal is a JSON `{"error": ...}` with a 4xx (or 503 when busy)
and a debug log line; nothing a client sends reaches the daemon.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from agent import __version__
from agent.config.endpoint import EndpointConfig
from agent.service.endpoint.routes import Answer, Routes
from agent.service.endpoint.stats import EndpointStats
from agent.service.endpoint.tensors import RequestError
from agent.service.statuspage.server import parse_address
from agent.util import redact
from agent.util.files import read_secret
from agent.util.httpserver import BoundedHTTPServer, DeadlineHandler

if TYPE_CHECKING:
    from agent.inference.runtime import Model

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 30.0  # a keep-alive connection whose next request has not arrived whole by then is closed
JSON = "application/json"


class EndpointError(RuntimeError):
    """The endpoint could not start (address taken, token missing, TLS files unreadable, ...)."""


def load_token(config: EndpointConfig, environ: Mapping[str, str]) -> bytes | None:
    """The bearer token clients must send, from the environment or a file; masked wherever text leaves
    the process (agent.util.redact)."""
    if config.token_env is not None:
        token = environ.get(config.token_env, "").strip()
        if not token:
            raise EndpointError(f"endpoint.token_env: environment variable {config.token_env} is not set or empty")
    elif config.token_file is not None:
        try:
            token = read_secret(config.token_file)
        except OSError as exc:
            raise EndpointError(
                f"endpoint.token_file: cannot read {config.token_file}: {exc.strerror or exc}"
            ) from None
        if not token:
            raise EndpointError(f"endpoint.token_file: {config.token_file} is empty")
    else:
        return None
    redact.remember(token)
    return token.encode()


def tls_context(config: EndpointConfig) -> ssl.SSLContext | None:
    tls = config.tls
    if tls is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.cert, tls.key)
        if tls.client_ca is not None:
            context.load_verify_locations(tls.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise EndpointError(f"endpoint.tls: cannot load the certificate, key or client CA: {exc}") from None
    return context


class InferenceEndpoint:
    """The KServe v2 endpoint on its own threads, started and stopped by the daemon."""

    def __init__(
        self,
        config: EndpointConfig,
        models: Callable[[], Mapping[str, Model]],
        ready: Callable[[], str | None],
        environ: Mapping[str, str],
    ) -> None:
        self.config = config
        self.host, self.port = parse_address(config.address)
        self.stats = EndpointStats()
        self.routes = Routes(config, models, ready, self.stats, __version__)
        self._token = load_token(config, environ)
        self.tls = tls_context(config)
        self._server: _Server | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def start(self) -> InferenceEndpoint:
        if self._server is not None:
            return self
        try:
            family = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0][0]
        except socket.gaierror as exc:
            raise EndpointError(f"endpoint: cannot resolve {self.host!r}: {exc.strerror}") from None
        server_class = type("_BoundServer", (_Server,), {"address_family": family})
        try:
            server = server_class((self.host, self.port), _Handler, endpoint=self)
        except OSError as exc:
            raise EndpointError(f"endpoint: cannot listen on {self.config.address}: {exc.strerror or exc}") from None
        self._server = server
        self.port = server.server_address[1]
        server.serve_in_background()
        guard = "mTLS" if self.tls and self.tls.verify_mode == ssl.CERT_REQUIRED else "token" if self._token else "none"
        log.info("inference endpoint on %s auth=%s", self.url, guard)
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()

    def __enter__(self) -> InferenceEndpoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def authorized(self, header: str | None, path: str) -> None:
        """RequestError(401) unless the request carries the token; the probes' health routes are open."""
        if self._token is None or path in ("/v2/health/live", "/v2/health/ready"):
            return
        scheme, _, given = (header or "").partition(" ")
        # compare_digest: the time taken must not tell how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token):
            raise RequestError(401, "missing or wrong bearer token (send Authorization: Bearer <token>)")


_BUSY = b'{"error": "too many connections to the endpoint; retry later"}'


class _Server(BoundedHTTPServer):
    request_queue_size = 64
    name = "endpoint"
    thread = "endpoint"
    busy = (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
        + f"Content-Length: {len(_BUSY)}\r\n\r\n".encode()
        + _BUSY
    )

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *, endpoint: InferenceEndpoint
    ) -> None:
        self.endpoint = endpoint
        super().__init__(address, handler, endpoint.config.max_clients)

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = super().get_request()
        context = self.endpoint.tls
        if context is not None:
            # The handshake happens on the handler's thread (first read), never on the accept loop.
            sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr


class _Handler(DeadlineHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive: a client's next request skips the TCP handshake
    disable_nagle_algorithm = True  # a small answer goes out now, not after the client's delayed ACK
    timeout = IDLE_TIMEOUT_S
    # The wait for the next request and its line and headers, in all: a timeout per read let max_clients
    # clients sending a byte now and then keep every thread, and the endpoint answer 503.
    request_timeout = IDLE_TIMEOUT_S
    server_version = "edge-agent"
    # http.server's own refusals (a malformed request line, headers too long) in the endpoint's JSON form.
    error_content_type = JSON
    error_message_format = '{"error": "malformed HTTP request (%(code)d)"}'

    def do_GET(self) -> None:  # http.server's naming
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        started = time.monotonic()
        endpoint = self.server.endpoint
        path = unquote(urlsplit(self.path).path)
        headers: dict[str, str] = {}
        try:
            endpoint.authorized(self.headers.get("Authorization"), path)
            body = self._body(method, started + endpoint.config.deadline)
            code, data, header_length = endpoint.routes.answer(
                method, path, body, self.headers.get("Inference-Header-Content-Length"), started
            )
        except RequestError as exc:
            log.debug("endpoint: %s %s refused status=%d reason=%s", method, path[:128], exc.status, exc)
            code, data, header_length = exc.status, json.dumps({"error": str(exc)}).encode(), None
            if exc.status in (408, 411, 413, 401):
                self.close_connection = True  # the rest of its body (if any) is never read
        except Exception as exc:  # one failed request must not reach the daemon
            log.debug("endpoint: %s failed", path[:128], exc_info=True)
            code, data, header_length = 500, json.dumps({"error": f"{exc.__class__.__name__}: {exc}"}).encode(), None
        if header_length is not None:
            headers["Inference-Header-Content-Length"] = str(header_length)
        self._send(code, data, headers, binary=header_length is not None)

    def _body(self, method: str, deadline: float) -> bytes:
        if method != "POST":
            return b""
        if self.headers.get("Transfer-Encoding"):
            raise RequestError(411, "send the body with a Content-Length (chunked transfer is not accepted)")
        length_text = self.headers.get("Content-Length")
        if length_text is None or not length_text.isdigit():
            raise RequestError(411, "a POST needs a Content-Length header")
        length = int(length_text)
        limit = self.server.endpoint.config.max_body
        if length > limit:
            raise RequestError(
                413, f"the body of {length} bytes is over the endpoint's limit of {limit} (endpoint.max_body)"
            )
        chunks: list[bytes] = []
        remaining = length
        self.reader.deadline = deadline
        try:
            while remaining:
                try:
                    chunk = self.rfile.read1(min(remaining, 1 << 20))
                except TimeoutError:
                    raise RequestError(408, "the request body did not arrive within the endpoint's deadline") from None
                if not chunk:
                    raise RequestError(400, f"the body ended after {length - remaining} of {length} bytes")
                chunks.append(chunk)
                remaining -= len(chunk)
        finally:
            self.connection.settimeout(IDLE_TIMEOUT_S)
        return b"".join(chunks)

    def _send(self, code: int, data: bytes, headers: dict[str, str], binary: bool) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/octet-stream" if binary else JSON)
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            log.debug("endpoint: client went away before its answer")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        log.debug("endpoint: %s %s", self.address_string(), format % args)


__all__ = ["Answer", "EndpointError", "InferenceEndpoint"]
