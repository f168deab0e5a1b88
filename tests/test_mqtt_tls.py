"""mqtts:// with a test CA and client certificates (mutual TLS) against a Mosquitto TLS listener."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.config.profile import DeviceConfig, MqttConfig, TlsConfig
from agent.transport.connection import ONLINE, REFUSED, Connection
from tests.helpers.broker import Mosquitto, free_port, wait_port
from tests.helpers.tls import TestCA


@pytest.fixture
def tls_broker(broker_factory: Callable[..., Mosquitto], tmp_path: Path) -> tuple[Mosquitto, int, TestCA]:
    ca = TestCA(tmp_path / "ca")
    server = ca.issue("server", "localhost", server=True)
    port = free_port()
    conf = ("user root\n" if os.geteuid() == 0 else "") + (
        f"listener {port} 127.0.0.1\ncafile {ca.pem}\ncertfile {server.cert}\nkeyfile {server.key}\n"
        "require_certificate true\nuse_identity_as_username true\n"
    )
    mosq = broker_factory(extra_conf=conf)
    wait_port(port)
    return mosq, port, ca


def connect(port: int, ca: Path, cert: Path | None, key: Path | None) -> Connection:
    cfg = MqttConfig(url=f"mqtts://127.0.0.1:{port}", tls=TlsConfig(ca=ca, cert=cert, key=key), keepalive=5)
    return Connection(cfg, DeviceConfig(id="tls-dev"), reconnect_min=0.05, reconnect_max=0.5).start()


def settle(conn: Connection, states: tuple[str, ...], timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and conn.state not in states:
        time.sleep(0.02)
    return conn.state


@pytest.mark.arm64
def test_mutual_tls_connects(tls_broker: tuple[Mosquitto, int, TestCA]) -> None:
    _mosq, port, ca = tls_broker
    client = ca.issue("device", "tls-dev")
    conn = connect(port, ca.pem, client.cert, client.key)
    try:
        assert conn.wait_online(10), conn.error
        assert conn.state == ONLINE
    finally:
        conn.stop()


@pytest.mark.arm64
def test_client_certificate_from_another_ca_is_a_clear_error(
    tls_broker: tuple[Mosquitto, int, TestCA], tmp_path: Path
) -> None:
    _mosq, port, ca = tls_broker
    rogue = TestCA(tmp_path / "rogue", name="not the broker's CA").issue("device", "tls-dev")
    conn = connect(port, ca.pem, rogue.cert, rogue.key)
    try:
        assert settle(conn, (REFUSED,)) == REFUSED
        assert conn.error and conn.error.startswith("TLS") and "tls.cert" in conn.error, conn.error
        assert not conn.online
    finally:
        conn.stop()


@pytest.mark.arm64
def test_broker_certificate_not_signed_by_our_ca_is_a_clear_error(
    tls_broker: tuple[Mosquitto, int, TestCA], tmp_path: Path
) -> None:
    _mosq, port, ca = tls_broker
    client = ca.issue("device", "tls-dev")
    other = TestCA(tmp_path / "other", name="some other CA")
    conn = connect(port, other.pem, client.cert, client.key)
    try:
        assert settle(conn, (REFUSED,)) == REFUSED
        assert "not trusted" in (conn.error or "") and "tls.ca" in (conn.error or ""), conn.error
    finally:
        conn.stop()


def test_unreadable_key_fails_at_creation(tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "ca")
    client = ca.issue("device", "dev")
    other = ca.issue("other", "dev")
    cfg = MqttConfig(url="mqtts://127.0.0.1:1", tls=TlsConfig(ca=ca.pem, cert=client.cert, key=other.key))
    with pytest.raises(Exception, match="mqtt.tls: cannot load the TLS files"):
        Connection(cfg, DeviceConfig(id="dev"))


def test_fleet_status_reads_a_retained_burst_over_mutual_tls(
    tls_broker: tuple[Mosquitto, int, TestCA], capsys: pytest.CaptureFixture[str]
) -> None:
    """The fleet client reads ahead of paho's parser (agent/transport/pahopatch.py) on its own network loop:
    over TLS, bytes already decrypted are invisible to select(), and a burst must still come in whole."""
    from agent.cli import main
    from agent.transport.contract.status import StatusMessage

    _mosq, port, ca = tls_broker
    device = ca.issue("device", "tls-dev")
    acked: list[int] = []
    conn = connect(port, ca.pem, device.cert, device.key)
    conn.add_ack_listener(lambda mid, ok: acked.append(mid))
    try:
        assert conn.wait_online(10), conn.error
        mids = set()
        for i in range(400):
            status = StatusMessage(device=f"tls-{i:03d}", group="g", state="offline", reason="stopped")
            mid = conn.publish(f"edge/tls-{i:03d}/status", status.model_dump_json(exclude_none=True), retain=True)
            assert mid is not None
            mids.add(mid)
        deadline = time.monotonic() + 10
        while not mids <= set(acked) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert mids <= set(acked), f"{len(mids - set(acked))} retained statuses not acknowledged"
    finally:
        conn.stop()
    fleet = ca.issue("fleet", "fleet")
    url = f"mqtts://127.0.0.1:{port}"
    tls = ["--tls-ca", str(ca.pem), "--tls-cert", str(fleet.cert), "--tls-key", str(fleet.key)]
    assert main(["fleet", "status", "--broker", url, *tls, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert {d["device"] for d in shown["devices"]} >= {f"tls-{i:03d}" for i in range(400)}
