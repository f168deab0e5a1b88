"""A registry too slow to be of use (issue 17, item 1): a real loopback server that sends one byte every
two seconds, never silent long enough for the per-read timeout.

Before the fix a pull of any file served that way never ended (`registry.timeout` bounds each read
only), and in a running agent it held the command thread and the updater's lock: `ping` went
unanswered, `update` got no reply and `rollback` waited. Now every body has an overall deadline
(`timeout + expected bytes / MIN_RATE`), the stall is a `model.error` naming the file, and `update`
runs off the command thread. A server that trickles the status line and headers instead (before any
Content-Length) is held to `timeout + MAX_HEAD_BYTES / MIN_RATE` (a blob also to its body's deadline).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.models.fetch import MAX_HEAD_BYTES, MIN_RATE, Fetcher, FetchError
from agent.transport.events import Event
from tests.helpers.broker import Mosquitto
from tests.helpers.daemon_proc import AgentProcess, sensor_csv
from tests.helpers.mqtt_client import Subscriber
from tests.helpers.registry import Registry, make_registry
from tests.helpers.waiting import wait_for
from tests.test_e2e_daemon import linear

pytestmark = pytest.mark.slow

TRICKLE_S = 2.0  # one byte every two seconds
TIMEOUT_S = 3.0  # the per-read timeout: longer than the trickle's gaps, so only the overall deadline ends it


@pytest.fixture
def slow_registry(tmp_path: Path) -> Iterator[Registry]:
    registry = make_registry(tmp_path / "reg")
    registry.publish("m", "1.0.0", linear(tmp_path, "v1", 1.0), channel="stable")
    yield registry
    registry.server.stop()


@pytest.mark.parametrize("which", ["blob", "manifest.json", "stable.json", "root.json"])
def test_a_trickling_file_ends_the_pull_as_model_error_within_its_deadline(
    tmp_path: Path, slow_registry: Registry, which: str
) -> None:
    name = slow_registry.blob_path("m", "1.0.0").name if which == "blob" else which
    size = len(slow_registry.blob_path("m", "1.0.0").read_bytes()) if which == "blob" else 0
    slow_registry.server.trickle[name] = TRICKLE_S
    events: list[Event] = []
    client = slow_registry.client(tmp_path / "state", events, timeout=TIMEOUT_S, retries=0)
    started = time.monotonic()
    result = client.check_and_pull("m", "stable")
    took = time.monotonic() - started
    assert result.status == "failed", result
    assert result.reason is not None and "stalled" in result.reason, result.reason
    assert "slower than the minimum rate" in result.reason, result.reason
    assert (name if which != "blob" else "m 1.0.0 variant") in result.reason, result.reason  # names what stalled
    # The deadline: the per-read timeout plus the expected bytes at the minimum rate, plus one trickle gap.
    limit = TIMEOUT_S + max(size, 4096) / MIN_RATE + TRICKLE_S + 1.0
    assert took < limit, (took, limit)
    errors = [e.fields for e in events if e.type == "model.error"]
    assert errors and "stalled" in errors[0]["reason"], events
    assert client.store.active("m") is None


@pytest.mark.parametrize("which", ["blob", "manifest.json", "stable.json"])
def test_trickling_headers_end_the_pull_as_model_error_within_their_deadline_and_the_next_poll_retries(
    tmp_path: Path, slow_registry: Registry, which: str
) -> None:
    blob = slow_registry.blob_path("m", "1.0.0")
    name = blob.name if which == "blob" else which
    slow_registry.server.trickle_head[name] = TRICKLE_S
    events: list[Event] = []
    client = slow_registry.client(tmp_path / "state", events, timeout=TIMEOUT_S, retries=0)
    started = time.monotonic()
    result = client.check_and_pull("m", "stable")
    took = time.monotonic() - started
    assert result.status == "failed", result
    assert result.reason is not None and "stalled: status line and headers not complete after" in result.reason
    assert "slower than the minimum rate" in result.reason, result.reason
    assert (name if which != "blob" else "m 1.0.0 variant") in result.reason, result.reason
    # A document's headers: the per-read timeout plus MAX_HEAD_BYTES at the minimum rate; a blob's no later
    # than its body's deadline. The watchdog ends the read at once: one second of slack, no trickle gap.
    head = min(MAX_HEAD_BYTES, blob.stat().st_size) if which == "blob" else MAX_HEAD_BYTES
    limit = TIMEOUT_S + head / MIN_RATE + 1.0
    assert took < limit, (took, limit)
    assert took > TIMEOUT_S, took  # the deadline, not a per-read timeout or an early error, ended it
    errors = [e.fields for e in events if e.type == "model.error"]
    assert errors and "headers not complete" in errors[0]["reason"], events
    assert client.store.active("m") is None

    del slow_registry.server.trickle_head[name]  # the server recovers: the next poll pulls the model
    again = client.check_and_pull("m", "stable")
    assert again.status == "activated", again
    active = client.store.active("m")
    assert active is not None and active.version == "1.0.0", active


@contextlib.contextmanager
def trickling_server(first: bytes, trickle: bytes) -> Iterator[str]:
    """A raw loopback server for one connection ("host:port"): reads what the client sends, answers `first`
    at once, then `trickle` one byte every TRICKLE_S, never silent for a whole per-read timeout."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        conn, _ = server.accept()
        with conn, contextlib.suppress(OSError):
            conn.recv(4096)
            conn.sendall(first)
            for i in range(len(trickle)):
                if stop.wait(TRICKLE_S):
                    return
                conn.sendall(trickle[i : i + 1])

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        server.close()


def test_a_trickling_tls_handshake_ends_at_the_header_deadline(tmp_path: Path) -> None:
    """A TLS record header announcing 16 KiB, then its bytes trickling: the handshake ends within the
    header deadline (CPython's ssl holds a whole handshake to the socket timeout; the watchdog too)."""
    with trickling_server(b"\x16\x03\x03\x40\x00", bytes(16384)) as where:
        fetcher = Fetcher(
            f"https://{where}/", tmp_path / "c", timeout=TIMEOUT_S, retries=0, backoff=0.01, sleep=time.sleep
        )
        started = time.monotonic()
        with pytest.raises(FetchError, match=r"stable\.json: .*(Read timed out|stalled: status line and headers)"):
            fetcher.document("channels/m/stable.json")
    took = time.monotonic() - started
    assert TIMEOUT_S < took < TIMEOUT_S + MAX_HEAD_BYTES / MIN_RATE + 1.0, took


def test_a_proxy_trickling_its_connect_reply_ends_at_the_header_deadline(tmp_path: Path) -> None:
    """An HTTPS registry through an HTTP proxy whose CONNECT reply trickles: only the watchdog ends that
    (http.client reads the reply line by line under the per-read timeout)."""
    with trickling_server(b"", b"HTTP/1.1 200 Connection established\r\nVia: slow-proxy\r\n\r\n") as where:
        fetcher = Fetcher(
            "https://registry.invalid/", tmp_path / "c", timeout=TIMEOUT_S, retries=0, backoff=0.01, sleep=time.sleep
        )
        fetcher.http.proxies = {"https": f"http://{where}"}
        started = time.monotonic()
        with pytest.raises(FetchError, match=r"stable\.json: stalled: status line and headers not complete after 5 s"):
            fetcher.document("channels/m/stable.json")
    took = time.monotonic() - started
    assert TIMEOUT_S < took < TIMEOUT_S + MAX_HEAD_BYTES / MIN_RATE + 1.0, took


def command(sub: Subscriber, device: str, name: str, args: dict[str, Any], timeout: float = 1.0) -> dict[str, Any]:
    """A command and its reply, which must come within `timeout`."""
    topic = f"edge/{device}/cmd/{name}/reply"
    before = len(sub.on(topic))
    sent = time.monotonic()
    sub.publish(f"edge/{device}/cmd/{name}", json.dumps(args))
    assert wait_for(lambda: len(sub.on(topic)) > before, timeout, interval=0.005), f"no {name} reply in {timeout} s"
    reply: dict[str, Any] = json.loads(sub.on(topic)[before].payload)
    reply["_took"] = time.monotonic() - sent
    return reply


def test_commands_are_answered_while_a_pull_is_stuck(tmp_path: Path, own_broker: Mosquitto) -> None:
    with serving_agent(tmp_path, own_broker, "slow-1") as (registry, agent, sub):
        device = "slow-1"
        registry.publish("m", "1.1.0", linear(tmp_path, "v11", 1.5), channel="stable")
        first = command(sub, device, "update", {}, timeout=30)
        assert first.get("ok") is True, (first, agent.stderr()[-3000:])
        assert first["result"]["models"][0]["status"] == "active", first

        # 2.0.0's blob trickles: the update is stuck in its download.
        registry.publish("m", "2.0.0", linear(tmp_path, "v2", 2.0), channel="stable")
        registry.server.trickle[registry.blob_path("m", "2.0.0").name] = TRICKLE_S
        topic = f"edge/{device}/cmd/update/reply"
        replies = len(sub.on(topic))
        started = time.monotonic()
        sub.publish(f"edge/{device}/cmd/update", "{}")
        assert wait_for(lambda: downloading(sub, device, "2.0.0"), 10), agent.stderr()[-3000:]

        ping = command(sub, device, "ping", {})
        assert ping["ok"] and ping["_took"] < 1.0, ping
        again = command(sub, device, "update", {})
        assert again["ok"] is False and "update is already running" in again["error"]["message"], again
        back = command(sub, device, "rollback", {"model": "m"})
        assert back["ok"] and back["result"] == {"model": "m", "version": "1.0.0", "from": "1.1.0"}, back
        assert back["_took"] < 1.0, back
        assert len(sub.on(topic)) == replies + 1, "only the refused second update has replied yet"

        # The stalled download ends as a failed update and a model.error naming the stall.
        assert wait_for(lambda: len(sub.on(topic)) > replies + 1, 60), agent.stderr()[-3000:]
        done = json.loads(sub.on(topic)[-1].payload)
        (summary,) = done["result"]["models"]
        assert summary["status"] == "failed" and "stalled" in summary["reason"], done
        assert time.monotonic() - started < 40

        # Events travel through the outbox, replies straight to the broker: the event may land second.
        def errors() -> list[dict[str, Any]]:
            return [e for e in events(sub, device) if e["type"] == "model.error" and e["version"] == "2.0.0"]

        assert wait_for(lambda: bool(errors()), 10), events(sub, device)
        assert "slower than the minimum rate" in errors()[-1]["reason"], errors()
        rows = len(sub.on(f"edge/{device}/p/results"))
        assert wait_for(lambda: len(sub.on(f"edge/{device}/p/results")) > rows + 3, 10), "results stopped"
        assert "Traceback" not in agent.stderr(), agent.stderr()[-4000:]


def test_ping_is_answered_while_a_manifest_trickles_its_headers(tmp_path: Path, own_broker: Mosquitto) -> None:
    with serving_agent(tmp_path, own_broker, "slow-head-1") as (registry, agent, sub):
        device = "slow-head-1"

        # 2.0.0's manifest trickles its status line and headers: the update waits on them.
        registry.publish("m", "2.0.0", linear(tmp_path, "v2", 2.0), channel="stable")
        registry.server.trickle_head["manifest.json"] = TRICKLE_S
        topic = f"edge/{device}/cmd/update/reply"
        replies = len(sub.on(topic))
        asked = len(registry.server.requests)
        started = time.monotonic()
        sub.publish(f"edge/{device}/cmd/update", "{}")
        assert wait_for(
            lambda: any(str(r["path"]).endswith("/2.0.0/manifest.json") for r in registry.server.requests[asked:]), 10
        ), agent.stderr()[-3000:]

        ping = command(sub, device, "ping", {})
        assert ping["ok"] and ping["_took"] < 1.0, ping
        assert len(sub.on(topic)) == replies, "the update cannot have finished while its headers trickle"

        assert wait_for(lambda: len(sub.on(topic)) > replies, 30), agent.stderr()[-3000:]
        done = json.loads(sub.on(topic)[-1].payload)
        (summary,) = done["result"]["models"]
        assert summary["status"] == "failed" and "headers not complete" in summary["reason"], done
        # Each of the agent's four tries (three retries) ends at the header deadline; backoff 0.5 + 1 + 2 s at most.
        bound = 4 * (TIMEOUT_S + MAX_HEAD_BYTES / MIN_RATE) + 3.5 + 3.0
        assert time.monotonic() - started < bound, bound
        # The reply goes straight out; the event comes through the outbox, a moment later.
        errors = wait_for(lambda: [e for e in events(sub, device) if e["type"] == "model.error"], 10)
        assert errors and "stalled: status line and headers not complete" in errors[-1]["reason"], errors
        ping = command(sub, device, "ping", {})
        assert ping["ok"] and ping["_took"] < 1.0, ping
        assert "Traceback" not in agent.stderr(), agent.stderr()[-4000:]


@contextlib.contextmanager
def serving_agent(
    tmp_path: Path, broker: Mosquitto, device: str
) -> Iterator[tuple[Registry, AgentProcess, Subscriber]]:
    """A real agent on 1.0.0 of `m` from a registry it polls with TIMEOUT_S, producing results and
    answering commands; stopped with its subscriber and registry afterwards."""
    registry = make_registry(tmp_path / "reg")
    registry.publish("m", "1.0.0", linear(tmp_path, "v1", 1.0), channel="stable")
    agent = AgentProcess(
        tmp_path,
        device,
        "g",
        broker.url,
        registry.url,
        registry.public_key,
        csv=sensor_csv(tmp_path / "s.csv"),
        registry={"timeout": f"{TIMEOUT_S:.0f}s"},
    )
    sub = Subscriber(broker.port, f"edge/{device}/#")
    agent.start()
    try:
        assert wait_for(lambda: sub.on(f"edge/{device}/p/results"), 60), agent.stderr()[-3000:]
        assert wait_for(lambda: command_or_none(sub, device), 30), "commands never answered"
        yield registry, agent, sub
    finally:
        agent.stop()
        sub.close()
        registry.server.stop()


def command_or_none(sub: Subscriber, device: str) -> dict[str, Any] | None:
    try:
        return command(sub, device, "ping", {}, timeout=0.5)
    except AssertionError:
        return None


def events(sub: Subscriber, device: str) -> list[dict[str, Any]]:
    return list(sub.payloads(f"edge/{device}/events"))


def downloading(sub: Subscriber, device: str, version: str) -> bool:
    return any(e["type"] == "model.downloading" and e["version"] == version for e in events(sub, device))
