"""The broker compatibility suite: the same cases, with a real agent (`edge-agent run`) and a real `edge-agent
fleet deploy`, on every broker this machine's package sources install, each started by its fixture on a
free port (tests/helpers/brokers/): Mosquitto, RabbitMQ's MQTT plugin, ejabberd's mod_mqtt, amqtt.

One agent per broker, shared by the cases in order (module scope): it connects through a TCP proxy that
can cut it off; a subscriber straight to the broker sees what arrives. Each case records its outcome
(pass, limited: works with a limitation of the broker said in a note, fail, skip); with
EDGE_AGENT_BROKER_RESULTS=1 the outcomes go to tests/fixtures/brokers-results.json and into
docs/brokers.md's table, which `test_docs_table_matches_the_results` keeps in step.
"""

from __future__ import annotations

import functools
import json
import logging
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, get_args

import numpy as np
import paho.mqtt.client as paho
import pytest

from agent.config.errors import ProfileError
from agent.config.presets import PRESETS, PresetName
from agent.config.profile import DeviceConfig, MqttConfig, load_profile
from agent.transport.connection import Connection
from agent.transport.limits import RATE_SAFETY, Limits, Negotiation
from agent.transport.outbox import open_outbox
from agent.transport.pump import OutboxPump
from agent.transport.refusals import QOS_NOT_SUPPORTED, RETAIN_NOT_SUPPORTED, UNSUPPORTED_PROTOCOL
from agent.transport.sinks.outbox import OutboxSink
from agent.util.ratelimit import RateLimit
from tests.helpers.agent_proc import InProcessAgent
from tests.helpers.broker import Mosquitto
from tests.helpers.brokers import BROKERS
from tests.helpers.brokers.base import Broker
from tests.helpers.brokers.results import DOC, RESULTS_FILE, Results, with_table
from tests.helpers.daemon_proc import REPO, AgentProcess, sensor_csv
from tests.helpers.models import linear_model, save
from tests.helpers.mqtt_client import Subscriber, seqs
from tests.helpers.registry import Registry, make_registry
from tests.helpers.tcpproxy import TcpProxy
from tests.helpers.waiting import wait_for

pytestmark = pytest.mark.slow

DEVICE, GROUP = "compat-1", "compat"
BASE = f"edge/{DEVICE}"
# The cases, in the order they run on each broker, as docs/brokers.md's table names them.
CASES = {
    "connect": "connects: MQTT 5, or 3.1.1 said in one line when the broker refuses 5",
    "results": "results arrive in order, `seq` without gap or repeat",
    "retained_status": "retained `online` status, read by a new subscriber and by `edge-agent fleet status`",
    "commands": "a command answered on `cmd/<name>/reply` (MQTT 5: on the response topic, correlated)",
    "deploy": "a deployment order from `edge-agent fleet deploy` followed to `model.active`",
    "outage": "connection cut for 2 s: the Will, a reconnect, no result lost",
    "will_restart": "kill -9: the broker publishes the offline Will; after a restart `seq` goes on",
}
RESULTS = Results(CASES)


@dataclass
class Stack:
    """One broker, with a registry, a proxy, one agent and a subscriber to everything the agent sends."""

    broker: Broker
    registry: Registry
    proxy: TcpProxy
    agent: AgentProcess
    sub: Subscriber
    tmp: Path
    closers: list[Callable[[], None]] = field(default_factory=list)

    def subscriber(self, *topics: str) -> Subscriber:
        b = self.broker
        sub = Subscriber(
            b.port,
            *topics,
            username=b.username,
            password=b.password,
            protocol=paho.MQTTv5 if b.mqtt5 else paho.MQTTv311,
        )
        self.closers.append(sub.close)
        return sub

    def results(self) -> list[dict[str, Any]]:
        return self.sub.payloads(f"{BASE}/p/results")

    def statuses(self) -> list[dict[str, Any]]:
        return [s for s in self.sub.payloads(f"{BASE}/status") if s]

    def wait(self, check: Callable[[], Any], timeout: float, what: str) -> Any:
        value = wait_for(check, timeout, interval=0.1)
        assert value, f"{self.broker.name}: timed out waiting for {what}\n{self.agent.stderr()[-3000:]}"
        return value

    def fleet(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`edge-agent fleet ...` straight to the broker, with its credentials."""
        creds: list[str] = []
        if self.broker.username:
            secret = self.tmp / "fleet-password"
            secret.write_text(self.broker.password or "")
            creds = ["--username", self.broker.username, "--password-file", str(secret)]
        return subprocess.run(
            [sys.executable, "-m", "agent", "fleet", *args, "--broker", self.broker.url, *creds],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=180,
        )


def linear(tmp: Path, name: str, weight: float) -> Path:
    return save(linear_model(np.full((3, 1), weight)), tmp / f"{name}.onnx")


def no_gap(values: list[int]) -> list[int]:
    """The seqs missing between the first and the last seen."""
    return sorted(set(range(min(values), max(values) + 1)) - set(values))


@pytest.fixture(scope="module")
def recorded() -> Iterator[Results]:
    """Every case's outcome on every broker; saved at the end when EDGE_AGENT_BROKER_RESULTS asks."""
    yield RESULTS
    RESULTS.save()


@pytest.fixture(scope="module")
def booting(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, tuple[Broker, Future[object]]]]:
    """Brokers that take seconds to boot (RabbitMQ: ~10 s), started in the background when the module
    begins, so that they are up by the time their cases come (only those the run selected)."""
    selected = {item.callspec.params.get("stack") for item in request.session.items if hasattr(item, "callspec")}
    pool = ThreadPoolExecutor(max_workers=2)
    booting: dict[str, tuple[Broker, Future[object]]] = {}
    for name, cls in BROKERS.items():
        if cls.slow_start and name in selected and not cls.missing():
            broker = cls(tmp_path_factory.mktemp(name) / "broker")
            booting[name] = (broker, pool.submit(broker.start))
    yield booting
    for broker, started in booting.values():
        started.exception()  # wait for it: a broker stopped while it boots would be left running
        broker.stop()
    pool.shutdown()


@pytest.fixture(scope="module", params=list(BROKERS))
def stack(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    recorded: Results,
    booting: dict[str, tuple[Broker, Future[object]]],
) -> Iterator[Stack]:
    cls = BROKERS[request.param]
    missing = cls.missing()
    if missing:
        recorded.broker(cls.name, "not installed")
        for name in CASES:
            recorded.record(cls.name, name, "skip", missing)
        pytest.skip(f"{cls.name}: {missing}")
    tmp = tmp_path_factory.mktemp(cls.name)
    broker: Broker
    if cls.name in booting:
        broker, started = booting[cls.name]
        started.result()
    else:
        broker = cls(tmp / "broker")
        broker.start()
    registry = make_registry(tmp / "registry")
    registry.publish("m", "1.0.0", linear(tmp, "v1", 1.0), channel="stable")
    proxy = TcpProxy(broker.port)
    creds = {"username": broker.username, "password": broker.password} if broker.username else {}
    agent = AgentProcess(
        tmp,
        DEVICE,
        GROUP,
        proxy.url,
        registry.url,
        registry.public_key,
        csv=sensor_csv(tmp / "sensor.csv"),
        rate=20,
        mqtt5=broker.mqtt5,
        mqtt=creds,
    )
    proto = paho.MQTTv5 if broker.mqtt5 else paho.MQTTv311
    sub = Subscriber(broker.port, f"{BASE}/#", username=broker.username, password=broker.password, protocol=proto)
    recorded.broker(cls.name, cls.version())
    agent.start()
    built = Stack(broker, registry, proxy, agent, sub, tmp)
    try:
        # The daemon subscribes to commands last, then says agent.started: a case that sends a command
        # before then (the first one a worker runs) would send it to nobody.
        events = f"{BASE}/events"
        built.wait(lambda: any(e.get("type") == "agent.started" for e in sub.payloads(events)), 60, "agent.started")
        yield built
    finally:
        agent.stop()
        for close in [*built.closers, sub.close, proxy.close, registry.server.stop, broker.stop]:
            close()


def case(name: str) -> Callable[[Callable[[Stack], str | tuple[str, str] | None]], Callable[[Stack], None]]:
    """Record the case's outcome on the stack's broker: what it returns (None: pass; a note: pass with it;
    ("limited", note)), or fail and skip as pytest saw them."""

    def wrap(test: Callable[[Stack], str | tuple[str, str] | None]) -> Callable[[Stack], None]:
        @functools.wraps(test)
        def run(stack: Stack) -> None:
            broker = stack.broker.name
            try:
                returned = test(stack)
            except pytest.skip.Exception as exc:
                RESULTS.record(broker, name, "skip", str(exc))
                raise
            except BaseException:
                RESULTS.record(broker, name, "fail")
                raise
            outcome, note = returned if isinstance(returned, tuple) else ("pass", returned or "")
            RESULTS.record(broker, name, outcome, note)

        return run

    return wrap


@case("connect")
def test_connect(stack: Stack) -> str:
    online = stack.wait(lambda: [s for s in stack.statuses() if s["state"] == "online"], 60, "online status")
    protocol = online[0]["protocol"]
    RESULTS.brokers[stack.broker.name]["protocol"] = protocol
    said = [line for line in stack.agent.stderr().splitlines() if "does not take MQTT 5" in line]
    if stack.broker.mqtt5:
        assert protocol == "5" and not said, (online, said)
        return ""
    assert protocol == "3.1.1" and len(said) == 1, (online, said)
    return "the broker refuses MQTT 5: the agent falls back to 3.1.1 at its first connect and says so in one line"


@case("results")
def test_results_in_order(stack: Stack) -> None:
    rows = stack.wait(lambda: len(stack.results()) >= 30 and stack.results(), 60, "30 results")
    got = seqs(rows)
    assert got == list(range(got[0], got[0] + len(got))), got
    assert {"device", "pipeline", "seq", "ts", "model_version", "output"} <= rows[0].keys(), rows[0]


@case("retained_status")
def test_retained_status(stack: Stack) -> tuple[str, str] | None:
    exact = stack.subscriber(f"{BASE}/status")
    online = exact.wait_for(lambda: [p for p in exact.payloads(f"{BASE}/status")[-1:] if p["state"] == "online"], 10)
    assert online and exact.on(f"{BASE}/status")[0].retain, exact.payloads(f"{BASE}/status")
    wildcard = stack.subscriber("edge/+/status")
    retained_through_wildcards = wildcard.wait_for(lambda: wildcard.payloads(f"{BASE}/status"), 3)
    # `fleet status` reads edge/+/status and edge/+/health; 2 s is longer than the agent's health.interval.
    out = stack.fleet("status", "--json", "--settle", "2s")
    assert out.returncode == 0, out.stdout + out.stderr
    devices = {d["device"]: d for d in json.loads(out.stdout)["devices"]}
    assert DEVICE in devices, out.stdout
    if retained_through_wildcards:
        assert devices[DEVICE]["state"] == "online", devices
        return None
    return (
        "limited",
        "retained messages reach exact-topic subscriptions only, never `edge/+/status`: the agent's own deploy "
        "topics are exact and get their orders, but `fleet status` and group deployments know a device only from "
        "the health it publishes while they listen (its state unknown): deploy to `device:ID`, or give `--settle` "
        "more than the devices' `health.interval`",
    )


@case("commands")
def test_commands(stack: Stack) -> None:
    sub = stack.sub
    before = len(sub.on(f"{BASE}/cmd/ping/reply"))
    sub.publish(f"{BASE}/cmd/ping", "{}")
    stack.wait(lambda: len(sub.on(f"{BASE}/cmd/ping/reply")) > before, 20, "the ping reply")
    assert json.loads(sub.on(f"{BASE}/cmd/ping/reply")[-1].payload)["ok"] is True
    if stack.broker.mqtt5:
        topic = f"replies/{uuid.uuid4().hex[:8]}"
        replies = stack.subscriber(topic)
        replies.publish(f"{BASE}/cmd/ping", "{}", response_topic=topic, correlation=b"c-42")
        msg = stack.wait(lambda: replies.on(topic), 20, "the reply on the response topic")[0]
        assert json.loads(msg.payload)["ok"] is True and msg.properties.CorrelationData == b"c-42"


@case("deploy")
def test_deploy_order(stack: Stack) -> None:
    stack.registry.publish("m", "2.0.0", linear(stack.tmp, "v2", 2.0), channel=None)
    out = stack.fleet(
        "deploy",
        "--model",
        "m",
        "--version",
        "2.0.0",
        "--to",
        f"device:{DEVICE}",
        "--key",
        str(stack.registry.key),
        "--wait",
        "90s",
        "--settle",
        "0.5s",
    )
    assert out.returncode == 0, out.stdout + out.stderr + stack.agent.stderr()[-3000:]
    stack.wait(
        lambda: any(r["model_version"] == "2.0.0" for r in stack.results()[-5:]), 30, "results from version 2.0.0"
    )


@case("outage")
def test_outage_and_reconnect(stack: Stack) -> None:
    online = len([s for s in stack.statuses() if s["state"] == "online"])
    last = max(seqs(stack.results()))
    stack.proxy.cut(refuse_for=2.0)
    stack.wait(lambda: any(s.get("reason") == "connection lost" for s in stack.statuses()), 20, "the Will")
    stack.wait(lambda: len([s for s in stack.statuses() if s["state"] == "online"]) > online, 30, "a reconnect")
    stack.wait(lambda: max(seqs(stack.results())) > last + 20, 30, "results after the reconnect")
    got = seqs(stack.results())
    assert not no_gap(got), f"lost: {no_gap(got)[:20]}"  # repeats are QoS 1's right after a reconnect


@case("will_restart")
def test_will_then_restart(stack: Stack) -> None:
    wills = len([s for s in stack.statuses() if s.get("reason") == "connection lost"])
    stack.agent.kill9()
    stack.wait(
        lambda: len([s for s in stack.statuses() if s.get("reason") == "connection lost"]) > wills, 20, "the Will"
    )
    last = max(seqs(stack.results()))
    stack.agent.start()
    stack.wait(lambda: max(seqs(stack.results())) > last + 10, 60, "results after the restart")
    got = seqs(stack.results())
    assert not no_gap(got), f"lost across the restart: {no_gap(got)[:20]}"


def test_docs_table_matches_the_results() -> None:
    """docs/brokers.md shows the committed results (regenerate: python -m tests.helpers.brokers.results)."""
    results = json.loads(RESULTS_FILE.read_text())
    assert list(results["cases"]) == list(CASES) and set(results["brokers"]) == set(BROKERS)
    assert DOC.read_text() == with_table(DOC.read_text(), results)


# ---- what a broker allows: limits announced in CONNACK, and the managed brokers' presets ---------------


def test_limits_a_broker_announces_are_said_in_one_line_and_kept(
    broker_factory: Callable[..., Mosquitto], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker without retained messages, with QoS 0 only and 2000-byte packets (Mosquitto's
    retain_available, max_qos, max_packet_size): one line at connect, not again on a reconnect; status
    unretained, results at QoS 0, a message over the packet size refused and counted, never sent (the
    broker would close the connection)."""
    broker = broker_factory("retain_available false\nmax_qos 0\nmax_packet_size 2000\n")
    proxy = TcpProxy(broker.port)
    sub = Subscriber(broker.port, "edge/lim/#")
    caplog.set_level(logging.INFO, logger="agent")
    agent = InProcessAgent(proxy.url, tmp_path / "state", "lim")
    try:
        assert agent.conn.wait_online(15), agent.conn.error
        said = [r for r in caplog.records if "the broker at" in r.getMessage()]
        assert len(said) == 1 and said[0].levelno == logging.WARNING, said
        line = said[0].getMessage()
        assert "no retained messages" in line and "QoS 0 only" in line and "packets up to 2000 bytes" in line, line
        for x in (1, "y" * 3000, 2):
            agent.sink.result("p", {"output": {"x": x}}, 1)
        assert wait_for(lambda: len(sub.on("edge/lim/p/results")) == 2, 10)
        assert [r["output"]["x"] for r in sub.payloads("edge/lim/p/results")] == [1, 2]
        assert {m.qos for m in sub.on("edge/lim/p/results")} == {0} and agent.pump.rejected == 1
        late = Subscriber(broker.port, "edge/lim/status")
        time.sleep(0.5)
        late.close()
        assert not late.messages, "a status was retained by a broker that keeps none"
        proxy.cut()
        assert wait_for(lambda: agent.conn.connects == 2 and agent.conn.online, 15)
        assert len([r for r in caplog.records if "the broker at" in r.getMessage()]) == 1
    finally:
        agent.stop()
        sub.close()
        proxy.close()


def test_a_command_reply_over_the_packet_size_is_logged_with_that_reason(
    broker_factory: Callable[..., Mosquitto], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The connection refuses a reply the broker would close the connection for; the dispatcher's line says
    so (not "offline": it is online)."""
    broker = broker_factory("max_packet_size 2000\n")
    agent = InProcessAgent(broker.url, tmp_path / "state", "big")
    agent.commands.register("big", lambda args: {"pad": "z" * 3000})
    sub = Subscriber(broker.port, "edge/big/cmd/+/reply")
    try:
        assert agent.conn.wait_online(15), agent.conn.error
        sub.publish("edge/big/cmd/big", json.dumps({"id": "1"}))
        said = wait_for(lambda: [r for r in caplog.records if "command reply to" in r.getMessage()], 10)
        assert said, caplog.text
        line = said[0].getMessage()
        assert line.startswith("command reply to edge/big/cmd/big/reply not sent: a ") and line.endswith(
            "-byte packet, over the broker's Maximum Packet Size of 2000 bytes"
        ), line
        assert not sub.messages
    finally:
        agent.stop()
        sub.close()


def test_aws_preset_on_a_broker_with_its_packet_limit(broker_factory: Callable[..., Mosquitto], tmp_path: Path) -> None:
    """Mosquitto limited like AWS IoT Core (128 KiB payloads): results go several to a message, split under
    the limit with `seq` unbroken; a result that cannot fit is refused with a `sink.error` event before it
    takes a seq; the broker never has to close the connection."""
    broker = broker_factory(f"max_packet_size {128 * 1024 + 512}\n")
    mqtt = MqttConfig(url=broker.url, preset="aws-iot-core", keepalive=30)
    conn = Connection(mqtt, DeviceConfig(id="aws1", state_dir=tmp_path), reconnect_min=0.05, reconnect_max=0.5)
    outbox = open_outbox(tmp_path, mqtt.outbox)
    pump = OutboxPump(conn, outbox).start()
    pipeline = SimpleNamespace(name="p", batch=SimpleNamespace(size=1, max_delay=0.0))
    sink = OutboxSink.for_profile(outbox, conn.topics, mqtt, [pipeline]).start()  # type: ignore[list-item]
    sub = Subscriber(broker.port, "edge/aws1/#")
    conn.start()
    try:
        assert conn.wait_online(15), conn.error
        for i in range(300):
            sink.result("p", {"output": {"i": i, "pad": "x" * 1000}}, 1)
        sink.result("p", {"output": {"big": "y" * 200_000}}, 1)
        for i in range(300, 310):
            sink.result("p", {"output": {"i": i}}, 1)
        sink.flush()
        assert wait_for(lambda: outbox.depth == 0 and len(seqs(sub.payloads("edge/aws1/p/results"))) == 310, 20)
        messages = sub.on("edge/aws1/p/results")
        assert max(len(m.payload) for m in messages) <= 128 * 1024 < sum(len(m.payload) for m in messages)
        assert all("results" in json.loads(m.payload) for m in messages) and len(messages) < 50
        assert seqs(sub.payloads("edge/aws1/p/results")) == list(range(1, 311))
        refused = [e for e in sub.payloads("edge/aws1/events") if e["type"] == "sink.error"]
        assert len(refused) == 1 and "over the 128KiB payloads the broker takes" in refused[0]["reason"], refused
        assert conn.connects == 1 and pump.rejected == 0
    finally:
        sink.stop()
        conn.stop()
        pump.stop()
        outbox.close()
        sub.close()


class _Counted:
    """The connection as the pump sees it, on a fake clock: every publish is timed, every one acknowledged."""

    def __init__(self, limits: Limits, clock: Callable[[], float]) -> None:
        self.generation, self.online, self.limits = 0, True, limits
        self.rate = limits.rate_limit(clock)
        self.clock = clock
        self.sent: list[float] = []
        self._acks: list[Callable[[int, bool], None]] = []

    def add_ack_listener(self, listener: Callable[[int, bool], None]) -> None:
        self._acks.append(listener)

    def add_loop_hook(self, hook: Callable[[], None]) -> None:
        pass

    def wake(self) -> None:
        pass

    def publish_raw(self, topic: str, payload: bytes, qos: int, retain: bool) -> tuple[int, bool]:
        self.sent.append(self.clock())
        mid = len(self.sent)
        for listener in self._acks:
            listener(mid, True)  # acknowledged at once: only the rate holds the pump back
        return mid, True


def test_pump_stays_under_the_preset_publish_rate_on_a_fake_clock(tmp_path: Path) -> None:
    """AWS IoT Core takes 100 publishes per second on a connection: a backlog of 1000 messages goes out at
    no more than 90 in any one-second window (the safety margin), and at that pace."""
    now = [1000.0]
    conn = _Counted(Limits(preset=PRESETS["aws-iot-core"]), lambda: now[0])
    outbox = open_outbox(tmp_path)
    for _ in range(1000):
        outbox.put_sequenced("results/p", "edge/x/p/results", lambda seq: b'{"seq": %d}' % seq)
    pump = OutboxPump(conn, outbox, clock=lambda: now[0])  # type: ignore[arg-type]
    try:
        while now[0] < 1006:
            now[0] += 0.01
            pump.step()
        sent = conn.sent
        busiest = max(sum(1 for u in sent[i:] if u - t < 1.0) for i, t in enumerate(sent))
        assert busiest == int(100 * RATE_SAFETY) and len(sent) >= 6 * busiest - 1, (busiest, len(sent))
    finally:
        outbox.close()


def test_rate_limit_is_a_sliding_window() -> None:
    now = [0.0]
    limit = RateLimit(3, 100, clock=lambda: now[0])
    assert [limit.allow(10) for _ in range(4)] == [True, True, True, False]
    now[0] = 0.99
    assert not limit.allow(10)  # a bucket refilled at 3/s would let one through here
    now[0] = 1.0
    assert limit.allow(95) and not limit.allow(10)  # the three expired; then 100 bytes is the bound
    limit.record(500)  # sent anyway (a direct publish): the window holds it
    now[0] = 1.5
    assert not limit.allow(1)
    now[0] = 2.0
    assert limit.allow(1)


def test_a_refused_will_is_sent_again_without_what_the_broker_refused() -> None:
    neg = Negotiation("auto", None)
    assert neg.after_refusal(RETAIN_NOT_SUPPORTED, first=True) and neg.will == (1, False)
    assert neg.after_refusal(QOS_NOT_SUPPORTED, first=True) and neg.will == (0, False)
    assert not neg.after_refusal(RETAIN_NOT_SUPPORTED, first=True)  # nothing left to drop: final
    assert neg.after_refusal(UNSUPPORTED_PROTOCOL, first=True) and neg.protocol == "3.1.1" and neg.mqtt5_refused
    assert not neg.after_refusal(UNSUPPORTED_PROTOCOL, first=True)  # 3.1.1 refused too: final


def test_preset_names_are_the_profile_choices() -> None:
    assert get_args(PresetName) == tuple(PRESETS)


PRESET_PROFILE = """\
device: {id: gate.cam, group: north}
mqtt:
  url: mqtt://broker.example.com
  preset: aws-iot-core
  client_id: gate-cam
  topic_prefix: site/a/b/c/{long}
  keepalive: 10s
pipelines:
  - name: a-pipeline-with-a-name-of-fifty-characters-or-so
    model: m.onnx
    source: {type: synthetic}
""".replace("{long}", "e" * 190)


def test_check_refuses_what_the_preset_does_not_allow_each_located(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(PRESET_PROFILE)
    with pytest.raises(ProfileError) as caught:
        load_profile(path)
    got = {(i.line, i.path): i.message for i in caught.value.issues}
    assert got[(3, "mqtt.url")] == "AWS IoT Core takes TLS connections only: use mqtts://"
    assert got[(7, "mqtt.keepalive")] == "AWS IoT Core takes a keepalive from 30s to 1200s"
    assert "the client id must be the thing name" in got[(5, "mqtt.client_id")]
    assert got[(6, "mqtt.topic_prefix")].startswith("AWS IoT Core allows 7 '/' in a topic; 'site/a/b/c/eee")
    assert got[(6, "mqtt.topic_prefix")].endswith("/gate.cam/cmd/snapshot/reply' has 8")
    assert got[(9, "pipelines[0].name")].startswith("AWS IoT Core allows topics of 256 bytes; 'site/a/b/c/eee")
    assert got[(9, "pipelines[0].name")].endswith("-so/results' has 267")
    fixed = PRESET_PROFILE.replace("mqtt://", "mqtts://").replace("keepalive: 10s", "keepalive: 60s")
    fixed = fixed.replace("site/a/b/c/" + "e" * 190, "edge").replace("client_id: gate-cam", "tls: {ca: ca.pem}")
    path.write_text(fixed)
    (tmp_path / "ca.pem").write_text("")
    with pytest.raises(ProfileError) as caught:
        load_profile(path)
    assert [(i.line, i.path) for i in caught.value.issues] == [(1, "device.id")]  # '.' is no thing name
    path.write_text(path.read_text().replace("gate.cam", "gate-cam"))
    assert load_profile(path).mqtt.preset == "aws-iot-core"  # type: ignore[union-attr]
