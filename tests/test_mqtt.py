"""The MQTT side against a real Mosquitto: delivery, outages, crashes, the Last Will, the bound, refusals.

Loss is counted through a TCP proxy that cuts the agent's connection, with the subscriber connected
straight to the broker (a restarted broker forgets subscriptions and queued messages by itself).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

import paho.mqtt.client as paho
import pytest

from agent.config.profile import DeviceConfig, MqttConfig, OutboxConfig
from agent.transport import connection as connection_module
from agent.transport import pahopatch
from agent.transport.connection import REFUSED, Connection
from agent.util.backoff import delay
from tests.helpers.agent_proc import InProcessAgent
from tests.helpers.broker import Mosquitto
from tests.helpers.mqtt_client import Subscriber, seqs
from tests.helpers.platform import EMULATED
from tests.helpers.tcpproxy import TcpProxy
from tests.helpers.waiting import wait_for

REPO = Path(__file__).resolve().parent.parent


def stay_root() -> str:
    """Mosquitto started as root drops to user mosquitto, which cannot read pytest's private temp dirs."""
    return "user root\n" if os.geteuid() == 0 else ""


def device_id(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def wait(check: Callable[[], object], timeout: float = 15.0) -> object:
    return wait_for(check, timeout)


def spawn(url: str, state: Path, device: str, count: int, rate: float = 0.0) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "tests.helpers.agent_proc", url, str(state), device, str(count)]
    if rate:
        cmd += ["--rate", str(rate)]
    return subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}
    )


def read_until(stream: IO[str] | None, prefix: str, timeout: float = 60.0) -> str:
    assert stream is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            raise AssertionError(f"the agent process ended before printing {prefix!r}")
        if line.startswith(prefix):
            return line.strip()
    raise AssertionError(f"no {prefix!r} within {timeout}s")


def kill9(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


@pytest.mark.arm64
def test_results_arrive_in_order_after_online_status(broker: Mosquitto, tmp_path: Path) -> None:
    dev = device_id("order")
    sub = Subscriber(broker.port, f"edge/{dev}/#")
    agent = InProcessAgent(broker.url, tmp_path, dev)
    try:
        assert agent.conn.wait_online(10), agent.conn.error
        for i in range(200):
            agent.sink.result("cam", {"output": {"i": i}}, 1)
        topic = f"edge/{dev}/cam/results"
        assert sub.wait_for(lambda: len(sub.on(topic)) >= 200)
        bodies = sub.payloads(topic)
        assert [b["seq"] for b in bodies] == list(range(1, 201))
        assert all(b["device"] == dev and b["pipeline"] == "cam" and b["ts"].endswith("Z") for b in bodies)
        status = sub.payloads(f"edge/{dev}/status")
        assert status[0]["state"] == "online" and status[0]["protocol"] == "5"
        assert sub.on(f"edge/{dev}/status")[0].retain is False or True  # live delivery clears the retain flag
        assert agent.pump.flush(10)
    finally:
        agent.stop()
    try:
        # A clean stop says so itself: `stop()` returns once the broker has it; it reaches `sub` a moment later.
        offline = sub.wait_for(
            lambda: (s := sub.on(f"edge/{dev}/status")) and json.loads(s[-1].payload)["state"] == "offline", 20
        )
        assert offline, [m.payload for m in sub.on(f"edge/{dev}/status")]
    finally:
        sub.close()


@pytest.mark.arm64
def test_10000_results_through_three_outages_none_missing(broker: Mosquitto, tmp_path: Path) -> None:
    dev = device_id("outage")
    topic = f"edge/{dev}/p/results"
    sub = Subscriber(broker.port, topic)
    proxy = TcpProxy(broker.port)
    agent = InProcessAgent(proxy.url, tmp_path, dev)
    total = 10_000
    try:
        assert agent.conn.wait_online(10), agent.conn.error

        produced = [0]
        gate = [total // 4]  # the producer waits here until the next outage has begun

        def produce() -> None:
            for i in range(total):
                while i >= gate[0]:
                    time.sleep(0.005)
                agent.sink.result("p", {"output": {"i": i}}, 1)
                produced[0] = i + 1
                if i % 10 == 0:
                    time.sleep(0.002)

        producer = threading.Thread(target=produce)
        producer.start()
        for k in range(1, 4):
            assert agent.conn.wait_online(15)
            assert wait(lambda k=k: produced[0] >= k * total // 4 - 300, 30)
            proxy.cut(refuse_for=1.0)  # mid-stream: results keep coming during the outage
            gate[0] = (k + 1) * total // 4 if k < 3 else total
            assert wait(lambda: not agent.conn.online, 5)
        producer.join()
        assert agent.conn.wait_online(15)
        # Emulated aarch64 Python runs this path about 7x slower: give delivery the time, not the loss, slack.
        delivered = sub.wait_for(lambda: len(set(seqs(sub.payloads(topic)))) >= total, timeout=240 if EMULATED else 60)
        assert delivered, f"{len(set(seqs(sub.payloads(topic))))} of {total} arrived; outbox depth {agent.outbox.depth}"
        got = seqs(sub.payloads(topic))
        assert set(got) == set(range(1, total + 1))  # every seq, none missing
        assert len(got) - total < 3 * 1000  # duplicates only from what was in flight at a cut
        assert agent.conn.connects >= 4 and proxy.refused >= 1
        assert agent.pump.flush(10) and agent.outbox.stats().dropped == 0
    finally:
        agent.stop()
        proxy.close()
        sub.close()


def test_agent_killed_during_outage_delivers_its_outbox_after_restart(broker: Mosquitto, tmp_path: Path) -> None:
    dev = device_id("kill9")
    topic = f"edge/{dev}/p/results"
    sub = Subscriber(broker.port, topic)
    proxy = TcpProxy(broker.port)
    state = tmp_path / "state"
    first = spawn(proxy.url, state, dev, 3000, rate=2000)
    try:
        read_until(first.stdout, "put 500")
        proxy.cut(refuse_for=600)  # an outage that outlasts the process
        read_until(first.stdout, "done 3000")
        kill9(first)
        delivered = set(seqs(sub.payloads(topic)))
        assert len(delivered) < 3000  # some results were only on disk when it died
        proxy.cut(refuse_for=0)  # the network is back
        second = spawn(proxy.url, state, dev, 500)
        try:
            assert read_until(second.stdout, "start") == "start 3000"  # seq goes on where it stopped
            assert sub.wait_for(lambda: len(set(seqs(sub.payloads(topic)))) >= 3500, timeout=60)
            assert set(seqs(sub.payloads(topic))) == set(range(1, 3501))
        finally:
            kill9(second)
    finally:
        if first.poll() is None:
            kill9(first)
        proxy.close()
        sub.close()


def test_last_will_offline_on_kill_and_online_on_restart(broker: Mosquitto, tmp_path: Path) -> None:
    dev = device_id("will")
    status = f"edge/{dev}/status"
    sub = Subscriber(broker.port, status)
    proc = spawn(broker.url, tmp_path, dev, 0)
    try:
        assert sub.wait_for(lambda: [p for p in sub.payloads(status) if p["state"] == "online"])
        kill9(proc)
        offline = sub.wait_for(lambda: [p for p in sub.payloads(status) if p["state"] == "offline"])
        assert offline and offline[0]["reason"] == "connection lost"
        proc = spawn(broker.url, tmp_path, dev, 0)
        assert sub.wait_for(lambda: sub.payloads(status)[-1]["state"] == "online")
        later = Subscriber(broker.port, status)  # retained: a newcomer learns the state at once
        assert later.wait_for(lambda: later.payloads(status))[-1]["state"] == "online"
        later.close()
    finally:
        if proc.poll() is None:
            kill9(proc)
        sub.close()


@pytest.mark.arm64
def test_broker_killed_and_restarted_agent_resumes_by_itself(own_broker: Mosquitto, tmp_path: Path) -> None:
    dev = device_id("brokerkill")
    agent = InProcessAgent(own_broker.url, tmp_path, dev)
    try:
        assert agent.conn.wait_online(10)
        own_broker.kill()
        assert wait(lambda: not agent.conn.online, 10)
        for i in range(50):  # produced while the broker is down
            agent.sink.result("p", {"i": i}, 1)
        own_broker.start()
        sub = Subscriber(own_broker.port, f"edge/{dev}/#")
        try:
            assert agent.conn.wait_online(15) and agent.conn.connects == 2
            assert sub.wait_for(lambda: any(p.get("state") == "online" for p in sub.payloads(f"edge/{dev}/status")))
            sub.publish(f"edge/{dev}/cmd/ping", b"{}")  # answered only if the agent subscribed again
            assert sub.wait_for(lambda: sub.payloads(f"edge/{dev}/cmd/ping/reply"))[0]["ok"] is True
            for i in range(50, 100):
                agent.sink.result("p", {"i": i}, 1)
            assert agent.pump.flush(15)
            assert sub.wait_for(lambda: seqs(sub.payloads(f"edge/{dev}/p/results"))[-1:] == [100])
        finally:
            sub.close()
    finally:
        agent.stop()


@pytest.mark.arm64
def test_outbox_bound_while_broker_down_and_the_drop_count_is_published(broker: Mosquitto, tmp_path: Path) -> None:
    # The outage is a proxy refusing the agent, so that the subscriber is on the broker before the agent
    # can publish anything: it sees every message the agent delivers.
    dev = device_id("bound")
    bound = 256 * 1024
    proxy = TcpProxy(broker.port)
    proxy.cut(refuse_for=3600)
    sub = Subscriber(broker.port, f"edge/{dev}/#")
    agent = InProcessAgent(proxy.url, tmp_path / "state", dev, outbox=OutboxConfig(max_bytes=bound))
    try:
        assert wait(lambda: agent.conn.error is not None and not agent.conn.online, 10)
        for i in range(1500):
            agent.sink.result("p", {"i": i, "pad": "x" * 400}, 1)
            assert agent.outbox.disk_bytes() <= bound
        dropped = agent.outbox.dropped
        assert dropped > 0
        agent.sink.report_drops(force=True)
        proxy.cut(refuse_for=0)  # the outage ends
        assert agent.conn.wait_online(15) and agent.pump.flush(20)
        events = sub.wait_for(lambda: [e for e in sub.payloads(f"edge/{dev}/events") if e["type"] == "outbox.dropped"])
        assert events[-1]["total"] == dropped  # (earlier drop events may themselves have been dropped)
        sub.wait_for(lambda: 1500 in seqs(sub.payloads(f"edge/{dev}/p/results")))
        got = seqs(sub.payloads(f"edge/{dev}/p/results"))
        assert got == list(range(got[0], 1501))  # the oldest went, the rest arrived in order
        assert 1 < got[0] <= dropped + 1  # (the drop count includes the first drop event, dropped too)
    finally:
        agent.stop()
        sub.close()
        proxy.close()


@pytest.mark.arm64
def test_bad_password_is_a_clear_refusal_then_the_right_one_connects(
    broker_factory: Callable[..., Mosquitto], tmp_path: Path
) -> None:
    pwfile = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pwfile), "dev1", "right"], check=True, capture_output=True)
    mosq = broker_factory(extra_conf=stay_root() + f"password_file {pwfile}\n", anonymous=False)
    secret = tmp_path / "secret"
    secret.write_text("wrong\n")
    agent = InProcessAgent(mosq.url, tmp_path / "state", "dev1", username="dev1", password_file=secret)
    try:
        assert wait(lambda: agent.conn.state == REFUSED, 10)
        assert "not authorised (check mqtt.username and mqtt.password_file" in (agent.conn.error or "")
        assert agent.conn.health()["state"] == "refused"
        secret.write_text("right\n")  # read again at each attempt: fixing the file is enough
        assert agent.conn.wait_online(15)
    finally:
        agent.stop()


def test_backoff_is_jittered_and_capped() -> None:
    # The connection's reconnect delay: agent.util.backoff's equal jitter, min(cap, first*2**n) * (0.5 + 0.5*rng()).
    assert delay(0, 0.5, 60, rng=lambda: 1.0) == 0.5
    assert delay(3, 0.5, 60, rng=lambda: 1.0) == 4.0
    assert delay(3, 0.5, 60, rng=lambda: 0.0) == 2.0
    assert delay(50, 0.5, 60, rng=lambda: 1.0) == 60.0
    assert delay(50, 0.5, 60, rng=lambda: 0.25) == 37.5


@pytest.mark.arm64
def test_protocol_auto_falls_back_to_311(tmp_path: Path, broker: Mosquitto) -> None:
    """A broker that hangs up on MQTT 5 CONNECTs (as 3.1.1-only brokers do) gets 3.1.1 next."""
    gate = V5Refuser(broker.port)
    agent = InProcessAgent(gate.url, tmp_path, device_id("fallback"))
    try:
        assert agent.conn.wait_online(15), agent.conn.error
        assert agent.conn.protocol == "3.1.1" and gate.refused >= 1
    finally:
        agent.stop()
        gate.close()


class V5Refuser(TcpProxy):
    """A proxy that closes connections whose CONNECT asks for protocol level 5."""

    def __init__(self, port: int) -> None:
        self.refused = 0
        super().__init__(port)

    def _pipe(self, a, b):  # type: ignore[no-untyped-def]
        a.settimeout(5)
        try:
            head = a.recv(64, 0x2)  # MSG_PEEK: fixed header, "MQTT", level
        except OSError:
            head = b""
        a.settimeout(None)
        idx = head.find(b"MQTT")
        if idx >= 0 and len(head) > idx + 4 and head[idx + 4] == 5:
            self.refused += 1
            a.close()
            b.close()
            return
        super()._pipe(a, b)


def test_connection_needs_no_broker_to_be_created() -> None:
    conn = Connection(MqttConfig(url="mqtt://127.0.0.1:1"), DeviceConfig(id="x"))
    assert conn.state == "stopped" and conn.topics.status == "edge/x/status" and conn.client_id == "x"


@pytest.mark.arm64
def test_a_broker_that_never_answers_connect_is_given_up_and_auto_tries_3_1_1(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import socket

    monkeypatch.setattr(connection_module, "CONNECT_TIMEOUT", 1.0)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts TCP (the kernel does), never reads or answers
    port = silent.getsockname()[1]
    conn = Connection(
        MqttConfig(url=f"mqtt://127.0.0.1:{port}"),
        DeviceConfig(id="silent", state_dir=tmp_path),
        reconnect_min=0.05,
        reconnect_max=0.2,
    )
    conn.start()
    try:
        assert wait(lambda: conn.error and "no CONNACK" in conn.error, 10), conn.error
        assert "no answer to CONNECT within 1 s" in conn.error
        assert wait(lambda: conn.protocol == "3.1.1", 5)  # auto: MQTT 5 got no answer, so 3.1.1 is tried next
    finally:
        conn.stop()
        silent.close()


# ---- the fenced paho patch (agent/transport/pahopatch.py) ---------------------------------------------


def test_the_network_loop_sends_small_packets_at_once(broker: Mosquitto, tmp_path: Path) -> None:
    """Nagle off on the agent's and the fleet client's sockets (agent/transport/netloop.py): a command's reply,
    written right after its PUBACK, waited for the broker's delayed ACK of the PUBACK (a ping round trip: 43 ms
    at the median, 1.4 ms without)."""
    import socket

    from agent.cloud.fleet.client import BrokerClient, BrokerSettings

    agent = InProcessAgent(broker.url, tmp_path, device_id("nodelay"))
    fleet = BrokerClient(BrokerSettings(broker.url)).connect()
    try:
        assert agent.conn.wait_online(10), agent.conn.error
        for sock in (agent.conn._client.socket(), fleet.client.socket()):
            assert sock is not None
            assert wait_for(lambda sock=sock: sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 5)
    finally:
        fleet.close()
        agent.stop()


def test_paho_patch_is_active_on_the_pinned_paho() -> None:
    """Every paho release that pyproject allows must keep the patch on (scripts/test-paho.sh runs the lowest)."""
    assert pahopatch.surface_differences() == []
    assert pahopatch.PATCHED and pahopatch.CLIENT_CLASS is not paho.Client
    expected = os.environ.get("EDGE_AGENT_EXPECT_PAHO")
    if expected:  # set by scripts/test-paho.sh: this run really is against that release
        assert pahopatch.PAHO_VERSION == expected


def test_the_patched_client_hands_on_every_publish_as_stock_paho_does(broker: Mosquitto) -> None:
    """`_handle_publish`'s fast path (MQTT 5, QoS 0, no properties: one shared empty property set) and the
    stock path behind it give on_message what stock paho gives: topic, payload, QoS, retain, properties."""
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from agent.transport.netloop import NetworkLoop

    base = f"edge/{device_id('fastpath')}"
    with_props = Properties(PacketTypes.PUBLISH)
    with_props.ContentType = "application/json"
    with_props.UserProperty = [("k", "v")]
    publisher = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    publisher.connect("127.0.0.1", broker.port)
    publisher.loop_start()
    publisher.publish(f"{base}/kept", b"retained", qos=0, retain=True).wait_for_publish(5)
    sent = [(f"{base}/plain", b"a", 0, None), (f"{base}/props", b"b", 0, with_props), (f"{base}/q1", b"c", 1, None),
            (f"{base}/empty", b"", 0, None), (f"{base}/\u00fc", b"d" * 70000, 0, None)]  # fmt: skip
    seen: dict[type, list[tuple[object, ...]]] = {}
    fast: list[str] = []
    for cls in (pahopatch.CLIENT_CLASS, paho.Client):
        got = seen[cls] = []
        loop = NetworkLoop()
        loop.open()
        client = cls(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        loop.attach(client)

        def on_message(_c: paho.Client, _u: object, m: paho.MQTTMessage, got: list[tuple[object, ...]] = got) -> None:
            got.append((m.topic, m.payload, m.qos, m.retain, m.properties.json() if m.properties else None))
            if m.properties is pahopatch._PUBLISH_NO_PROPERTIES:
                fast.append(m.topic)

        client.on_message = on_message
        client.connect("127.0.0.1", broker.port)
        client.subscribe(f"{base}/#", qos=1)
        deadline = time.monotonic() + 10
        while len(got) < 1 and time.monotonic() < deadline:  # the retained one: subscribed
            loop.turn(client, 0.05)
        for topic, payload, qos, props in sent:
            publisher.publish(topic, payload, qos=qos, properties=props).wait_for_publish(5)
        while len(got) < 1 + len(sent) and time.monotonic() < deadline:
            loop.turn(client, 0.05)
        client.disconnect()
        loop.close()
    publisher.publish(f"{base}/kept", b"", retain=True).wait_for_publish(5)
    publisher.disconnect()
    publisher.loop_stop()
    assert len(seen[paho.Client]) == 1 + len(sent)
    assert seen[pahopatch.CLIENT_CLASS] == seen[paho.Client]
    assert sorted(fast) == sorted([f"{base}/kept", f"{base}/plain", f"{base}/empty", f"{base}/\u00fc"])


def _sock_recv_with_flags(self: paho.Client, bufsize: int, flags: int = 0) -> bytes:
    return b""


def _init_without_mutex(self: paho.Client, *args: object, **kwargs: object) -> None:
    STOCK_INIT(self, *args, **kwargs)  # type: ignore[arg-type]
    del self._out_message_mutex


STOCK_INIT = paho.Client.__init__


@pytest.mark.parametrize(
    ("name", "replacement", "named"),
    [
        (
            "_sock_recv",
            _sock_recv_with_flags,
            "_sock_recv(self, bufsize, flags=0) instead of _sock_recv(self, bufsize)",
        ),
        ("_do_on_publish", None, "_do_on_publish is gone"),
        ("_handle_publish", None, "_handle_publish is gone"),
        ("__init__", _init_without_mutex, "attribute _out_message_mutex is gone"),
    ],
)
def test_a_changed_paho_surface_falls_back_to_stock_paho_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, name: str, replacement: object, named: str
) -> None:
    if replacement is None:
        monkeypatch.delattr(paho.Client, name)
    else:
        monkeypatch.setattr(paho.Client, name, replacement)
    with caplog.at_level(logging.WARNING, logger="agent.transport.pahopatch"):
        chosen = pahopatch.choose_client_class()
    assert chosen is paho.Client
    warnings = [r for r in caplog.records if r.name == "agent.transport.pahopatch"]
    assert len(warnings) == 1 and named in warnings[0].getMessage()
    assert "using stock paho" in warnings[0].getMessage()


@pytest.mark.arm64
def test_stock_paho_fallback_delivers_in_order_and_stops_cleanly(
    broker: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pahopatch, "CLIENT_CLASS", paho.Client)
    dev = device_id("stock")
    sub = Subscriber(broker.port, f"edge/{dev}/#")
    agent = InProcessAgent(broker.url, tmp_path, dev)
    try:
        assert type(agent.conn._client) is paho.Client
        assert agent.conn.wait_online(10), agent.conn.error
        for i in range(500):
            agent.sink.result("p", {"i": i}, 1)
        assert agent.pump.flush(20)
        topic = f"edge/{dev}/p/results"
        assert sub.wait_for(lambda: len(sub.on(topic)) >= 500)
        assert seqs(sub.payloads(topic)) == list(range(1, 501))
    finally:
        agent.stop()
    try:
        status = f"edge/{dev}/status"
        # A clean DISCONNECT: the broker keeps the agent's own `offline`, it does not publish the Will.
        assert sub.wait_for(lambda: sub.payloads(status)[-1]["state"] == "offline")
        time.sleep(0.5)
        assert sub.payloads(status)[-1].get("reason") == "stopped"
    finally:
        sub.close()


@pytest.mark.parametrize("patched", [True, False], ids=["patched", "stock"])
def test_the_brokers_receive_maximum_becomes_the_in_flight_window(
    broker_factory: Callable[..., Mosquitto], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, patched: bool
) -> None:
    """Mosquitto's max_inflight_messages is the Receive Maximum of its CONNACK; sending more breaks MQTT 5 3.3.4."""
    if not patched:
        monkeypatch.setattr(pahopatch, "CLIENT_CLASS", paho.Client)
    mosq = broker_factory(extra_conf="max_inflight_messages 5\n")
    dev = device_id("recvmax")
    sub = Subscriber(mosq.port, f"edge/{dev}/p/results")
    agent = InProcessAgent(mosq.url, tmp_path, dev)
    try:
        assert agent.conn.wait_online(10), agent.conn.error
        assert agent.conn.inflight_limit == 5 and agent.conn._client.max_inflight_messages == 5
        # Stock paho cannot lower its window on a live connection: it connects once more with a new client.
        assert agent.conn.connects == 1 and agent.conn.generation == (0 if patched else 1)
        for i in range(300):
            agent.sink.result("p", {"i": i}, 1)
        assert agent.pump.flush(20)
        assert sub.wait_for(lambda: len(sub.on(f"edge/{dev}/p/results")) >= 300)
        assert seqs(sub.payloads(f"edge/{dev}/p/results")) == list(range(1, 301))
    finally:
        agent.stop()
        sub.close()
