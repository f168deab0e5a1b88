"""The registry's HTTP side: retried GETs, small documents through a conditional-GET cache, blobs into
resumable partial files.

Every read is bounded before it is trusted: a document stops at MAX_DOC_BYTES, a blob at its signed size
(endless data), and a finished blob must match its signed digest. What goes wrong is one of two things,
and the caller acts on which: `FetchError`, the registry could not be reached or answered unusably, worth
retrying later; `RefusalError`, this version must not be used here, whatever a retry would say.

A server that asks to come back later (429 from a CDN's rate limit, 503) is retried after the wait its
`Retry-After` names (seconds or an HTTP date), within the request's DEADLINE: a wait past it ends the
request as a `FetchError` (the next poll tries again), never as a refusal of the model.

A server can also answer too slowly to be any use, and `timeout` bounds each read only: a body has an
overall deadline from the bytes expected at `min_rate` (`_body`), and so have the connect (TLS included),
status line and headers (`_get`; a watchdog armed by `_WatchedConnection` shuts the socket down at it). A
fetch behind one ends as a `StalledError` (a FetchError: the next poll resumes). Redirects are followed by
`_get`, never by requests, which reads every 3xx body whole, outside all these bounds.
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import os
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import requests
import requests.adapters
import urllib3.connection
import urllib3.connectionpool
import urllib3.exceptions
import urllib3.poolmanager
import urllib3.response

from agent.models.manifest import MAX_DOC_BYTES, Blob, file_digest
from agent.util import backoff, files, redact
from agent.util.hashing import sha256_bytes

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
RETRY_CAP = 30.0  # seconds: the longest backoff between two tries of one request
# Seconds one request may take, tries and waits together: a Retry-After that reaches past it ends the
# request now rather than holding the updater (or the daemon's start) for as long as a server asks.
DEADLINE = 300.0
# Bytes per second below which a fetch is stalled rather than slow: 64 kbit/s, the slowest mobile links
# still in use. A blob of the signed size S may take `timeout + S / MIN_RATE` seconds in all.
MIN_RATE = 8 * 1024
# The status line and headers of any registry, CDN or object store answer (about 1 KB) with room to spare:
# at the minimum rate they may take `timeout + MAX_HEAD_BYTES / min_rate` seconds (2 s more than timeout).
MAX_HEAD_BYTES = 16 * 1024
RETRY_LATER = (429, 503)  # "come back later": answers a CDN or a busy server gives, with a Retry-After
MAX_REDIRECTS = 5  # hops one request follows: a CDN or an object store's signed URL needs one or two
# The conditional-GET cache, least recently used evicted: the polled documents of hundreds of models and a
# few of the largest manifests (a stolen key moving a channel at every poll once added 1 MiB each time).
MAX_CACHE_BYTES = 16 << 20
# An ETag as RFC 9110 writes it, at most 256 bytes: requests may refuse to send back any other (If-None-Match).
ETAG = re.compile(r'(W/)?"[\x21\x23-\x7e\x80-\xff]{0,252}"')
Progress = Callable[[int, int], None]
T = TypeVar("T")


class RefusalError(Exception):
    """This version must not be used here; the message is the reason published in the event.

    `hold`: the version was downloaded and tried here (its test vectors failed, it did not load): the
    store holds it, so that no poll downloads it again until an operator overrides the hold."""

    def __init__(self, message: str, *, hold: bool = False) -> None:
        super().__init__(message)
        self.hold = hold


class MissingError(RefusalError):
    """The registry has no such file (404)."""


class FetchError(Exception):
    """The registry could not be reached or did not answer usefully (worth retrying later)."""


class StalledError(FetchError):
    """A body arrived slower than the minimum rate and missed its overall deadline."""


class RetryLaterError(FetchError):
    """The server asked to come back later; `after` is its Retry-After in seconds, None when it named none."""

    def __init__(self, message: str, after: float | None) -> None:
        super().__init__(message)
        self.after = after

    @classmethod
    def of(cls, response: requests.Response) -> RetryLaterError:
        after = retry_after(response.headers.get("Retry-After"), time.time())
        asked = f", Retry-After {after:.0f} s" if after is not None else ""
        return cls(f"HTTP {response.status_code}{asked}", after)


def retry_after(header: str | None, now: float) -> float | None:
    """A Retry-After header as seconds from `now` (RFC 9110, 10.2.3: delay-seconds or an HTTP date); None
    when absent or unreadable, 0 for a date already past."""
    if header is None or not header.strip():
        return None
    text = header.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP date is always GMT; one without a zone is not one
        return None
    return max(0.0, when.timestamp() - now)


class Fetcher:
    """HTTP to one registry base URL; `cache_dir` keeps the last body and ETag of each document."""

    def __init__(
        self,
        url: str,
        cache_dir: Path,
        *,
        timeout: float,
        retries: int,
        backoff: float,
        sleep: Callable[[float], None],
        deadline: float = DEADLINE,
        min_rate: float = MIN_RATE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url if url.endswith("/") else url + "/"
        self.cache_dir = cache_dir
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.sleep = sleep
        self.deadline = deadline
        self.min_rate = min_rate
        self.clock = clock
        self.http = _Session()
        # identity: the signed bytes as they are (a CDN's gzip would make Content-Length the encoded size).
        self.http.headers.update({"User-Agent": "edge-agent", "Accept-Encoding": "identity"})
        for prefix in ("http://", "https://"):
            self.http.mount(prefix, _WatchedAdapter())

    def _retrying(self, what: str, call: Callable[[], T]) -> T:
        ends, what = self.clock() + self.deadline, redact.text(what)
        for attempt in range(self.retries + 1):
            try:
                return call()
            except (requests.RequestException, FetchError) as exc:
                if attempt == self.retries:
                    raise FetchError(redact.text(f"{what}: {exc}")) from None
                asked = exc.after if isinstance(exc, RetryLaterError) else None
                delay = asked if asked is not None else backoff.delay(attempt, self.backoff, RETRY_CAP)
                if self.clock() + delay > ends:
                    raise FetchError(
                        f"{what}: {exc}; waiting {delay:.0f} s would pass this request's {self.deadline:.0f} s deadline"
                    ) from None
                log.info("%s failed (%s); retrying in %.1fs", what, exc, delay)
                self.sleep(delay)
        raise AssertionError("unreachable")

    def document(self, path: str) -> bytes:
        """A small registry file, through a conditional GET against the local cache."""
        url = self.url + path
        cache = self.cache_dir / sha256_bytes(url.encode())[:32]

        def get() -> bytes:
            headers, cached = {}, None
            with contextlib.suppress(FileNotFoundError):
                # One file, "ETAG\nBODY", replaced by rename: a crash never pairs an ETag with another body.
                sent, _, cached = cache.read_bytes().partition(b"\n")
                headers["If-None-Match"] = sent.decode("latin-1")
            if cached is not None and not ETAG.fullmatch(headers["If-None-Match"]):  # requests may refuse to send it
                headers, cached = {}, None
                cache.unlink(missing_ok=True)
            r, started = self._get(url, headers, path, None)
            with r:
                if r.status_code == 304 and cached is not None:
                    with contextlib.suppress(OSError):
                        os.utime(cache)  # used now: evicted last
                    return cached
                if r.status_code == 404:
                    raise MissingError(f"{path} is not on the registry (404)")
                if r.status_code in RETRY_LATER:
                    raise RetryLaterError.of(r)
                if r.status_code >= 500:
                    raise FetchError(f"HTTP {r.status_code}")
                if r.status_code != 200:
                    raise RefusalError(f"{path}: the registry answered HTTP {r.status_code}")
                body = bytearray()
                expected = min(_int(r.headers.get("Content-Length")) or MAX_DOC_BYTES, MAX_DOC_BYTES)
                try:
                    for chunk in self._body(r, path, started, expected):
                        body += chunk
                        if len(body) > MAX_DOC_BYTES:
                            raise RefusalError(f"{path} is larger than {MAX_DOC_BYTES} bytes; refused unread")
                except requests.exceptions.ChunkedEncodingError as exc:
                    # Fewer bytes than the Content-Length promised: never parsed, never cached.
                    raise FetchError(f"{path}: truncated after {len(body)} bytes ({exc.__class__.__name__})") from None
                etag = r.headers.get("ETag")
            data = bytes(body)
            if etag is not None and ETAG.fullmatch(etag):
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                files.write_atomic(cache, etag.encode("latin-1") + b"\n" + data)
                self._evict()
            return data

        return self._retrying(f"GET {url}", get)

    def _evict(self) -> None:
        """Least recently used first, cached documents go until the rest fit MAX_CACHE_BYTES (a write's
        temporary file, named with a dot, stays); a race with another thread's eviction leaves it to the next."""
        with contextlib.suppress(FileNotFoundError):
            found = [(p.stat(), p) for p in self.cache_dir.iterdir() if p.name[0] != "."]
            total = sum(st.st_size for st, _ in found)
            for st, path in sorted(found, key=lambda f: f[0].st_mtime_ns):
                if total <= MAX_CACHE_BYTES:
                    return
                path.unlink()
                total -= st.st_size

    def download(self, blob: Blob, part: Path, what: str, progress: Progress | None = None) -> Path:
        """The blob in `part`, complete and digest-checked, resuming what an earlier try left (under Store.partials)."""
        url = self.url + f"blobs/sha256/{blob.hex}"
        resumed = part.exists()
        while True:
            self._retrying(f"GET {url}", lambda: self._fetch_into(part, blob, url, what, progress))
            if file_digest(part) == blob.digest:
                return part
            part.unlink()
            if resumed:
                # A partial left by an earlier process may hold bytes a power cut never flushed: one clean try.
                resumed = False
                continue
            raise RefusalError(f"{what} does not match its signed digest {blob.digest}")

    def _fetch_into(self, part: Path, blob: Blob, url: str, what: str, progress: Progress | None) -> None:
        have = part.stat().st_size if part.exists() else 0
        if have > blob.size:
            part.unlink()
            have = 0
        if have == blob.size:
            return
        headers = {"Range": f"bytes={have}-"} if have else {}
        expected = blob.size - have
        r, started = self._get(url, headers, what, expected)
        with r:
            if r.status_code == 404:
                raise RefusalError(f"{what} is not on the registry (404)")
            if r.status_code == 416:
                part.unlink(missing_ok=True)
                raise RefusalError(
                    f"{what} is truncated on the registry: it holds fewer than {have + 1} bytes, the manifest says {blob.size}"
                )
            if r.status_code in RETRY_LATER:
                raise RetryLaterError.of(r)
            if r.status_code >= 500:
                raise FetchError(f"HTTP {r.status_code}")
            if r.status_code == 206 and have:
                start, total = _content_range(r.headers.get("Content-Range", ""))
                if start != have:
                    raise FetchError(f"asked for bytes from {have}, got a range from {start}")
                mode = "ab"
            elif r.status_code == 200:
                have, total, mode = 0, _int(r.headers.get("Content-Length")), "wb"
            else:
                raise RefusalError(f"{what}: the registry answered HTTP {r.status_code}")
            # Encoded (asked for or not), the length is not the signed bytes': those are checked as they come.
            if total is not None and total != blob.size and r.headers.get("Content-Encoding", "identity") == "identity":
                part.unlink(missing_ok=True)
                raise RefusalError(
                    f"{what} is {total} bytes on the registry; the signed size is {blob.size}"
                    if total > blob.size
                    else f"{what} is truncated on the registry: {total} bytes, the signed size is {blob.size}"
                )
            with open(part, mode) as f:
                try:
                    for chunk in self._body(r, what, started, expected):
                        if have + len(chunk) > blob.size:
                            # Endless data: stop at the signed size and never store the excess.
                            f.close()
                            part.unlink(missing_ok=True)
                            raise RefusalError(
                                f"{what} is larger than its signed size {blob.size}; stopped reading there"
                            )
                        f.write(chunk)
                        have += len(chunk)
                        if progress:
                            progress(have, blob.size)
                except requests.exceptions.ChunkedEncodingError as exc:
                    raise FetchError(
                        f"connection broken at {have} of {blob.size} bytes ({exc.__class__.__name__})"
                    ) from None
                finally:
                    if not f.closed:
                        f.flush()
                        os.fsync(f.fileno())
        if have < blob.size:
            raise FetchError(f"connection ended at {have} of {blob.size} bytes")

    def _get(self, url: str, headers: dict[str, str], what: str, size: int | None) -> tuple[requests.Response, float]:
        """A streamed GET, and when its last hop began (the body's deadline runs from there). Up to MAX_REDIRECTS
        redirects, each closed unread; each hop's headers are due by the header deadline (or the body's, for
        `size` bytes) from the hop's start, and all of them by twice that from the first, else StalledError."""
        limit = self.timeout + (MAX_HEAD_BYTES if size is None else min(size, MAX_HEAD_BYTES)) / self.min_rate
        started, location = self.clock(), url
        for _ in range(MAX_REDIRECTS + 1):
            hop = self.clock()
            _watch.current = _HeadWatch(what, min(hop, started + limit) + limit, limit, self.min_rate, self.clock)
            try:
                r = self.http.get(url, headers=headers, timeout=self.timeout, stream=True, allow_redirects=False)
                if not r.is_redirect:
                    return r, hop
                r.close()  # unread: a 3xx body is of no use, and may be endless
                url = urllib.parse.urljoin(url, location := r.headers["Location"])
            except ValueError as exc:  # an unusable URL (or scheme: requests has http and https only)
                raise FetchError(redact.text(f"{what}: cannot request {location!r} ({exc})")) from None
            finally:
                _watch.current = None
        raise FetchError(f"{what}: more than {MAX_REDIRECTS} redirects")

    def _body(self, r: requests.Response, what: str, started: float, expected: int) -> Iterator[bytes]:
        """The body as it arrives (read1: whatever one read brings, so that a trickle is seen trickling);
        StalledError once it falls behind `timeout + expected / min_rate` from `started`. The errors of
        urllib3 become the ones requests' own iter_content raises, which the callers handle."""
        ends = started + self.timeout + expected / self.min_rate
        got = 0
        while True:
            try:
                chunk = r.raw.read1(CHUNK, decode_content=True)
            except urllib3.exceptions.ReadTimeoutError as exc:
                raise requests.Timeout(str(exc)) from None
            except (urllib3.exceptions.ProtocolError, urllib3.exceptions.DecodeError) as exc:
                raise requests.exceptions.ChunkedEncodingError(str(exc)) from None
            if not chunk:
                return
            got += len(chunk)
            yield chunk
            if self.clock() > ends:
                raise StalledError(
                    f"{what}: stalled: {got} of {expected} bytes in {self.clock() - started:.0f} s, slower than "
                    f"the minimum rate of {self.min_rate:.0f} bytes/s (deadline {ends - started:.0f} s)"
                )


class _Session(requests.Session):
    """Never follows a redirect, nor reads a 3xx body (requests does, even with allow_redirects=False)."""

    def get_redirect_target(self, resp: requests.Response) -> str | None:
        return None


class _HeadWatch:
    """The deadline for one request's connect, status line and headers, read by `_WatchedConnection` in the
    requesting thread (requests offers no per-request hook below the adapter)."""

    def __init__(self, what: str, ends: float, limit: float, rate: float, clock: Callable[[], float]) -> None:
        self.what, self.ends, self.limit, self.rate, self.clock = what, ends, limit, rate, clock

    def stalled(self) -> StalledError:
        return StalledError(
            f"{self.what}: stalled: status line and headers not complete after {self.limit:.0f} s, slower than "
            f"the minimum rate of {self.rate:.0f} bytes/s"
        )


class _Local(threading.local):
    current: _HeadWatch | None = None


_watch = _Local()


class _Shutter:
    """A watchdog for one phase of a connection (connect, then the wait for the headers): shuts the
    connection's socket down at the deadline unless the phase ended first. The lock makes "phase over" and
    "shut down" exclusive, so a socket is never shut once handed on. The socket is looked up when it
    fires: urllib3 sets `sock` before the TLS handshake, which is then cut short too (before the TCP
    connect has a socket, the connect timeout bounds it and the phase ends as stalled when it returns)."""

    def __init__(self, conn: urllib3.connection.HTTPConnection) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.fired = False
        self.done = False

    def fire(self) -> None:
        with self.lock:
            if self.done:
                return
            self.fired = True
            sock = self.conn.sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    # The plain socket's shutdown, also for an SSLSocket (whose own would drop its TLS state
                    # under the reading thread): a blocked recv then returns at once.
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def finish(self) -> bool:
        """Whether the watchdog fired; after this it never will."""
        with self.lock:
            self.done = True
            return self.fired


class _WatchedConnection(urllib3.connection.HTTPConnection):
    """urllib3's connection, its connect and header phases bounded by the requesting thread's `_HeadWatch`."""

    def connect(self) -> None:
        self._guarded(super().connect, lambda _: self.close())

    def getresponse(self) -> urllib3.response.HTTPResponse:  # type: ignore[override] # as urllib3's own
        # Headers cut short read as complete ones (http.client ends them at EOF): such a response is closed.
        return self._guarded(super().getresponse, lambda response: response.close())

    def _guarded(self, phase: Callable[[], T], discard: Callable[[T], None]) -> T:
        """`phase` under the thread's deadline: StalledError once the watchdog fired, even when the phase then
        returned (what it returned, cut short by the shutdown, is discarded, never used)."""
        watch = _watch.current
        if watch is None:
            return phase()
        shutter = _Shutter(self)
        timer = threading.Timer(max(0.0, watch.ends - watch.clock()), shutter.fire)
        timer.daemon = True
        timer.start()
        try:
            result = phase()
        except Exception:
            if shutter.finish():
                raise watch.stalled() from None
            raise
        finally:
            timer.cancel()
        if shutter.finish():
            discard(result)
            raise watch.stalled()
        return result


class _WatchedHTTPSConnection(_WatchedConnection, urllib3.connection.HTTPSConnection):
    """The TLS connection with the same watchdog; the watched class first, so that its connect (which
    wraps urllib3's TLS connect, handshake included) is the one called."""


class _WatchedPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _WatchedConnection


class _WatchedHTTPSPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_WATCHED_POOLS: dict[str, type[urllib3.connectionpool.HTTPConnectionPool]] = {
    "http": _WatchedPool,
    "https": _WatchedHTTPSPool,
}


class _WatchedAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter with pools of watched connections (direct and through an HTTP(S) proxy; a SOCKS
    proxy keeps its own pools and only the per-read timeout)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _WATCHED_POOLS

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> urllib3.poolmanager.PoolManager:
        manager: urllib3.poolmanager.PoolManager = super().proxy_manager_for(proxy, **kwargs)
        if type(manager) is urllib3.poolmanager.ProxyManager:
            manager.pool_classes_by_scheme = _WATCHED_POOLS
        return manager


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _content_range(header: str) -> tuple[int | None, int | None]:
    # "bytes START-END/TOTAL"
    try:
        unit, rest = header.split(" ", 1)
        span, total = rest.split("/", 1)
        return int(span.split("-", 1)[0]), (None if total == "*" else int(total))
    except ValueError:
        return None, None
