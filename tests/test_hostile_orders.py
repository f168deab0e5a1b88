"""What a device accepts from the network to change itself, attacked where the first pass (test_hostile_wire.py)
did not look: each a named case against a real Mosquitto and the real parts (the dispatcher on a real connection
and outbox, or a whole `edge-agent run` with a real registry).

Commands: a reply sent to another of the agent's topics (another device's, the fleet's deploy topic, its own
command topic, a loop), a retained command run again at every connect, a command name that is not a name, a
flood, a queue of large payloads. Orders: a signed order copied onto the device's other deploy topic (past the
replay marks), an order issued far ahead of the device's clock (which locked its topic), times out of range
(a traceback). Each is refused in one line and the device serves on.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from agent.models.deploy import new_order, sign_order
from agent.models.signing import ORDER, load_private_key, sign
from agent.service.commands.dispatch import Handler
from tests.helpers.agent_proc import InProcessAgent
from tests.helpers.broker import Mosquitto
from tests.helpers.mqtt_client import Subscriber
from tests.helpers.registry import make_registry
from tests.helpers.waiting import wait_for
from tests.test_e2e_daemon import linear
from tests.test_hostile_wire import DEVICE, Rig, running

pytestmark = pytest.mark.slow

MiB = 1 << 20
EVENTS_PER_S = 10  # command.error events a second (docs/mqtt.md)


# ---- commands: the dispatcher on a real connection, outbox and broker ---------------------------------------


class Commands:
    """An in-process agent under a topic prefix of its own (no other test's retained messages), a subscriber to
    what is under it (`watch`: everything), and a `slow` command that holds the dispatcher until `release()`."""

    def __init__(
        self, broker: Mosquitto, state_dir: Path, prefix: str | None = None, watch: str = "#", **handlers: Handler
    ) -> None:
        self.prefix = prefix or f"t-{uuid.uuid4().hex[:8]}"
        self.dev = "dev-a"
        self.base = f"{self.prefix}/{self.dev}"
        self.sub = Subscriber(broker.port, f"{self.prefix}/{watch}", "replies/#")
        self.agent = InProcessAgent(broker.url, state_dir, self.dev, start=False, topic_prefix=self.prefix)
        self.gate, self.held = threading.Event(), threading.Event()
        for name, handler in {"slow": self._slow, **handlers}.items():
            self.agent.commands.register(name, handler)
        self.marks = threading.Event()
        self.agent.conn.subscribe(f"{self.prefix}/marker", lambda _msg: self.marks.set())
        self.agent.conn.start()
        assert self.agent.conn.wait_online(10)  # subscriptions acknowledged too

    def _slow(self, _args: dict[str, Any]) -> object:
        self.held.set()
        self.gate.wait(60)
        return {}

    def hold(self) -> None:
        """The dispatcher busy (as with a pipeline restart): what arrives now waits in its queue."""
        self.sub.publish(f"{self.base}/cmd/slow", b"{}")
        assert self.held.wait(10), "the slow command never ran"

    def release(self) -> None:
        self.gate.set()

    def delivered(self) -> None:
        """Every message published before this has reached the agent's network thread (one client's messages
        arrive in order)."""
        self.marks.clear()
        self.sub.publish(f"{self.prefix}/marker", b"")
        assert self.marks.wait(20), "the marker never reached the agent"

    def replies(self, name: str) -> list[dict[str, Any]]:
        return self.sub.payloads(f"{self.base}/cmd/{name}/reply")

    def errors(self) -> list[dict[str, Any]]:
        return [e for e in self.sub.payloads(f"{self.base}/events") if e["type"] == "command.error"]

    def close(self) -> None:
        self.release()
        self.agent.stop()
        self.sub.close()


@pytest.fixture
def commands(broker: Mosquitto, tmp_path: Path) -> Iterator[Commands]:
    rig = Commands(broker, tmp_path / "state")
    yield rig
    rig.close()


def test_a_reply_goes_to_no_other_topic_of_the_agents(commands: Commands) -> None:
    """A response topic is the requester's word: it pointed the device's reply at another device's order topic,
    at the fleet's deploy topic, at the controller's lease, at its own status and results, and at its own command
    topic (where it ran its reply as a second command). Under the prefix a reply now goes only where the ACL of
    docs/mqtt.md lets a device write one: `<prefix>/<device>/cmd/+/reply/#`."""
    c, prefix, base = commands, commands.prefix, commands.base
    elsewhere = [
        f"{base}/cmd/ping",  # its own command topic: the reply came back as a command
        f"{base}/status",
        f"{base}/events",
        f"{base}/p/results",
        f"{base}/report",
        f"{base}/deploy",
        f"{prefix}/dev-b/deploy",
        f"{prefix}/dev-b/cmd/ping/reply",
        f"{prefix}/fleet/g/deploy",
        f"{prefix}/fleet/controller/lease",
        prefix,
    ]
    for i, topic in enumerate(elsewhere):
        c.sub.publish(f"{base}/cmd/ping", json.dumps({"id": i}), response_topic=topic, correlation=f"c{i}".encode())
    allowed = [f"{base}/cmd/ping/reply/op-1", f"{base}/cmd/reload/reply", "replies/op-1"]
    for i, topic in enumerate(allowed, start=100):
        c.sub.publish(f"{base}/cmd/ping", json.dumps({"id": i}), response_topic=topic, correlation=f"c{i}".encode())
    assert c.sub.wait_for(lambda: all(c.sub.on(t) for t in allowed), 20), [m.topic for m in c.sub.messages]
    refused = c.replies("ping")
    assert sorted(r["id"] for r in refused) == list(range(len(elsewhere))), refused
    for reply in refused:
        topic = elsewhere[reply["id"]]
        assert reply["error"]["code"] == "bad_argument", reply
        assert reply["error"]["message"] == (
            f"response topic {topic!r} is another of the agent's topics: under {prefix}/ a reply goes only to "
            f"{base}/cmd/<command>/reply or below it"
        ), reply
    requests = len(elsewhere) + len(allowed)
    assert len(c.sub.on(f"{base}/cmd/ping")) == requests, "the device published on its own command topic"
    for topic in elsewhere[1:]:  # (the agent's own retained `online` is on its status topic)
        assert [m for m in c.sub.on(topic) if b'"ok"' in m.payload] == [], f"the device replied on {topic}"
    for topic in allowed:
        (msg,) = c.sub.on(topic)
        assert json.loads(msg.payload)["ok"] is True and msg.properties.CorrelationData.startswith(b"c1")
    assert c.sub.wait_for(lambda: len(c.errors()) >= EVENTS_PER_S, 20), c.errors()  # the rest counted


def test_a_retained_command_is_refused_at_every_connect_and_never_run(broker: Mosquitto, tmp_path: Path) -> None:
    """A command published with the retain flag was run again at every connect (clean start re-subscribes, and
    the broker hands the retained message over each time; measured: 3 connects, 3 runs), so a retained
    `rollback` would step the model back once per reconnect. Delivered live it is a command like any other;
    delivered as retained it is refused."""
    first = Commands(broker, tmp_path / "state")
    topic = f"{first.base}/cmd/rollback"
    ran: list[dict[str, Any]] = []
    try:
        first.sub.client.publish(topic, b'{"model": "m"}', qos=1, retain=True).wait_for_publish(5)
        assert first.sub.wait_for(lambda: first.replies("rollback"), 20)  # live: not_available, no handler here
    finally:
        first.close()
    for connect in range(2):
        rig = Commands(broker, tmp_path / "state", first.prefix, rollback=lambda args: ran.append(args) or {})
        try:
            assert rig.sub.wait_for(partial(rig.replies, "rollback"), 20), f"no reply at connect {connect}"
            (reply,) = rig.replies("rollback")
            assert reply["ok"] is False and reply["error"] == {
                "code": "bad_argument",
                "message": "a retained command is not run (it would run again at every connect); send commands "
                "without the retain flag, and clear this one with an empty retained message",
            }, reply
            assert ran == []
        finally:
            if connect == 1:
                rig.sub.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
            rig.close()


def test_a_command_name_that_is_not_a_name_gets_a_short_refusal(commands: Commands) -> None:
    """Whatever follows `cmd/` in a topic was the command's name: 60,000 characters came back twice in a 120 KB
    reply and again in a 120 KB event (written to the outbox on disk, and to the log); one whose reply topic
    would pass MQTT's 65,535 bytes logged a traceback and got no reply. Now such a name is refused with a
    bounded echo; a reply topic no PUBLISH may name is not used."""
    c = commands
    head = f"{c.base}/cmd/"
    overlong = "y" * (65_535 - len(head))  # the request's topic is legal; `<topic>/reply` would not be
    refused = ["x" * 60_000, "ping now", "pïng", "-ping", ".."]
    for name in [overlong, *refused]:
        c.sub.publish(head + name, b"{}")
    assert c.sub.wait_for(lambda: all(c.replies(n) for n in refused), 20), [m.topic[:80] for m in c.sub.messages]
    for name in refused:
        (msg,) = c.sub.on(f"{head}{name}/reply")
        reply = json.loads(msg.payload)
        assert len(msg.payload) < 1000, (name[:80], len(msg.payload))
        assert reply["error"]["code"] == "unknown_command", reply
        assert reply["error"]["message"].startswith("command: expected a name of letters, digits"), reply
    assert c.sub.wait_for(lambda: len(c.errors()) == len(refused) + 1, 20), len(c.errors())
    assert all(len(json.dumps(e)) < 1000 for e in c.errors()), [len(json.dumps(e)) for e in c.errors()]
    assert c.sub.on(f"{head}{overlong}/reply") == []
    c.sub.publish(f"{c.base}/cmd/ping", b"{}")
    assert c.sub.wait_for(lambda: c.replies("ping"), 10) and c.replies("ping")[0]["ok"] is True


def test_a_command_flood_costs_a_few_log_lines_and_a_bounded_number_of_events(
    commands: Commands, caplog: pytest.LogCaptureFixture
) -> None:
    """20,000 commands from one client in half a second: the dispatcher logged 10,092 warnings (one per command
    the full queue refused) and published 9,908 `command.error` events, each a record on the outbox's disk (and,
    in the daemon, a log line). Now the refusals of a flood are counted, in one line per 10 s, and at most 10
    `command.error` events a second are sent."""
    c = commands
    c.hold()
    caplog.set_level(logging.WARNING, logger="agent.service.commands.dispatch")
    sent = [c.sub.client.publish(f"{c.base}/cmd/nope", b"{}", qos=1) for _ in range(2_000)]
    for info in sent:
        info.wait_for_publish(10)
    c.delivered()
    lines = [r.getMessage() for r in caplog.records if "already waiting" in r.getMessage()]
    assert 1 <= len(lines) <= 2, f"{len(lines)} log lines, the first: {lines[:2]}"
    c.release()
    assert c.sub.wait_for(lambda: len(c.replies("nope")) == 100, 20), len(c.replies("nope"))
    c.agent.sink.flush()
    time.sleep(1.5)  # events travel through the outbox
    assert 1 <= len(c.errors()) <= 30, len(c.errors())
    c.agent.commands.stop()  # the flood's count, logged as the dispatcher stops
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "commands already waiting (1899 since the last line, 1900 in all)" in said, said[-2000:]
    assert "command.error events not sent: more than 10 a second" in said, said[-2000:]


def test_a_queue_of_large_commands_holds_their_sizes_not_their_bytes(broker: Mosquitto, tmp_path: Path) -> None:
    """While the dispatcher was busy, 100 waiting commands of 1 MiB each (a payload it refuses unread) held
    107 MiB of the agent's memory. Now a payload over the 64 KiB a command may have waits as its size."""
    c = Commands(broker, tmp_path / "state", watch="+/cmd/+/reply")  # the requests themselves not kept here
    big = b" " * MiB
    c.hold()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(100):
            c.sub.publish(f"{c.base}/cmd/ping", big)
        c.delivered()
        held = tracemalloc.get_traced_memory()[0] - before
        assert held < 16 * MiB, f"{held / MiB:.0f} MiB held by 100 waiting commands"
        c.release()
        assert c.sub.wait_for(lambda: len(c.replies("ping")) == 100, 20), len(c.replies("ping"))
        assert {r["error"]["message"] for r in c.replies("ping")} == {
            f"payload refused: {MiB} bytes, more than the 65536 allowed"
        }
    finally:
        tracemalloc.stop()
        c.close()


# ---- deployment orders: a real agent, registry and broker -----------------------------------------------------


@pytest.fixture
def device(tmp_path: Path, own_broker: Mosquitto) -> Iterator[Rig]:
    """A real agent serving m 1.0.0 (channel stable); the registry also holds 2.0.0, on no channel."""
    registry = make_registry(tmp_path / "reg")
    registry.publish("m", "1.0.0", linear(tmp_path, "v1", 1.0), channel="stable")
    registry.publish("m", "2.0.0", linear(tmp_path, "v2", 2.0), channel=None)
    with running(tmp_path, own_broker, registry) as rig:
        yield rig


def retain(rig: Rig, topic: str, payload: bytes) -> None:
    rig.sub.client.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)


def signed(rig: Rig, doc: dict[str, Any]) -> bytes:
    """An order signed exactly as written, with the registry's key (what only the fleet holds)."""
    text = json.dumps(doc)
    sig = json.loads(sign(load_private_key(rig.registry.key), text.encode(), ORDER))
    return json.dumps({"order": text, "sig": sig}).encode()


def refusal(rig: Rig, mark: int) -> dict[str, Any]:
    found = wait_for(lambda: rig.events("deploy.refused", mark), 30)
    assert found, f"no deploy.refused; events since: {rig.events('model.active', mark)}\n{rig.agent.stderr()[-3000:]}"
    return found[0]


def active(rig: Rig, version: str, mark: int) -> dict[str, Any]:
    found = wait_for(lambda: [e for e in rig.events("model.active", mark) if e["version"] == version], 60)
    assert found, f"m {version} never went active\n{rig.agent.stderr()[-3000:]}"
    return found[0]


@pytest.mark.parametrize(
    ("target", "home", "other"),
    [
        ("group:g", "edge/fleet/g/deploy", f"edge/{DEVICE}/deploy"),
        (f"device:{DEVICE}", f"edge/{DEVICE}/deploy", "edge/fleet/g/deploy"),
    ],
    ids=["group-order-on-device-topic", "device-order-on-group-topic"],
)
def test_an_order_copied_onto_the_devices_other_topic_is_refused(
    device: Rig, target: str, home: str, other: str
) -> None:
    """Replay marks are kept per topic: a signed order, withdrawn from its topic (where published again it is
    refused as a replay), was followed again once copied onto the device's other deploy topic, which had no
    mark: anyone who may write a deploy topic brought a withdrawn version back. An order is now followed
    only from its own topic (a group's from the group's, a device's from the device's)."""
    rig = device
    order = new_order("m", "2.0.0", target)
    payload = sign_order(order, load_private_key(rig.registry.key))
    mark = rig.mark()
    retain(rig, home, payload)
    active(rig, "2.0.0", mark)
    mark = rig.mark()
    retain(rig, home, b"")  # withdrawn: the device follows its channel again
    active(rig, "1.0.0", mark)
    mark = rig.mark()
    retain(rig, other, payload)
    refused = refusal(rig, mark)
    assert refused["order"] == order.id and refused["topic"] == other, refused
    assert refused["reason"] == (
        f"deployment order {order.id} is for {target} but came on {other}, not on its own topic; "
        "an order copied onto another topic is not followed (replay refused)"
    ), refused
    rig.assert_serving()
    assert [e["version"] for e in rig.events("model.active", mark)] == [], "the withdrawn order came back"


def test_an_order_issued_far_ahead_of_the_device_clock_is_refused_and_locks_nothing(device: Rig) -> None:
    """An order issued in 2036 (a signer whose clock was wrong, once) was followed, and its time became the
    topic's replay mark: every later order, issued now, was refused as "issued before" it, withdrawn or not,
    until the device's clock reached 2036. An order issued more than a day ahead of the device's clock is now
    refused, and the next order on the topic is carried out."""
    rig, topic = device, f"edge/{DEVICE}/deploy"
    ahead = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=3650)
    stamp = "%Y-%m-%dT%H:%M:%SZ"
    doc = new_order("m", "1.0.0", f"device:{DEVICE}").as_dict()
    doc.update(issued=ahead.strftime(stamp), expires=(ahead + timedelta(days=7)).strftime(stamp))
    mark = rig.mark()
    retain(rig, topic, signed(rig, doc))
    refused = refusal(rig, mark)
    assert refused["reason"].startswith(
        f"deployment order {doc['id']} is issued at {doc['issued']}, more than 24 h ahead of this device's clock ("
    ), refused
    assert refused["reason"].endswith("; check the clocks (NTP) of this device and of the host that signed it")
    mark = rig.mark()
    retain(rig, topic, sign_order(new_order("m", "2.0.0", f"device:{DEVICE}"), load_private_key(rig.registry.key)))
    active(rig, "2.0.0", mark)
    assert rig.events("deploy.refused", mark) == []


def test_an_order_whose_times_are_out_of_range_is_refused_without_a_traceback(device: Rig) -> None:
    """Python's datetime ends at year 9999 in UTC: a signed order expiring at 9999-12-31T23:59:59-01:00 (or issued
    at 0001-01-01T00:00:00+01:00) passed the parse and then raised OverflowError in the order book: a traceback
    in the log and no answer. Now the parse refuses it."""
    rig, topic = device, f"edge/{DEVICE}/deploy"
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    cases = [("expires", now, "9999-12-31T23:59:59-01:00"), ("issued", "0001-01-01T00:00:00+01:00", now)]
    for field, issued, expires in cases:
        doc = new_order("m", "1.0.0", f"device:{DEVICE}").as_dict()
        doc.update(issued=issued, expires=expires)
        mark = rig.mark()
        retain(rig, topic, signed(rig, doc))
        reason = refusal(rig, mark)["reason"]
        value = issued if field == "issued" else expires
        assert reason == f"deployment order {doc['id']}: {field}: {value!r} is out of range in UTC", reason
    rig.assert_serving()


def test_garbage_on_a_deploy_topic_costs_the_registry_nothing(device: Rig) -> None:
    """Every payload on a deploy topic, an unsigned string too, made the device fetch the registry's keys
    before it looked at the payload (88 GETs of keys/root.json for 2,000 of them): on a group's topic, every
    device of the group at once. A payload that is not a signed envelope is now refused without a request."""
    rig = device
    mark = rig.mark()
    before = len(rig.registry.server.requests)
    for i in range(20):
        retain(rig, f"edge/{DEVICE}/deploy", f"not an order {i}".encode())
    assert wait_for(lambda: len(rig.events("deploy.refused", mark)) >= 1, 30)
    retain(rig, f"edge/{DEVICE}/deploy", b"[1, 2]")
    assert wait_for(lambda: any("is not {" in e["reason"] for e in rig.events("deploy.refused", mark)), 30)
    fetched = [r["path"] for r in rig.registry.server.requests[before:]]
    assert fetched == [], f"{len(fetched)} registry requests for garbage: {fetched[:5]}"
    rig.assert_serving()
