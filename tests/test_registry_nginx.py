"""The registry hosted the way docs/registry.md tells users to host it: a folder behind nginx.

Devices have pulled from the project's own development server everywhere else; here the same client
pulls from a real web server configured with the docs' own nginx rules, and every request it made and
every answer nginx gave is read back from nginx's access log.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from agent.cloud.publish import write_signed
from agent.device.compat import caps_for
from agent.models.registry import RegistryClient
from agent.models.signing import CHANNEL, load_private_key
from agent.models.store import Store
from agent.transport.events import Event
from tests.helpers.nginx import Nginx, nginx_binary
from tests.helpers.registry import Registry
from tests.helpers.tcpproxy import TcpProxy

pytestmark = pytest.mark.skipif(
    nginx_binary() is None, reason="nginx is not installed (scripts/test.sh installs it with apt-get)"
)

CAPS = caps_for("1.32.0")
BLOB_BYTES = 600_000  # big enough that a throttled first transfer can be cut well before its end


@pytest.fixture
def nginx(registry: Registry, tmp_path: Path) -> Iterator[Nginx]:
    with Nginx(registry.root, tmp_path / "nginx") as server:
        yield server


def client(
    url: str, registry: Registry, state: Path, events: list[Event] | None = None, **kwargs: object
) -> RegistryClient:
    kwargs.setdefault("retries", 2)
    kwargs.setdefault("backoff", 0.01)
    return RegistryClient(
        url,
        registry.public_key,
        Store(state),
        emit=events.append if events is not None else (lambda e: None),
        caps=CAPS,
        providers=("CPUExecutionProvider",),
        **kwargs,  # type: ignore[arg-type]
    )


def test_nginx_serves_the_registry_as_the_docs_configure_it(registry: Registry, nginx: Nginx) -> None:
    registry.publish("m", "1.0.0", registry.tiny("m"))
    blob = registry.blob_path("m", "1.0.0")
    got = requests.get(nginx.url + f"blobs/sha256/{blob.name}", timeout=5)
    assert got.status_code == 200 and got.content == blob.read_bytes()
    assert got.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert got.headers["Accept-Ranges"] == "bytes" and got.headers["ETag"]
    channel = requests.get(nginx.url + "channels/m/stable.json", timeout=5)
    assert channel.status_code == 200 and channel.headers["Cache-Control"] == "no-cache"
    (registry.root / "models" / "m" / ".stage-1.1.0").mkdir()
    (registry.root / "models" / "m" / ".stage-1.1.0" / "manifest.json").write_text("{}")
    assert requests.get(nginx.url + "models/m/.stage-1.1.0/manifest.json", timeout=5).status_code == 403


def test_documents_are_polled_with_if_none_match_and_nginx_answers_304(
    registry: Registry, nginx: Nginx, tmp_path: Path
) -> None:
    registry.publish("m", "1.0.0", registry.tiny("m"))
    device = client(nginx.url, registry, tmp_path / "state")
    assert device.check_and_pull("m").status == "activated"
    first = [r for r in nginx.log() if r.path.startswith("/channels/")]
    assert [(r.path, r.status, r.if_none_match) for r in first] == [
        ("/channels/m/stable.json", 200, ""),
        ("/channels/m/stable.json.sig", 200, ""),
    ]
    n = len(nginx.log())
    assert device.check_and_pull("m").status == "current"
    polls = nginx.log()[n:]
    assert [(r.path, r.status) for r in polls] == [
        ("/keys/root.json", 304),  # the root of trust first (docs/trust.md)
        ("/channels/m/stable.json", 304),
        ("/channels/m/stable.json.sig", 304),
    ]
    assert all(r.if_none_match.startswith('"') and r.bytes_sent == 0 for r in polls)

    # A new version changes the channel's file, its ETag, and so the answer.
    registry.publish("m", "1.1.0", registry.tiny("m2", doc=b"second"))
    n = len(nginx.log())
    result = device.check_and_pull("m")
    assert (result.status, result.version) == ("activated", "1.1.0")
    assert [(r.path, r.status) for r in nginx.log()[n:] if r.path.startswith("/channels/")] == [
        ("/channels/m/stable.json", 200),
        ("/channels/m/stable.json.sig", 200),
    ]


def test_a_download_cut_midway_resumes_with_range(registry: Registry, tmp_path: Path) -> None:
    """A throttled first transfer is cut by a proxy at a quarter of the file; the retry asks nginx for the
    rest with Range and gets 206."""
    registry.publish("m", "1.0.0", registry.tiny("big", doc=b"x" * BLOB_BYTES))
    blob = registry.blob_path("m", "1.0.0")
    size = blob.stat().st_size
    slow = Nginx(
        registry.root,
        tmp_path / "nginx",
        # Only a transfer from the start is slow, so that the cut lands mid-file and the resume is quick.
        http_extra='    map $http_range $first_transfer_rate { "" 131072; default 0; }',
        server_extra="        limit_rate $first_transfer_rate;",
    )
    proxy = TcpProxy(0)
    cut = threading.Event()

    def progress(have: int, total: int) -> None:
        if have >= total // 4 and not cut.is_set():
            cut.set()
            proxy.cut()

    events: list[Event] = []
    with slow:
        proxy.target = ("127.0.0.1", slow.port)
        try:
            device = client(f"http://127.0.0.1:{proxy.port}/", registry, tmp_path / "state", events, progress=progress)
            result = device.check_and_pull("m")
        finally:
            proxy.close()
        log = [r for r in slow.log() if r.path == f"/blobs/sha256/{blob.name}"]
    assert result.status == "activated", result.reason
    assert cut.is_set()
    assert len(log) == 2, log
    assert (log[0].status, log[0].range) == (200, "") and 0 < log[0].bytes_sent < size
    start = int(log[1].range.removeprefix("bytes=").rstrip("-"))
    assert log[1].status == 206 and size // 4 <= start < size and log[1].bytes_sent == size - start
    assert "model.activated" in [e.type for e in events]


def test_a_truncated_blob_is_refused_then_pulled_once_the_server_has_it_whole(
    registry: Registry, nginx: Nginx, tmp_path: Path
) -> None:
    """A mirror that holds half a file (an interrupted rsync): nginx serves what it has, with an honest
    Content-Length; the device refuses it unread past the headers, installs nothing, and pulls the
    version once the file is whole."""
    registry.publish("m", "1.0.0", registry.tiny("big", doc=b"x" * BLOB_BYTES))
    blob = registry.blob_path("m", "1.0.0")
    whole = blob.read_bytes()
    blob.write_bytes(whole[: len(whole) // 2])
    events: list[Event] = []
    device = client(nginx.url, registry, tmp_path / "state", events)
    refused = device.check_and_pull("m")
    assert refused.status == "refused" and "truncated on the registry" in (refused.reason or "")
    assert Store(tmp_path / "state").active("m") is None
    assert not any((tmp_path / "state" / "models" / ".partial").glob("*"))
    blob.write_bytes(whole)
    assert device.check_and_pull("m").status == "activated"
    assert [e.type for e in events].count("model.refused") == 1


def test_a_rate_limited_request_is_retried_after_what_nginx_says(registry: Registry, tmp_path: Path) -> None:
    """nginx's limit_req answering 429 with Retry-After (as a CDN's rate limit does): the device waits
    that long and asks again; the model is not refused."""
    registry.publish("m", "1.0.0", registry.tiny("m"))
    limited = Nginx(
        registry.root,
        tmp_path / "nginx",
        http_extra="\n".join(
            [
                '    map $uri $channel_client { ~^/channels/ $binary_remote_addr; default ""; }',
                "    limit_req_zone $channel_client zone=channels:1m rate=60r/m;",
            ]
        ),
        server_extra="\n".join(
            [
                "        limit_req zone=channels burst=1 nodelay;",  # a poll (pointer and signature) passes
                "        limit_req_status 429;",
                "        error_page 429 = @limited;",
                "        location @limited { add_header Retry-After 3 always; return 429; }",
            ]
        ),
    )
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        time.sleep(seconds)

    with limited:
        device = client(limited.url, registry, tmp_path / "state", sleep=sleep, retries=3)
        first = device.check_and_pull("m")
        n = len(limited.log())
        again = device.check_and_pull("m")
        log = limited.log()[n:]
    assert first.status == "activated" and again.status == "current", again.reason
    assert sleeps == [3.0]
    statuses = [(r.path, r.status) for r in log if r.path.startswith("/channels/")]  # keys/ is not limited
    assert statuses[0] == ("/channels/m/stable.json", 429)
    assert ("/channels/m/stable.json", 304) in statuses


def test_a_document_rewritten_within_the_second_gets_a_new_etag(registry: Registry, nginx: Nginx) -> None:
    """nginx's ETag is the file's mtime in whole seconds and its size: a channel moved from 1.0.0 to 1.1.0
    (the same size) within one second would keep its ETag, and a device that had polled in between would
    be told 304 until the channel moved again. The publisher gives the new file a later second."""
    registry.publish("m", "1.0.0", registry.tiny("m"))
    channel = registry.root / "channels" / "m" / "stable.json"
    while time.time() % 1 > 0.5:  # at the start of a second, so that what follows stays within it
        time.sleep(0.05)
    second = int(time.time())
    os.utime(channel, (second, second))
    first = requests.get(nginx.url + "channels/m/stable.json", timeout=5)
    data = first.content.replace(b'"1.0.0"', b'"1.1.0"')
    assert len(data) == len(first.content)
    write_signed(channel, data, load_private_key(registry.key), CHANNEL)
    assert int(time.time()) == second, "the rewrite took longer than the rest of the second"
    again = requests.get(
        nginx.url + "channels/m/stable.json", headers={"If-None-Match": first.headers["ETag"]}, timeout=5
    )
    assert again.status_code == 200 and again.content == data and again.headers["ETag"] != first.headers["ETag"]
