"""The `reload` command on a real agent (issue 17, item 7): a change outside `pipelines` restarts the
agent, which before the fix happened on the command thread itself (`RuntimeError: cannot join current
thread` in the log, and the reply lost). Now the reply comes first and says what was reloaded; the
restart follows on the daemon's own thread, and the agent serves on."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.broker import Mosquitto
from tests.helpers.daemon_proc import AgentProcess, sensor_csv
from tests.helpers.mqtt_client import Subscriber
from tests.helpers.registry import make_registry
from tests.helpers.waiting import wait_for
from tests.test_e2e_daemon import command, linear

pytestmark = pytest.mark.slow

DEVICE = "reload-1"


def answered(sub: Subscriber, name: str, args: dict[str, Any] | None = None) -> dict[str, Any] | None:
    try:
        return command(sub, DEVICE, name, args, timeout=1)
    except IndexError:  # no reply within the second
        return None


def test_reload_replies_with_what_it_reloaded_and_restarts_off_the_command_thread(
    tmp_path: Path, own_broker: Mosquitto
) -> None:
    registry = make_registry(tmp_path / "reg")
    registry.publish("m", "1.0.0", linear(tmp_path, "v1", 1.0), channel="stable")
    agent = AgentProcess(
        tmp_path, DEVICE, "g", own_broker.url, registry.url, registry.public_key, csv=sensor_csv(tmp_path / "s.csv")
    )
    sub = Subscriber(own_broker.port, f"edge/{DEVICE}/#")
    results = f"edge/{DEVICE}/p/results"
    agent.start()
    try:
        assert wait_for(lambda: sub.on(results), 60), agent.stderr()[-3000:]
        assert wait_for(lambda: answered(sub, "ping"), 30), agent.stderr()[-3000:]
        profile = json.loads(agent.profile.read_text())

        same = command(sub, DEVICE, "reload", timeout=30)
        assert same is not None and same["result"] == {"reloaded": "nothing", "changed": [], "pipelines": ["p"]}

        profile["pipelines"][0]["source"]["rate"] = 40
        agent.profile.write_text(json.dumps(profile))
        piped = command(sub, DEVICE, "reload", timeout=30)
        assert piped is not None and piped["result"] == {"reloaded": "pipelines", "changed": ["p"], "pipelines": ["p"]}

        # Outside `pipelines`: the reply within a second, then the whole agent restarts.
        profile["health"]["interval"] = "2s"
        agent.profile.write_text(json.dumps(profile))
        before = len(sub.on(f"edge/{DEVICE}/events"))
        sent = time.monotonic()
        whole = answered(sub, "reload")
        assert whole is not None, agent.stderr()[-3000:]
        assert time.monotonic() - sent < 1.0
        assert whole["ok"] and whole["result"] == {"reloaded": "agent", "changed": ["health"], "pipelines": ["p"]}
        reloaded = wait_for(
            lambda: [e for e in sub.payloads(f"edge/{DEVICE}/events")[before:] if e["type"] == "profile.reloaded"], 30
        )
        assert reloaded and reloaded[0]["pipelines"] == ["p"], agent.stderr()[-3000:]
        assert wait_for(lambda: answered(sub, "ping"), 30), "ping unanswered after the restart"
        rows = len(sub.on(results))
        assert wait_for(lambda: len(sub.on(results)) > rows + 3, 30), "no results after the restart"
        log = agent.stderr()
        assert "cannot join current thread" not in log and "Traceback" not in log, log[-4000:]
        assert agent.proc is not None and agent.proc.poll() is None
    finally:
        agent.stop()
        sub.close()
        registry.server.stop()
