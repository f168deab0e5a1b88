"""A threading HTTP server with a bound on connections: the next one past it is answered `busy` at once
and closed, so a flood of clients costs refusals, never a thread each (the status page, the endpoint)."""

from __future__ import annotations

import functools
import io
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from agent.util.worker import Worker

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

log = logging.getLogger(__name__)

STOP_POLL_S = 0.2  # how soon `close` returns; the idle wake-ups this costs are negligible

BUSY = b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class BoundedHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    busy = BUSY  # the whole answer to a connection past the bound
    name = "http server"  # for the log line of a failed connection
    thread = "http"  # the name of the thread that accepts connections

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], max_clients: int) -> None:
        self._slots = threading.BoundedSemaphore(max_clients)
        self._worker: Worker | None = None
        super().__init__(address, handler)

    def serve_in_background(self) -> None:
        """Accept connections on a thread of its own until `close`."""
        self._worker = Worker(
            self.thread, functools.partial(self.serve_forever, poll_interval=STOP_POLL_S), wake=self.shutdown
        )
        self._worker.start()

    def close(self) -> None:
        """Stop accepting, then close the listening socket."""
        if self._worker is not None:
            self._worker.stop()
        self.server_close()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(self.busy)
            except (OSError, ValueError):
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("%s: connection from %s failed", self.name, client_address, exc_info=True)


class DeadlineReader(io.RawIOBase):
    """A connection's reads, each waiting at most until `deadline` (monotonic; a handler moves it per
    request): a per-read timeout alone lets a client that sends a byte now and then keep its thread for
    ever, and as many such clients as the bound turn every other request away."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self.sock = sock
        self.deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


class DeadlineHandler(BaseHTTPRequestHandler):
    """A handler whose every request, the wait for it included, must arrive whole (line and headers)
    within `request_timeout`; its answer's writes wait `timeout` each. A handler may move `reader.deadline`
    to bound what it reads next (a body)."""

    request_timeout = 10.0

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # http.server's reader, replaced by one with a deadline
        self.reader = DeadlineReader(self.connection, time.monotonic() + self.request_timeout)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self) -> None:
        self.reader.deadline = time.monotonic() + self.request_timeout
        super().handle_one_request()

    def parse_request(self) -> bool:
        parsed = super().parse_request()
        self.connection.settimeout(self.timeout)  # the answer waits per write, not on what the request left
        return parsed
