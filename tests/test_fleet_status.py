"""`edge-agent fleet status` against a real Mosquitto: complete without a guessed wait (its own marker ends
the retained burst) on a broker with Mosquitto's default queue, and the tables per group and model and
per model version, through the real command line, as text, `--json` and the HTML page.

The devices' retained messages are written by one client on their behalf (the broker cannot tell), each
built through the agent's contract: status, health (tests/helpers/simfleet.py) and signed reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from agent.models.deploy import new_order, sign_order
from agent.service.identity import sign_report
from agent.transport.contract.report import DeviceReport, Vitals
from agent.transport.contract.status import StatusMessage
from agent.util.timefmt import utc_iso
from tests.helpers.broker import Mosquitto
from tests.helpers.simfleet import PROVIDERS, SimDevice
from tests.helpers.waiting import wait_for

REPO = Path(__file__).resolve().parent.parent
KEY = Ed25519PrivateKey.generate()


class Writer:
    """One paho client that leaves retained messages on the broker, every PUBACK waited for."""

    def __init__(self, port: int) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="status-writer")
        self.client.max_inflight_messages_set(1000)
        self.acked: set[int] = set()
        self.client.on_publish = lambda c, u, mid, rc, p: self.acked.add(mid)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.mids: list[int] = []

    def put(self, topic: str, payload: bytes | str) -> None:
        self.mids.append(self.client.publish(topic, payload, qos=1, retain=True).mid)

    def close(self) -> None:
        assert wait_for(lambda: self.acked.issuperset(self.mids), 60), f"{len(self.acked)} of {len(self.mids)} acked"
        self.client.disconnect()
        self.client.loop_stop()


def device(name: str, version: str, *, provider: str = "CUDAExecutionProvider", p95: float = 10.0) -> SimDevice:
    dev = SimDevice(name, "g", KEY, "x86_64", provider, "m", version, base_p95=p95)
    return dev


def health(dev: SimDevice, **changes: Any) -> bytes:
    """The device's retained health, with the models section or a pipeline's counters changed."""
    doc = json.loads(dev.health())
    doc["models"]["m"].update(changes.pop("model", {}))
    doc["pipelines"]["p"].update(changes)
    return json.dumps(doc).encode()


def status(dev: SimDevice, state: str = "online") -> str:
    return StatusMessage(device=dev.id, group=dev.group, state=state, ts=utc_iso(time.time())).model_dump_json(
        exclude_none=True
    )  # type: ignore[arg-type]  # the contract's literal


def report(dev: SimDevice, state: str, version: str, running: str, **fields: Any) -> bytes:
    signed = DeviceReport(
        schema=1, device=dev.id, order="o-1", ts=utc_iso(time.time()), model="m", version=version,
        state=state, running=running, previous="1.0.0", **fields,  # type: ignore[arg-type]  # a ReportState
    )  # fmt: skip
    return sign_report(KEY, signed)


def fleet_status(broker: Mosquitto, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "agent", "fleet", "status", "--broker", broker.url, "--topic-prefix", prefix, *args]
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120)


@pytest.mark.slow
def test_status_reads_every_device_from_a_broker_with_the_default_queue(tmp_path: Path) -> None:
    """3,000 devices' status, health and report (9,000 retained messages) on a Mosquitto whose per-client
    queue is its default 1,000 packets: every device is printed with its health and report, with no
    settle time (the default `--settle 0s`)."""
    n = 3000
    broker = Mosquitto(tmp_path / "mosquitto", extra_conf="max_queued_messages 1000\n").start()
    try:
        writer = Writer(broker.port)
        for i in range(n):
            dev = device(f"d{i:04d}", "1.0.0", provider=PROVIDERS[i % 3], p95=8.0 + i % 5)
            writer.put(f"edge/{dev.id}/status", status(dev))
            writer.put(f"edge/{dev.id}/health", dev.health())
            writer.put(f"edge/{dev.id}/report", report(dev, "active", "1.0.0", "1.0.0"))
        writer.close()
        started = time.monotonic()
        run = fleet_status(broker, "edge", "--json")
        took = time.monotonic() - started
        assert run.returncode == 0, run.stderr
        state = json.loads(run.stdout)
        assert len(state["devices"]) == n
        assert all(d["models"] and d["report"] is not None and d["state"] == "online" for d in state["devices"])
        (row,) = state["groups"]
        assert (row["devices"], row["on_latest"]) == (n, n)
        assert took < 60, took
    finally:
        broker.stop()


def test_status_tables_per_group_and_version_as_text_json_and_page(broker: Mosquitto, tmp_path: Path) -> None:
    """One device in each column of the group table, and the vitals of each version across the fleet."""
    prefix = f"st{time.monotonic_ns() % 10**8}"
    on_latest = device("a-latest", "2.0.0", p95=10.0)
    moving = device("b-moving", "1.0.0", p95=20.0)
    holding = device("c-holding", "1.0.0", p95=30.0)
    failed = device("d-failed", "1.0.0", p95=40.0)
    gone = device("e-gone", "2.0.0", p95=12.0)
    behind = device("f-behind", "1.0.0", p95=50.0)
    writer = Writer(broker.port)
    order = new_order("m", "2.0.0", "group:g")
    writer.put(f"{prefix}/fleet/g/deploy", sign_order(order, KEY))
    for dev in (on_latest, moving, holding, failed, gone, behind):
        writer.put(f"{prefix}/{dev.id}/status", status(dev, "offline" if dev is gone else "online"))
    hold = {"version": "2.0.0", "reason": "rolled back: p95", "since": utc_iso(time.time())}
    writer.put(f"{prefix}/{on_latest.id}/health", health(on_latest, dropped=7))
    writer.put(f"{prefix}/{gone.id}/health", health(gone, dropped=1))
    writer.put(f"{prefix}/{moving.id}/health", moving.health())
    writer.put(f"{prefix}/{holding.id}/health", health(holding, model={"held": [hold]}))
    writer.put(f"{prefix}/{failed.id}/health", health(failed, inference_errors=3))
    writer.put(f"{prefix}/{behind.id}/health", behind.health())
    vitals = Vitals(inferences=500, errors=0, nan=0, drops=7, p95_ms=10.0, baseline_p95_ms=9.0, active_s=7200)
    writer.put(
        f"{prefix}/{on_latest.id}/report",
        report(on_latest, "active", "2.0.0", "2.0.0", fallback=True, provider="CPUExecutionProvider", vitals=vitals),
    )
    writer.put(f"{prefix}/{moving.id}/report", report(moving, "downloading", "2.0.0", "1.0.0"))
    writer.put(f"{prefix}/{failed.id}/report", report(failed, "refused", "2.0.0", "1.0.0", reason="opset 27"))
    writer.close()

    page = tmp_path / "fleet.html"
    run = fleet_status(broker, prefix, "--json", "--html", str(page))
    assert run.returncode == 0, run.stderr
    state = json.loads(run.stdout)
    assert state["groups"] == [
        {"group": "g", "model": "m", "latest": "2.0.0", "devices": 6, "on_latest": 1, "in_progress": 1,
         "held": 1, "failed": 1, "offline": 1, "behind": 1}
    ]  # fmt: skip
    versions = {v["version"]: v for v in state["versions"]}
    assert set(versions) == {"1.0.0", "2.0.0"}
    new, old = versions["2.0.0"], versions["1.0.0"]
    assert (new["devices"], new["fallbacks"], new["drops"], new["errors"]) == (2, 1, 8, 0)
    assert (new["p95_ms_median"], new["p95_ms_p95"]) == (10.0, 12.0)
    assert new["error_free_h"] == pytest.approx(2.0 + 60 / 3600, abs=0.01)  # the report's 2 h, the other's uptime
    assert (old["devices"], old["errors"], old["fallbacks"]) == (4, 3, 0)
    assert (old["p95_ms_median"], old["p95_ms_p95"]) == (30.0, 50.0)
    # the failed device's errors keep its hours out of the error-free ones
    assert old["error_free_h"] == pytest.approx(3 * 60 / 3600, abs=0.01)

    text = fleet_status(broker, prefix)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    head = lines.index(next(line for line in lines if line.startswith("GROUP ")))
    assert lines[head].split() == ["GROUP", "MODEL", "LATEST", "DEVICES", "ON-LATEST", "IN-PROGRESS", "HELD",
                                   "FAILED", "OFFLINE", "BEHIND"]  # fmt: skip
    assert lines[head + 1].split() == ["g", "m", "2.0.0", "6", "1", "1", "1", "1", "1", "1"]
    vhead = lines.index(next(line for line in lines if line.startswith("MODEL ")))
    assert lines[vhead + 2].split()[:4] == ["m", "2.0.0", "2", "2.0"], lines[vhead + 2]
    html = page.read_text()
    assert "<h2>Groups</h2>" in html and "<td>g</td><td>m</td><td>2.0.0</td>" in html
    assert html.count("<tr>") == 1 + 1 + 1 + 2 + 1 + 6  # header and rows of the three tables


def test_a_marker_the_broker_refuses_ends_status_in_one_line(broker_factory: Any, tmp_path: Path) -> None:
    """An ACL that lets the fleet user read but not write its marker: the end of the retained burst cannot
    be known, so no table is printed as if it were complete; one line names the marker's topic."""
    acl = tmp_path / "acl"
    acl.write_text("topic read edge/#\n")
    root = "user root\n" if os.geteuid() == 0 else ""  # root drops to `mosquitto`, who cannot read tmp
    mosq = broker_factory(extra_conf=f"acl_file {acl}\n{root}")
    run = fleet_status(mosq, "edge")
    assert run.returncode == 1 and run.stdout == "", run.stdout
    (line,) = run.stderr.strip().splitlines()
    assert "refused the publish on edge/fleet/marker/" in line and "check the ACL" in line, line


def test_a_device_naming_a_strange_version_is_listed_and_breaks_nobody_elses_line(broker: Mosquitto) -> None:
    """Versions in health are the device's word: '1.²' (str.isdigit() holds, int() refuses) and a 5,000-digit
    number (int() refuses more than 4,300 digits) once ended `fleet status` with a ValueError."""
    prefix = f"sv{time.monotonic_ns() % 10**8}"
    good = device("a-good", "1.0.0")
    odd = [device("b-super", "1.\u00b2"), device("c-long", "9" * 5000)]
    writer = Writer(broker.port)
    for dev in (good, *odd):
        writer.put(f"{prefix}/{dev.id}/status", status(dev))
        writer.put(f"{prefix}/{dev.id}/health", dev.health())
    writer.close()
    run = fleet_status(broker, prefix, "--json")
    assert run.returncode == 0, run.stderr
    state = json.loads(run.stdout)
    assert {v["version"] for v in state["versions"]} == {"1.0.0", "1.\u00b2", "9" * 5000}
    assert [d["device"] for d in state["devices"]] == ["a-good", "b-super", "c-long"]
