"""Health: what it collects, when it publishes (interval and on change), retained on the broker."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from agent.service.health import HealthReporter, system_health
from tests.helpers.agent_proc import InProcessAgent
from tests.helpers.broker import Mosquitto
from tests.helpers.mqtt_client import Subscriber

pytestmark = pytest.mark.arm64


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def reporter(sent: list[dict], clock: Clock, interval: float = 30.0) -> HealthReporter:
    return HealthReporter(
        lambda payload: sent.append(json.loads(payload)),
        interval=interval,
        device="dev1",
        clock=lambda: 1_800_000_000.0,
        monotonic=clock,
        system=lambda: {"cpu_percent": 1.0},
    )


def test_system_health_has_the_basics(tmp_path: Path) -> None:
    h = system_health(tmp_path)
    assert 0 <= h["cpu_percent"] <= 100 * (h["cpu_count"] or 1)
    assert h["memory"]["total_mb"] > 0 and h["disk"]["path"] == str(tmp_path) and h["uptime_s"] > 0


def test_publishes_every_interval_and_on_state_change_only() -> None:
    sent: list[dict] = []
    clock = Clock()
    state = {"state": "online", "fps": 10.0}
    r = reporter(sent, clock)
    r.add_source("connection", lambda: dict(state))
    assert r.check() and len(sent) == 1  # the first report goes at once
    clock.t += 5
    state["fps"] = 12.0  # a gauge: waits for the interval
    assert not r.check()
    state["state"] = "offline"  # a state: goes now
    assert r.check() and sent[-1]["connection"]["state"] == "offline"
    clock.t += 0.5
    state["state"] = "online"
    assert not r.check()  # at most one report a second
    clock.t += 1
    assert r.check()
    clock.t += 30
    assert r.check() and len(sent) == 4


def test_a_failing_source_is_reported_not_raised() -> None:
    sent: list[dict] = []
    r = reporter(sent, Clock())
    r.add_source("pipelines", lambda: 1 / 0)
    r.add_source("models", lambda: {"m": {"version": "1.0", "provider": "CPUExecutionProvider"}})
    report = r.report()
    assert report["pipelines"]["error"].startswith("ZeroDivisionError") and report["models"]["m"]["version"] == "1.0"
    assert report["device"] == "dev1" and report["ts"].endswith("Z") and "uptime_s" in report["agent"]


def test_health_is_retained_on_the_broker_with_outbox_and_connection(broker: Mosquitto, tmp_path: Path) -> None:
    dev = f"health-{uuid.uuid4().hex[:6]}"
    agent = InProcessAgent(broker.url, tmp_path, dev)
    r = HealthReporter(
        lambda payload: agent.conn.publish_latest(agent.topics.health, payload),
        interval=30,
        device=dev,
        state_dir=tmp_path,
    )
    r.add_source("connection", agent.conn.health)
    r.add_source("outbox", lambda: agent.outbox.stats().as_dict())
    try:
        assert agent.conn.wait_online(10)
        r.report()
        # Once the broker has it (a first subscriber got it, live or retained), a later one gets it retained.
        first = Subscriber(broker.port, agent.topics.health)
        try:
            assert first.wait_for(lambda: first.payloads(agent.topics.health))
        finally:
            first.close()
        sub = Subscriber(broker.port, agent.topics.health)
        try:
            health = sub.wait_for(lambda: sub.payloads(agent.topics.health))[-1]
            assert health["connection"]["state"] == "online" and health["outbox"]["dropped"] == 0
            assert sub.on(agent.topics.health)[-1].retain
        finally:
            sub.close()
    finally:
        agent.stop()
