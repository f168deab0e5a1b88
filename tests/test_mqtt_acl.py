"""The broker set-up of docs/mqtt.md, used as written: who may be whom, and who may write what.

The ```conf and ```acl blocks of docs/mqtt.md run in a real Mosquitto: only the listeners' ports and
the files' paths are put in. Each attack the documented set-up must stop is a test of its own.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.config.profile import DeviceConfig, MqttConfig
from agent.transport.connection import Connection
from tests.helpers.broker import Mosquitto, free_port, wait_port
from tests.helpers.mqtt_client import Subscriber

REPO = Path(__file__).resolve().parent.parent
USERS = {"devices": ("dev-a", "dev-b"), "fleet": ("fleet",)}


def documented(lang: str) -> str:
    text = (REPO / "docs" / "mqtt.md").read_text()
    match = re.search(rf"```{lang}\n(.*?)```", text, re.S)
    assert match, f"docs/mqtt.md has no ```{lang} block"
    return match.group(1)


def documented_acl() -> str:
    return documented("acl")


@dataclass
class AclBroker:
    """The documented Mosquitto: `port`/`url` is the devices' listener, `fleet_port`/`fleet_url` the cloud's."""

    mosq: Mosquitto
    fleet_port: int

    @property
    def port(self) -> int:
        return self.mosq.port

    @property
    def url(self) -> str:
        return self.mosq.url

    @property
    def fleet_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.fleet_port}"


def acl_broker(broker_factory: Callable[..., Mosquitto], tmp_path: Path) -> AclBroker:
    acl = tmp_path / "edge-agent.acl"
    acl.write_text(documented_acl())
    files = {}
    for listener, users in USERS.items():
        files[listener] = tmp_path / f"{listener}.passwd"
        for i, user in enumerate(users):
            cmd = ["mosquitto_passwd", "-b"] + (["-c"] if i == 0 else []) + [str(files[listener]), user, f"pw-{user}"]
            subprocess.run(cmd, check=True, capture_output=True)
    mosq = broker_factory(anonymous=False, start=False)
    fleet_port = free_port()
    conf = documented("conf")
    for written, here in (
        ("listener 8883\n", f"listener {mosq.port} 127.0.0.1\n"),
        ("listener 8884\n", f"listener {fleet_port} 127.0.0.1\n"),
        ("/etc/mosquitto/devices.passwd", str(files["devices"])),
        ("/etc/mosquitto/fleet.passwd", str(files["fleet"])),
        ("/etc/mosquitto/edge-agent.acl", str(acl)),
    ):
        assert written in conf, f"docs/mqtt.md's ```conf block no longer says {written!r}"
        conf = conf.replace(written, here)
    mosq.conf = conf
    mosq.extra_conf = "user root\n" if os.geteuid() == 0 else ""  # root drops to `mosquitto`, who cannot read tmp
    mosq.start()
    wait_port(fleet_port)
    return AclBroker(mosq, fleet_port)


def fleet_subscriber(broker: AclBroker, *topics: str) -> Subscriber:
    return Subscriber(broker.fleet_port, *topics, username="fleet", password="pw-fleet")


def status(device: str, state: str) -> bytes:
    return json.dumps({"device": device, "group": "g", "state": state, "reason": "connection lost"}).encode()


class Client:
    """A paho client as a device (or an attacker) would run it, recording what happens to its session."""

    def __init__(self, port: int, user: str, client_id: str | None = None, will: bool = False) -> None:
        self.acks: list[tuple[int, bool]] = []
        self.connacks: list[int] = []
        self.drops: list[str] = []
        self._ready = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or user, protocol=paho.MQTTv5)
        self.client.username_pw_set(user, f"pw-{user}")
        if will:
            self.client.will_set(f"edge/{user}/status", status(user, "offline"), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda c, u, f, rc, p: self.drops.append(str(rc))
        self.client.on_publish = lambda c, u, mid, rc, p: self.acks.append((mid, rc.is_failure))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._ready.wait(10)

    def _on_connect(self, client: paho.Client, userdata: object, flags: object, rc: object, props: object) -> None:
        self.connacks.append(getattr(rc, "value", 0))
        self._ready.set()

    @property
    def refused(self) -> bool:
        return bool(self.connacks) and self.connacks[0] != 0

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> tuple[int, bool]:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for ack in self.acks:
                if ack[0] == info.mid:
                    return ack
            time.sleep(0.02)
        raise AssertionError(f"no PUBACK for {topic}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_device_cannot_publish_under_another_devices_prefix(
    broker_factory: Callable[..., Mosquitto], tmp_path: Path
) -> None:
    broker = acl_broker(broker_factory, tmp_path)
    fleet = fleet_subscriber(broker, "edge/#")
    dev = Client(broker.port, "dev-a")
    try:
        assert dev.publish("edge/dev-b/status", b'{"state": "online", "forged": true}', retain=True)[1]
        assert dev.publish("edge/dev-b/cmd/rollback", b'{"model": "m"}')[1]
        assert dev.publish("edge/dev-a/p/results", b'{"seq": 1}') == (dev.acks[-1][0], False)
        assert fleet.wait_for(lambda: fleet.on("edge/dev-a/p/results"))
        time.sleep(0.3)
        assert fleet.on("edge/dev-b/status") == [] and fleet.on("edge/dev-b/cmd/rollback") == []
        later = fleet_subscriber(broker, "edge/dev-b/status")
        assert later.on("edge/dev-b/status") == []  # nor was a forged status retained
        later.close()
    finally:
        dev.close()
        fleet.close()


def test_a_device_cannot_take_over_another_devices_session_by_its_client_id(
    broker_factory: Callable[..., Mosquitto], tmp_path: Path
) -> None:
    broker = acl_broker(broker_factory, tmp_path)
    fleet = fleet_subscriber(broker, "edge/+/status")
    victim = Client(broker.port, "dev-a", will=True)
    victim.publish("edge/dev-a/status", status("dev-a", "online"), retain=True)
    # dev-b asks for dev-a's client id: the broker gives it its own user name instead.
    attacker = Client(broker.port, "dev-b", client_id="dev-a")
    try:
        assert not attacker.refused
        assert attacker.publish("edge/dev-b/status", status("dev-b", "online"))[1] is False
        # The victim's own status first (the broker forwards it on its own time), then time for a Will to show.
        assert fleet.wait_for(lambda: fleet.on("edge/dev-a/status"), 20), fleet.messages
        time.sleep(1.5)
        assert victim.drops == [], "the victim's session was taken over"
        assert victim.client.is_connected() and attacker.client.is_connected()
        states = [m.payload for m in fleet.on("edge/dev-a/status")]
        assert states == [status("dev-a", "online")], states  # no Last Will flipped its status
    finally:
        attacker.close()
        victim.close()
        fleet.close()


def test_a_device_cannot_write_its_own_deploy_topic(broker_factory: Callable[..., Mosquitto], tmp_path: Path) -> None:
    broker = acl_broker(broker_factory, tmp_path)
    fleet = fleet_subscriber(broker, "edge/+/deploy", "edge/fleet/+/deploy")
    order = fleet.client.publish("edge/dev-a/deploy", b'{"order": "from the fleet"}', qos=1, retain=True)
    order.wait_for_publish(5)
    dev = Client(broker.port, "dev-a")
    try:
        for topic in ("edge/dev-a/deploy", "edge/fleet/g/deploy", "edge/dev-b/deploy"):
            assert dev.publish(topic, b"", retain=True)[1], f"{topic}: the broker accepted a device's write"
            assert dev.publish(topic, b'{"order": "forged"}', retain=True)[1]
        # The fleet's own order first (the broker forwards it on its own time), then time for a forgery to show.
        assert fleet.wait_for(lambda: fleet.on("edge/dev-a/deploy"), 20), fleet.messages
        time.sleep(0.3)
        assert [m.payload for m in fleet.on("edge/dev-a/deploy")] == [b'{"order": "from the fleet"}']
        later = Subscriber(broker.port, "edge/dev-a/deploy", username="dev-a", password="pw-dev-a")
        assert later.wait_for(lambda: later.on("edge/dev-a/deploy"))  # the device still reads its order
        assert [m.payload for m in later.on("edge/dev-a/deploy")] == [b'{"order": "from the fleet"}']
        later.close()
    finally:
        dev.close()
        fleet.close()


def test_a_device_named_fleet_is_impossible(broker_factory: Callable[..., Mosquitto], tmp_path: Path) -> None:
    # The agent refuses the name before it connects anywhere...
    profile = tmp_path / "profile.yaml"
    profile.write_text("device: {id: fleet}\nmqtt: {url: 'mqtt://127.0.0.1:1883'}\n")
    checked = subprocess.run(
        [sys.executable, "-m", "agent", "check", str(profile)], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert checked.returncode == 2
    assert f"{profile}:1: device.id: 'fleet' is a topic level the agent itself uses" in checked.stderr
    # ... and the broker keeps the fleet user and the devices apart, both ways.
    broker = acl_broker(broker_factory, tmp_path)
    as_fleet = Client(broker.port, "fleet")
    as_device = Client(broker.fleet_port, "dev-a", client_id="edge-agent-fleet-x")
    try:
        assert as_fleet.refused and as_device.refused
    finally:
        as_fleet.close()
        as_device.close()


def test_the_agent_works_under_the_documented_acl(broker_factory: Callable[..., Mosquitto], tmp_path: Path) -> None:
    broker = acl_broker(broker_factory, tmp_path)
    secret = tmp_path / "dev-a.secret"
    secret.write_text("pw-dev-a\n")
    fleet = fleet_subscriber(broker, "edge/#")
    cfg = MqttConfig(url=broker.url, username="dev-a", password_file=secret, keepalive=5)
    conn = Connection(cfg, DeviceConfig(id="dev-a"), reconnect_min=0.05, reconnect_max=0.5)
    got: list[bytes] = []
    conn.subscribe(conn.topics.commands, lambda msg: got.append(msg.payload))
    conn.subscribe(conn.topics.deploy, lambda msg: got.append(msg.payload))
    conn.start()
    try:
        assert conn.wait_online(10), conn.error
        assert fleet.wait_for(lambda: fleet.payloads("edge/dev-a/status"))[-1]["state"] == "online"
        fleet.publish("edge/dev-a/cmd/ping", b"{}")
        fleet.client.publish("edge/dev-a/deploy", b"order", qos=1, retain=True).wait_for_publish(5)
        assert fleet.wait_for(lambda: len(got) == 2)  # the device reads its own commands and orders
    finally:
        conn.stop()
        fleet.close()
