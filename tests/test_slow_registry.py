"""A registry too slow to be of use (issue 17, item 1): a real loopback server that sends one byte every
two seconds, never silent long enough for the per-read timeout.

Before the fix a pull of any file served that way never ended (`registry.timeout` bounds each read
only), and in a running agent it held the command thread and the updater's lock: `ping` went
unanswered, `update` got no reply and `rollback` waited. Now every body has an overall deadline
(`timeout + expected bytes / MIN_RATE`), the stall is a `model.error` naming the file, and `update`
runs off the command thread.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.models.fetch import MIN_RATE
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
    registry = make_registry(tmp_path / "reg")
    registry.publish("m", "1.0.0", linear(tmp_path, "v1", 1.0), channel="stable")
    device = "slow-1"
    agent = AgentProcess(
        tmp_path,
        device,
        "g",
        own_broker.url,
        registry.url,
        registry.public_key,
        csv=sensor_csv(tmp_path / "s.csv"),
        registry={"timeout": f"{TIMEOUT_S:.0f}s"},
    )
    sub = Subscriber(own_broker.port, f"edge/{device}/#")
    agent.start()
    try:
        assert wait_for(lambda: sub.on(f"edge/{device}/p/results"), 60), agent.stderr()[-3000:]
        assert wait_for(lambda: command_or_none(sub, device), 30), "commands never answered"
        registry.publish("m", "1.1.0", linear(tmp_path, "v11", 1.5), channel="stable")
        first = command(sub, device, "update", {}, timeout=30)
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
        errors = [e for e in events(sub, device) if e["type"] == "model.error" and e["version"] == "2.0.0"]
        assert errors and "slower than the minimum rate" in errors[-1]["reason"], errors
        rows = len(sub.on(f"edge/{device}/p/results"))
        assert wait_for(lambda: len(sub.on(f"edge/{device}/p/results")) > rows + 3, 10), "results stopped"
        assert "Traceback" not in agent.stderr(), agent.stderr()[-4000:]
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
