"""The Mosquitto ACL of docs/mqtt.md, used verbatim: a device writes only under its own prefix."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.config.profile import DeviceConfig, MqttConfig
from agent.transport.connection import Connection
from tests.helpers.broker import Mosquitto
from tests.helpers.mqtt_client import Subscriber

REPO = Path(__file__).resolve().parent.parent


def documented_acl() -> str:
    text = (REPO / "docs" / "mqtt.md").read_text()
    match = re.search(r"```acl\n(.*?)```", text, re.S)
    assert match, "docs/mqtt.md has no ```acl block"
    return match.group(1)


def acl_broker(broker_factory: Callable[..., Mosquitto], tmp_path: Path) -> Mosquitto:
    acl = tmp_path / "acl"
    acl.write_text(documented_acl())
    pw = tmp_path / "passwd"
    for i, user in enumerate(("dev-a", "dev-b", "fleet")):
        subprocess.run(
            ["mosquitto_passwd", "-b"] + (["-c"] if i == 0 else []) + [str(pw), user, f"pw-{user}"],
            check=True,
            capture_output=True,
        )
    root = "user root\n" if os.geteuid() == 0 else ""
    return broker_factory(extra_conf=f"{root}password_file {pw}\nacl_file {acl}\n", anonymous=False)


def device_client(port: int, user: str) -> tuple[paho.Client, list[tuple[int, bool]]]:
    acks: list[tuple[int, bool]] = []
    ready = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=user, protocol=paho.MQTTv5)
    client.username_pw_set(user, f"pw-{user}")
    client.on_connect = lambda c, u, f, rc, p: ready.set()
    client.on_publish = lambda c, u, mid, rc, p: acks.append((mid, rc.is_failure))
    client.connect("127.0.0.1", port)
    client.loop_start()
    assert ready.wait(10)
    return client, acks


def test_device_cannot_publish_under_another_devices_prefix(
    broker_factory: Callable[..., Mosquitto], tmp_path: Path
) -> None:
    mosq = acl_broker(broker_factory, tmp_path)
    fleet = Subscriber(mosq.port, "edge/#", username="fleet", password="pw-fleet")
    client, acks = device_client(mosq.port, "dev-a")
    try:
        forged = client.publish("edge/dev-b/status", b'{"state": "online", "forged": true}', qos=1, retain=True)
        forged.wait_for_publish(5)
        client.publish("edge/dev-b/cmd/rollback", b'{"model": "m"}', qos=1).wait_for_publish(5)
        client.publish("edge/dev-a/p/results", b'{"seq": 1}', qos=1).wait_for_publish(5)
        assert fleet.wait_for(lambda: fleet.on("edge/dev-a/p/results"))
        time.sleep(0.3)
        assert fleet.on("edge/dev-b/status") == [] and fleet.on("edge/dev-b/cmd/rollback") == []
        assert (forged.mid, True) in acks  # MQTT 5: the PUBACK says "not authorised"
        later = Subscriber(mosq.port, "edge/dev-b/status", username="fleet", password="pw-fleet")
        assert later.on("edge/dev-b/status") == []  # nor was a forged status retained
        later.close()
    finally:
        client.disconnect()
        client.loop_stop()
        fleet.close()


def test_the_agent_works_under_the_documented_acl(broker_factory: Callable[..., Mosquitto], tmp_path: Path) -> None:
    mosq = acl_broker(broker_factory, tmp_path)
    secret = tmp_path / "dev-a.secret"
    secret.write_text("pw-dev-a\n")
    fleet = Subscriber(mosq.port, "edge/#", username="fleet", password="pw-fleet")
    cfg = MqttConfig(url=mosq.url, username="dev-a", password_file=secret, keepalive=5)
    conn = Connection(cfg, DeviceConfig(id="dev-a"), reconnect_min=0.05, reconnect_max=0.5)
    got: list[bytes] = []
    conn.subscribe(conn.topics.commands, lambda msg: got.append(msg.payload))
    conn.start()
    try:
        assert conn.wait_online(10), conn.error
        assert fleet.wait_for(lambda: fleet.payloads("edge/dev-a/status"))[-1]["state"] == "online"
        fleet.publish("edge/dev-a/cmd/ping", b"{}")
        assert fleet.wait_for(lambda: got)  # the device may read its own commands
    finally:
        conn.stop()
        fleet.close()
