"""Remote commands: the registry, argument checks, error replies, and replies over a real broker."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from agent.service.commands.dispatch import SPECS, CommandDispatcher, CommandError
from agent.transport.events import Event
from tests.helpers.agent_proc import InProcessAgent
from tests.helpers.broker import Mosquitto
from tests.helpers.mqtt_client import Subscriber

pytestmark = pytest.mark.arm64


def dispatcher() -> tuple[CommandDispatcher, list[Event]]:
    events: list[Event] = []
    return CommandDispatcher("dev1", events=events.append, clock=lambda: 1_800_000_000.0), events


def test_ping_is_built_in_and_echoes_the_id() -> None:
    d, _ = dispatcher()
    reply = d.handle("ping", b'{"id": "42"}')
    assert reply["ok"] is True and reply["id"] == "42" and reply["result"]["pong"] is True
    assert d.handle("ping", b"")["ok"] is True  # empty payload = no arguments


@pytest.mark.parametrize(
    ("name", "payload", "code", "words"),
    [
        ("ping", b"{not json", "bad_json", "not JSON"),
        ("ping", b"[1, 2]", "bad_json", "JSON object"),
        ("ping", b"\xff\xfe", "bad_json", "not JSON"),
        ("selfdestruct", b"{}", "unknown_command", "unknown command 'selfdestruct'"),
        ("rollback", b"{}", "not_available", "not available"),
    ],
)
def test_bad_requests_get_error_replies(name: str, payload: bytes, code: str, words: str) -> None:
    d, events = dispatcher()
    reply = d.handle(name, payload)
    assert reply["ok"] is False and reply["error"]["code"] == code and words in reply["error"]["message"]
    assert events[-1].type == "command.error" and events[-1].fields["code"] == code


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (b"{}", "name: required (a string)"),
        (b'{"name": "gate", "action": "pause"}', 'action: expected one of "start", "stop", "restart", got "pause"'),
        (b'{"name": 3, "action": "stop"}', "name: expected a string, got 3"),
        (
            b'{"name": "gate", "action": "stop", "force": true}',
            "force: unknown argument for pipeline (arguments: action, name)",
        ),
    ],
)
def test_wrong_arguments_are_refused_before_the_handler(payload: bytes, words: str) -> None:
    d, _ = dispatcher()
    calls: list[dict] = []
    d.register("pipeline", lambda args: calls.append(args))
    reply = d.handle("pipeline", payload)
    assert reply["error"] == {"code": "bad_argument", "message": words} and calls == []


@pytest.mark.logs_exception("a handler's bug (1 / 0) is answered as an error reply and logged with its traceback")
def test_handlers_are_a_registry_and_their_failures_are_replies() -> None:
    d, _ = dispatcher()
    d.register("pipeline", lambda args: {"name": args["name"], "state": "stopped"})
    d.register(
        "reload", lambda args: (_ for _ in ()).throw(CommandError("profile.yaml:3: device.id: required", "bad_profile"))
    )
    d.register("update", lambda args: 1 / 0)
    d.register("snapshot", lambda args: b"\xff\xd8jpeg")
    assert d.handle("pipeline", b'{"name": "gate", "action": "stop"}')["result"] == {"name": "gate", "state": "stopped"}
    assert d.handle("reload", b"")["error"] == {"code": "bad_profile", "message": "profile.yaml:3: device.id: required"}
    failed = d.handle("update", b"")
    assert failed["error"]["code"] == "failed" and "ZeroDivisionError" in failed["error"]["message"]
    assert d.handle("snapshot", b'{"pipeline": "gate"}')["result"] == {"data_base64": "/9hqcGVn", "bytes": 6}
    assert set(SPECS) <= set(d._specs) and "ping" in d.commands


def test_replies_over_the_broker_honour_response_topic_and_correlation(broker: Mosquitto, tmp_path: Path) -> None:
    dev = f"cmd-{uuid.uuid4().hex[:6]}"
    sub = Subscriber(broker.port, f"edge/{dev}/#", "replies/#")
    agent = InProcessAgent(broker.url, tmp_path, dev)
    try:
        assert agent.conn.wait_online(10)
        sub.publish(f"edge/{dev}/cmd/ping", b'{"id": 7}', response_topic="replies/me", correlation=b"corr-1")
        reply = sub.wait_for(lambda: sub.on("replies/me"))[0]
        assert json.loads(reply.payload)["id"] == 7 and reply.properties.CorrelationData == b"corr-1"
        # A response topic no PUBLISH may name (the broker passes wildcards on): refused unrun, answered on the
        # command's own reply topic (paho raised on it: a logged traceback and no reply).
        sub.publish(f"edge/{dev}/cmd/ping", b'{"id": 8}', response_topic="replies/+/x", correlation=b"corr-2")
        wild = sub.wait_for(lambda: sub.payloads(f"edge/{dev}/cmd/ping/reply"))[0]
        assert wild["id"] == 8 and wild["error"] == {
            "code": "bad_argument",
            "message": "response topic 'replies/+/x' is not a topic to publish to",
        }
        sub.publish(f"edge/{dev}/cmd/ping", b"not json")
        # Over the Maximum Packet Size the agent announces in its MQTT 5 CONNECT: the broker drops it, so
        # the agent never reads two megabytes to refuse them (no reply, no event).
        sub.publish(f"edge/{dev}/cmd/ping", b'{"id": 9, "pad": "' + b"x" * (2 << 20) + b'"}')
        sub.publish(f"edge/{dev}/cmd/nope", b"{}")
        sub.publish(f"edge/{dev}/cmd/ping", b"{}")  # still alive after the bad ones
        replies = sub.wait_for(
            lambda: len(sub.payloads(f"edge/{dev}/cmd/ping/reply")) >= 3 and sub.payloads(f"edge/{dev}/cmd/nope/reply")
        )
        assert replies
        pings = sub.payloads(f"edge/{dev}/cmd/ping/reply")
        assert [p["ok"] for p in pings] == [False, False, True] and pings[1]["error"]["code"] == "bad_json"
        assert sub.payloads(f"edge/{dev}/cmd/nope/reply")[0]["error"]["code"] == "unknown_command"

        def codes() -> set[str]:
            return {e["code"] for e in sub.payloads(f"edge/{dev}/events") if e["type"] == "command.error"}

        # Both events travel through the outbox: the first one may arrive well before the second.
        assert sub.wait_for(lambda: codes() == {"bad_argument", "bad_json", "unknown_command"}, 20), sub.payloads(
            f"edge/{dev}/events"
        )
    finally:
        agent.stop()
        sub.close()
