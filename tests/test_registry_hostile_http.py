"""A registry (or the CDN in front of it) that answers HTTP in ways that broke devices: redirects with
huge or trickling bodies, redirects nowhere, an ETag requests will not send back, gzip the device did not
need, and two threads polling the same registry at once.

Each fault is served by a real loopback server (tests.helpers.registry's, with the hooks below). Before
the fixes a 3xx body was read whole by requests (memory and time outside every bound), a malformed
Location raised a ValueError that ended `edge-agent run`, one hostile ETag made every later fetch of its
document fail, a gzipping CDN got a correct model refused as truncated, and concurrent refreshes raced on
the cache's temp file and on the root chain.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from agent.cloud.roots import Change
from agent.models.fetch import MAX_HEAD_BYTES, MAX_REDIRECTS, MIN_RATE, Fetcher, FetchError
from agent.models.trust import LATEST
from tests.helpers.daemon_proc import REPO, sensor_csv
from tests.helpers.registry import FaultyHandler, FaultyServer, Registry, make_registry
from tests.test_e2e_daemon import linear

TIMEOUT_S = 2.0  # registry.timeout: the header deadline is TIMEOUT_S + MAX_HEAD_BYTES / MIN_RATE
HEAD_DEADLINE = TIMEOUT_S + MAX_HEAD_BYTES / MIN_RATE
HUGE = 200 * 2**20  # a redirect's body: what requests used to read into memory
MiB = 2**20

Hook = Callable[["HostileHandler"], None]


class HostileServer(FaultyServer):
    """The tests' registry server plus `hooks` (request target, query included -> what to answer instead)
    and `etag_for` (the ETag to send for a file, None for the server's own)."""

    def __init__(self, root: Path) -> None:
        self.hooks: dict[str, Hook] = {}
        self.etag_for: Callable[[Path], str | None] = lambda path: None
        super().__init__(root)
        self.RequestHandlerClass = HostileHandler


class HostileHandler(FaultyHandler):
    server: HostileServer
    disable_nagle_algorithm = True  # the body's small write never waits for the ACK of the headers' (40 ms)

    def _serve(self, body: bool) -> None:
        hook = self.server.hooks.get(self.path)
        if hook is None:
            super()._serve(body)
            return
        self.server.record(self)
        self.close_connection = True
        try:
            hook(self)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the device closed the connection: what it should do with a 3xx body

    def etag(self, path: Path, stat: os.stat_result) -> str:
        return self.server.etag_for(path) or super().etag(path, stat)


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[Registry]:
    """A registry with m 1.0.0 on stable, served by a HostileServer."""
    registry = make_registry(tmp_path / "reg")
    registry.publish("m", "1.0.0", linear(tmp_path, "v1", 1.0), channel="stable")
    registry.server.stop()
    registry.server = HostileServer(registry.root)
    registry.server.start()
    yield registry
    registry.server.stop()


def server(registry: Registry) -> HostileServer:
    assert isinstance(registry.server, HostileServer)
    return registry.server


def redirect(location: str, body: Iterator[bytes] | None = None, length: int = 0) -> Hook:
    """A 302 to `location` whose body of `length` bytes is written as `body` yields it (never all in memory)."""

    def answer(h: HostileHandler) -> None:
        h.send_response(302)
        h.send_header("Location", location)
        h.send_header("Content-Length", str(length))
        h.end_headers()
        for chunk in body or ():
            h.wfile.write(chunk)
            h.wfile.flush()

    return answer


def zeros(total: int) -> Iterator[bytes]:
    block = bytes(MiB)
    for _ in range(total // MiB):
        yield block


def trickle(n: int, every: float) -> Iterator[bytes]:
    for _ in range(n):
        time.sleep(every)
        yield b"x"


class PeakRSS:
    """The highest resident size of this process while in the block, sampled every 5 ms, less the size at
    its start (ru_maxrss would carry an earlier test's peak)."""

    def __enter__(self) -> PeakRSS:
        self.proc = psutil.Process()
        self.start = self.peak = self.proc.memory_info().rss
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()

    @property
    def grown(self) -> int:
        return self.peak - self.start


def blob_target(registry: Registry) -> str:
    return "/" + str(registry.blob_path("m", "1.0.0").relative_to(registry.root))


# ---- redirects ---------------------------------------------------------------------------------------


def test_a_redirect_with_a_huge_body_is_followed_without_reading_it(tmp_path: Path, hostile: Registry) -> None:
    """The blob's GET is answered 302 to a signed URL with a 200 MiB body: the device follows it at once."""
    target = blob_target(hostile)
    server(hostile).hooks[target] = redirect(target + "?signed=1", zeros(HUGE), HUGE)
    client = hostile.client(tmp_path / "state", timeout=TIMEOUT_S, retries=0)
    with PeakRSS() as rss:
        started = time.monotonic()
        result = client.check_and_pull("m", "stable")
        took = time.monotonic() - started
    assert result.status == "activated", result
    assert rss.grown < 50 * MiB, f"RSS grew by {rss.grown / MiB:.0f} MiB"
    assert took < HEAD_DEADLINE + 1.0, took
    served = [r["path"] for r in hostile.blob_requests() if r["path"] == target]
    assert served == [target, target], served  # the redirect, then the signed URL


def test_a_trickling_redirect_body_does_not_delay_the_fetch(tmp_path: Path, hostile: Registry) -> None:
    """A 302 whose body trickles one byte every half second for 12 s: never waited for."""
    server(hostile).hooks["/keys/root.json"] = redirect("/keys/1.root.json", trickle(24, 0.5), 24)
    fetcher = Fetcher(hostile.url, tmp_path / "cache", timeout=TIMEOUT_S, retries=0, backoff=0.01, sleep=time.sleep)
    started = time.monotonic()
    got = fetcher.document(LATEST)
    took = time.monotonic() - started
    assert got == (hostile.root / "keys/1.root.json").read_bytes()
    assert took < HEAD_DEADLINE + 1.0, took


@pytest.mark.parametrize(
    ("location", "reason"),
    [
        ("http://[::1/keys/root.json", r"cannot request 'http://\[::1/keys/root\.json' \(Invalid IPv6 URL\)"),
        ("file:///etc/passwd", r"cannot request 'file:///etc/passwd' \(No connection adapters were found for .*\)"),
        ("/keys/root.json", rf"more than {MAX_REDIRECTS} redirects"),  # a loop
    ],
)
def test_a_redirect_nowhere_ends_as_a_fetch_error(
    tmp_path: Path, hostile: Registry, location: str, reason: str
) -> None:
    server(hostile).hooks["/keys/root.json"] = redirect(location)
    fetcher = Fetcher(hostile.url, tmp_path / "cache", timeout=TIMEOUT_S, retries=1, backoff=0.01, sleep=time.sleep)
    with pytest.raises(FetchError, match=rf"^GET {hostile.url}keys/root\.json: keys/root\.json: {reason}$"):
        fetcher.document(LATEST)
    asked = [r for r in hostile.server.requests if r["path"] == "/keys/root.json"]
    assert len(asked) <= 2 * (MAX_REDIRECTS + 1), len(asked)  # two tries, each of at most MAX_REDIRECTS hops


def test_a_redirect_error_masks_the_credentials_of_the_url(tmp_path: Path, hostile: Registry) -> None:
    server(hostile).hooks["/keys/root.json"] = redirect("http://user:s3cret@[::1/keys/root.json")
    url = hostile.url.replace("http://", "http://reader:hunter22@")
    fetcher = Fetcher(url, tmp_path / "cache", timeout=TIMEOUT_S, retries=0, backoff=0.01, sleep=time.sleep)
    with pytest.raises(FetchError) as caught:
        fetcher.document(LATEST)
    message = str(caught.value)
    assert "hunter22" not in message and "s3cret" not in message, message
    assert "http://***@127.0.0.1" in message and "cannot request 'http://***@[::1" in message, message


@pytest.mark.slow
def test_edge_agent_run_keeps_serving_a_local_model_while_the_registry_redirects_badly(
    tmp_path: Path, hostile: Registry
) -> None:
    """Pipeline `local` runs a model file, `reg` a registry model the registry cannot deliver: before the fix
    the malformed Location's ValueError ended `edge-agent run` before `local` produced anything."""
    server(hostile).hooks["/keys/root.json"] = redirect("http://[::1/keys/root.json")
    csv = sensor_csv(tmp_path / "s.csv", rows=30)
    source = {"type": "csv", "path": str(csv), "rate": 100}
    profile = {
        "device": {"id": "hostile-1", "state_dir": str(tmp_path / "state")},
        "registry": {
            "url": hostile.url,
            "public_key": str(hostile.public_key),
            "poll_interval": "1h",
            "timeout": f"{TIMEOUT_S:.0f}s",
        },
        "pipelines": [
            {"name": "local", "model": str(linear(tmp_path, "lin", 2.0)), "source": source},
            {"name": "reg", "model": "m", "source": source},
        ],
    }
    (tmp_path / "profile.json").write_text(json.dumps(profile))
    run = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--profile", str(tmp_path / "profile.json")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert run.returncode == 0, run.stderr[-3000:]
    assert len([r for r in rows if r.get("pipeline") == "local"]) == 30, run.stdout[-2000:]
    assert "Invalid IPv6 URL" in run.stderr and "Traceback" not in run.stderr, run.stderr[-3000:]


# ---- ETags, encodings --------------------------------------------------------------------------------


def test_a_hostile_etag_is_not_cached_and_the_next_poll_succeeds(tmp_path: Path, hostile: Registry) -> None:
    """U+00A0 is a valid latin-1 header byte, and a leading one requests refuses to send (If-None-Match)."""
    bad = {"on": True}
    server(hostile).etag_for = lambda path: "\xa0x" if bad["on"] and path.name == "root.json" else None
    first = hostile.client(tmp_path / "state").check_and_pull("m", "stable")
    assert first.status == "activated", first
    bad["on"] = False  # the registry is fixed
    asked = len(hostile.server.requests)
    again = hostile.client(tmp_path / "state").check_and_pull("m", "stable")  # a fresh client: after a restart
    assert again.status == "current", again
    assert any(r["path"] == "/" + LATEST for r in hostile.server.requests[asked:])


def test_a_hostile_etag_cached_by_an_earlier_release_is_dropped(tmp_path: Path, hostile: Registry) -> None:
    fetcher = Fetcher(hostile.url, tmp_path / "cache", timeout=TIMEOUT_S, retries=0, backoff=0.01, sleep=time.sleep)
    fetcher.document(LATEST)
    (entry,) = (tmp_path / "cache").iterdir()
    entry.write_bytes("\xa0x".encode() + b"\nstale body")  # what the earlier release wrote
    assert fetcher.document(LATEST) == (hostile.root / LATEST).read_bytes()
    assert entry.read_bytes().split(b"\n", 1)[0] != "\xa0x".encode()


@pytest.mark.parametrize("honours_accept_encoding", [True, False])
def test_a_gzipping_server_still_delivers_a_correct_model(
    tmp_path: Path, hostile: Registry, honours_accept_encoding: bool
) -> None:
    """A CDN that gzips the blob (when asked, or always): Content-Length is then the compressed size."""
    target = blob_target(hostile)
    raw = (hostile.root / target.lstrip("/")).read_bytes()
    asked: list[str | None] = []

    def answer(h: HostileHandler) -> None:
        asked.append(h.headers.get("Accept-Encoding"))
        encode = not honours_accept_encoding or "gzip" in (asked[-1] or "")
        data = gzip.compress(raw) if encode else raw
        h.send_response(200)
        if encode:
            h.send_header("Content-Encoding", "gzip")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    server(hostile).hooks[target] = answer
    result = hostile.client(tmp_path / "state", retries=0).check_and_pull("m", "stable")
    assert result.status == "activated", result
    assert asked == ["identity"], asked


# ---- two threads, one registry -----------------------------------------------------------------------


def concurrently(*calls: Callable[[], object], times: int = 1) -> list[BaseException]:
    """Each call `times` over in its own thread, all started together; what escaped them."""
    start = threading.Barrier(len(calls))
    escaped: list[BaseException] = []

    def repeat(call: Callable[[], object]) -> None:
        start.wait()
        for _ in range(times):
            try:
                call()
            except Exception as exc:  # noqa: BLE001 (whatever escapes is the finding)
                escaped.append(exc)

    threads = [threading.Thread(target=repeat, args=(call,)) for call in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return escaped


def test_two_threads_refreshing_trust_raise_nothing(tmp_path: Path, hostile: Registry) -> None:
    """The updater (refresh_trust) and the order inbox (order_keys) at once, against a registry whose every
    answer has a new ETag, so that each one is written to the cache."""
    counter = itertools.count()
    server(hostile).etag_for = lambda path: f'"{next(counter)}"'
    client = hostile.client(tmp_path / "state", retries=0)
    escaped = concurrently(client.order_keys, client.refresh_trust, times=300)
    assert escaped == [], escaped[:3]
    assert not [p for p in (tmp_path / "state" / "registry-cache").iterdir() if p.name.endswith(".tmp")]


def test_two_threads_walking_the_root_chain_at_once_trust_its_newest_version(tmp_path: Path, hostile: Registry) -> None:
    """Both threads start from the same trusted root while the registry has moved on by several versions:
    neither may find the other's step already taken and call the chain broken."""
    client = hostile.client(tmp_path / "state", retries=0)
    client.refresh_trust()
    for _ in range(10):
        for _ in range(4):
            hostile.next_root(Change())
        escaped = concurrently(client.refresh_trust, client.refresh_trust)
        assert escaped == [], escaped
    assert client.trust.version == json.loads((hostile.root / LATEST).read_bytes())["version"] == 41
