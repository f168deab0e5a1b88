"""The cloud side's intake of what devices send, attacked case by case: a fleet of 10,000 devices, any of
which may be compromised or buggy, must not stop `fleet status`, `fleet deploy` or `fleet rollout status`,
reach the operator's terminal or the controller's log with escape sequences, or change another device's
outcome. Each refused input is counted and said in one line; the commands serve on.

Devices' retained messages are written on their behalf by one client on a real Mosquitto (the broker cannot
tell); the deploy cases use the fake devices of tests/test_cli_fleet.py, which speak the agent's contract.
Mosquitto itself refuses control characters in topic names (it drops the connection), so a hostile device
id in a topic is a bidirectional override, a space or a very long level; payloads carry `\\u001b` freely.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.cli import main
from agent.cloud.fleet.enrollment import Enrolled
from agent.cloud.fleet.inventory import SignedReport
from agent.cloud.fleet.plan import RolloutSpec
from agent.cloud.fleet.reports import ReportChecker
from agent.cloud.fleet.rollout import Driver
from agent.cloud.fleet.state import StateDB
from agent.models.deploy import parse_order
from agent.models.signing import DEVICE_REPORT, generate_keypair, key_id, load_public_keys, sign
from agent.transport.contract.report import DeviceReport, Vitals, report_text
from agent.transport.topics import Topics
from agent.util.timefmt import utc_iso
from tests.helpers.broker import Mosquitto
from tests.helpers.registry import make_registry
from tests.helpers.waiting import wait_for
from tests.test_cli_fleet import FakeDevice
from tests.test_e2e_daemon import linear
from tests.test_fleet_status import Writer, device, health, report, status
from tests.test_hostile_wire import DEVICE, running

ESC = "\x1b"
SCREEN = f"{ESC}[2J{ESC}[31m"  # clear the screen, then red
FORGED_LINE = "\n2026-01-01 00:00:00 INFO agent.cloud.fleet.controller all devices passed"


@pytest.fixture
def prefix() -> str:
    return f"hi{uuid.uuid4().hex[:8]}"


def fleet_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def status_cli(capsys: pytest.CaptureFixture[str], broker: Mosquitto, prefix: str, *args: str) -> tuple[int, str, str]:
    return fleet_cli(capsys, "fleet", "status", "--broker", broker.url, "--topic-prefix", prefix, *args)


def strict_json(text: str) -> Any:
    """JSON as any reader but Python's takes it: no NaN, no Infinity."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def no_controls(text: str) -> bool:
    """Nothing a terminal would act on but line breaks between lines."""
    return all(c.isprintable() or c == "\n" for c in text)


# ---- fleet status: retained orders ------------------------------------------------------------------

DEEP = "[" * 5000 + "]" * 5000  # 10 KB; Python's json recursed once per level and raised RecursionError


@pytest.mark.parametrize(
    ("where", "payload", "args", "shown"),
    [
        ("fleet/g/deploy", DEEP, (), "not a deployment order (nested more than 32 levels deep)"),
        ("d-1/deploy", json.dumps({"order": DEEP, "sig": {}}), (), "not a deployment order"),
        ("fleet/g/deploy", json.dumps({"order": json.dumps({"target": ["group:g"]}), "sig": {}}), ("--group", "g"), ""),
    ],
    ids=["deep-envelope", "deep-order-text", "target-a-list"],
)
def test_fleet_status_reads_past_a_hostile_retained_order(
    broker: Mosquitto,
    prefix: str,
    capsys: pytest.CaptureFixture[str],
    where: str,
    payload: str,
    args: tuple[str, ...],
    shown: str,
) -> None:
    """A retained deploy payload nested 5,000 deep ended `fleet status` with RecursionError, as did one whose
    order text was; an order whose target is a list ended `fleet status --group` with TypeError (unhashable).
    Each is now listed (or left out by --group) and the devices are shown."""
    dev = device("d-1", "1.0.0")
    writer = Writer(broker.port)
    writer.put(f"{prefix}/d-1/status", status(dev))
    writer.put(f"{prefix}/d-1/health", dev.health())
    writer.put(f"{prefix}/{where}", payload)
    writer.close()
    code, out, err = status_cli(capsys, broker, prefix, *args)
    assert code == 0, err
    assert out.splitlines()[1].split()[:4] == ["d-1", "online", "g", "m"], out
    if shown:
        assert f"  {prefix}/{where}: {shown}" in out, out


# ---- fleet status: device text on the terminal ------------------------------------------------------


def test_device_strings_reach_the_operator_printable_and_bad_ids_are_counted_out(
    broker: Mosquitto, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a device writes went to the operator's terminal as it was: escape sequences in a model name, a
    version or a provider cleared the screen, a device id with a right-to-left override showed as another
    id. Ids and groups that no agent's profile allows are refused (counted, one line each); other strings
    are shown with their escapes written out, cut at 200 characters."""
    spoof = "cam-01\u202e10-mac"  # shows as "cam-01cam-01"... in a terminal that honours the override
    long_id = "x" * 2000
    good, bad_group = device("ok-1", "1.0.0"), device("ok-2", "1.0.0")
    writer = Writer(broker.port)
    for dev_id in (spoof, "cam 02", long_id):
        writer.put(f"{prefix}/{dev_id}/status", status(device(dev_id, "1.0.0")))
    writer.put(f"{prefix}/ok-2/status", status(bad_group).replace('"group":"g"', f'"group":{json.dumps("g" + SCREEN)}'))
    writer.put(f"{prefix}/ok-1/status", status(good))
    doc = json.loads(good.health())
    doc["models"] = {f"m{SCREEN}": {"version": f"1.0{FORGED_LINE}", "provider": f"CPU{ESC}[8m", "pipelines": ["p"]}}
    writer.put(f"{prefix}/ok-1/health", json.dumps(doc))
    order = {"order": json.dumps({"model": f"m{SCREEN}", "version": "9" * 1000, "target": "group:g"}), "sig": {}}
    writer.put(f"{prefix}/fleet/g/deploy", json.dumps(order))
    writer.close()

    code, out, err = status_cli(capsys, broker, prefix)
    assert code == 0, err
    assert no_controls(out + err), repr(out)
    assert "\u202e" not in out and long_id not in out
    table = out.split("\n\n")[0].splitlines()
    assert [line.split()[0] for line in table] == ["DEVICE", "ok-1"], out
    assert "4 message(s) from devices refused (the first 4):" in out, out
    assert f"  {prefix}/ok-2/status: status: field 'group': expected a name" in out, out
    assert "device id in the topic: expected a name" in out
    assert "m\\x1b[2J\\x1b[31m 1.0\\n2026-01-01" in out and "CPU\\x1b[8m" in out, out
    assert "9" * 200 + "... (1000 characters)" in out and "9" * 201 not in out

    code, out, err = status_cli(capsys, broker, prefix, "--json")
    assert code == 0, err
    state = strict_json(out)
    assert [d["device"] for d in state["devices"]] == ["ok-1"]
    assert state["refused"]["count"] == 4 and len(state["refused"]["first"]) == 4
    assert state["devices"][0]["models"] == {
        f"m{SCREEN}": {"version": f"1.0{FORGED_LINE}", "provider": f"CPU{ESC}[8m"}
    }  # the JSON says what the device said, escaped by JSON itself


def test_a_health_stamped_far_ahead_is_not_shown_as_fresh(
    broker: Mosquitto, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A device whose clock says 2099 looked `0s ago` in the HEALTH column however long it had been silent."""
    dev = device("ahead", "1.0.0")
    doc = json.loads(dev.health())
    doc["ts"] = "2099-01-01T00:00:00.000Z"
    writer = Writer(broker.port)
    writer.put(f"{prefix}/ahead/status", status(dev))
    writer.put(f"{prefix}/ahead/health", json.dumps(doc))
    writer.close()
    code, out, err = status_cli(capsys, broker, prefix)
    assert code == 0, err
    (row,) = [line for line in out.splitlines() if line.startswith("ahead ")]
    assert "d in the future" in row and "ago" not in row, row


# ---- fleet status: figures ----------------------------------------------------------------------------


def test_health_figures_that_break_the_tables_are_refused_and_status_serves_on(
    broker: Mosquitto, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A health's counts and times are the device's word: a 400-digit error count ended `fleet status` with
    an OverflowError (float(int)), a NaN p95 sorted the fleet's percentiles wrongly and printed `NaN` in
    `--json` (no JSON reader but Python's takes it), a negative error count cancelled another's, and an
    uptime of 1e308 on two devices summed to `Infinity`. Such a health is refused, naming the field. A
    signed report's time active is finite by the contract, yet two of 1e308 summed to `Infinity` too: it
    counts no hours."""
    good = device("a-good", "1.0.0", p95=10.0)
    hostile = {
        "b-huge": ({"inference_errors": 10**400}, "pipelines.p.inference_errors"),
        "c-nan": ({"latency_ms": {"infer": {"p50": 1.0, "p95": float("nan"), "n": 200}}}, "infer.p95"),
        "d-negative": ({"inference_errors": -5, "nan_outputs": 5}, "pipelines.p.inference_errors"),
    }
    writer = Writer(broker.port)
    writer.put(f"{prefix}/a-good/status", status(good))
    writer.put(f"{prefix}/a-good/health", good.health())
    for name, (changes, _) in hostile.items():
        dev = device(name, "1.0.0")
        writer.put(f"{prefix}/{name}/status", status(dev))
        writer.put(f"{prefix}/{name}/health", health(dev, **changes))  # json.dumps writes NaN as NaN
    for name in ("e-old", "f-old"):
        dev = device(name, "1.0.0")
        doc = json.loads(dev.health())
        doc["agent"]["uptime_s"] = 1e308
        writer.put(f"{prefix}/{name}/status", status(dev))
        writer.put(f"{prefix}/{name}/health", json.dumps(doc))
    endless = Vitals(inferences=500, errors=0, nan=0, drops=0, p95_ms=10.0, baseline_p95_ms=10.0, active_s=1e308)
    for name in ("g-report", "h-report"):
        dev = device(name, "1.0.0", p95=10.0)
        writer.put(f"{prefix}/{name}/status", status(dev))
        writer.put(f"{prefix}/{name}/health", dev.health())
        writer.put(f"{prefix}/{name}/report", report(dev, "active", "1.0.0", "1.0.0", vitals=endless))
    writer.close()

    code, out, err = status_cli(capsys, broker, prefix, "--json")
    assert code == 0, err
    state = strict_json(out)
    (row,) = state["versions"]
    assert (row["devices"], row["errors"], row["p95_ms_median"], row["p95_ms_p95"]) == (3, 0, 10.0, 10.0)
    assert row["error_free_h"] == pytest.approx(60 / 3600, abs=0.01)  # a-good's uptime; the reports' none
    assert state["refused"]["count"] == 5
    first = "\n".join(state["refused"]["first"])
    for name, (_, field) in hostile.items():
        assert f"{prefix}/{name}/health: health: field '" in first and field in first, first
    assert "field 'agent.uptime_s': expected a finite number from 0 to 2^63 (got 1e+308)" in first, first
    assert {d["device"] for d in state["devices"] if d["models"]} == {"a-good", "g-report", "h-report"}


# ---- fleet deploy ----------------------------------------------------------------------------------


class HostileTarget(FakeDevice):
    """A target of the order that says what no agent says: a download of a 400-digit number of bytes, an
    error whose reason clears the screen and forges a line, then it activates as an agent does."""

    def _handle(self, topic: str, payload: bytes) -> None:
        order = parse_order(payload, self.keys)
        if order is None or order.id in self.handled:
            return
        self.handled.add(order.id)
        fields = order.event_fields()
        self.event("model.downloading", **fields, variant=f"fp32{ESC}[8m", bytes=10**400, resume_from=0)
        self.event("model.error", **fields, reason=f"{SCREEN}disk full{FORGED_LINE}")
        self.models[order.model] = order.version
        self.event("model.activated", **fields, variant="fp32", provider="CPUExecutionProvider", previous="1.4.0")
        self.health()


class SlowTarget(FakeDevice):
    """An agent that takes a second before it acts on the order: what other devices say comes first."""

    def _handle(self, topic: str, payload: bytes) -> None:
        time.sleep(1.0)
        super()._handle(topic, payload)


class Outsider(FakeDevice):
    """A device of another group that reads the group's order and says it refused it (compromised), and, as
    a channel pull of the same version would, that it rolled that version back (no order named)."""

    def _handle(self, topic: str, payload: bytes) -> None:
        order = parse_order(payload, self.keys)
        if order is None or order.id in self.handled:
            return
        self.event("model.rolled_back", model=order.model, version=order.version, to="1.4.0", reason="pull",
                   cause="probation")  # fmt: skip
        self.event("model.refused", **order.event_fields(), reason="not for me")
        self.handled.add(order.id)


def deploy_cli(capsys: pytest.CaptureFixture[str], broker: Mosquitto, prefix: str, private: Path) -> tuple[int, str]:
    code, out, err = fleet_cli(
        capsys, "fleet", "deploy", "--broker", broker.url, "--topic-prefix", prefix, "--key", str(private),
        "--model", "text-detector", "--version", "1.5.0", "--to", "group:north", "--wait", "10",
    )  # fmt: skip
    return code, out + err


def test_deploy_follows_a_target_past_hostile_events(
    broker: Mosquitto, prefix: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A target's `model.downloading` of 10**400 bytes ended `fleet deploy` mid-follow with OverflowError
    (the order written, its outcome never shown), and its reasons reached the terminal with their escapes.
    Now its text is shown printable and the deploy goes on to its outcome."""
    private, public = generate_keypair(tmp_path / "keys")
    target = HostileTarget(broker.port, prefix, "cam-1", "north", load_public_keys(public))
    try:
        code, out = deploy_cli(capsys, broker, prefix, private)
    finally:
        target.close()
    assert code == 0, out
    assert no_controls(out), repr(out)
    assert f"cam-1: downloading (variant fp32\\x1b[8m, 1{'0' * 39}... (401 characters) bytes)" in out, out
    assert "cam-1: error: \\x1b[2J\\x1b[31mdisk full\\n2026-01-01" in out, out
    assert out.rstrip().endswith("done: 1/1 device(s) active on text-detector 1.5.0"), out


def test_deploy_counts_only_its_targets(
    broker: Mosquitto, prefix: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A device outside the group that said it refused the group's order (or rolled its version back, as a
    channel pull says with no order named) joined the targets and failed the deploy: `not done: 1/2`."""
    private, public = generate_keypair(tmp_path / "keys")
    keys = load_public_keys(public)
    target = SlowTarget(broker.port, prefix, "cam-1", "north", keys)
    outsider = Outsider(broker.port, prefix, "cam-9", "south", keys)
    outsider.client.subscribe(Topics(prefix, "-", "north").fleet_deploy, 1)
    try:
        code, out = deploy_cli(capsys, broker, prefix, private)
    finally:
        target.close()
        outsider.close()
    assert outsider.handled, "the outsider never saw the order"
    assert code == 0, out
    assert "cam-9" not in out, out
    assert out.rstrip().endswith("done: 1/1 device(s) active on text-detector 1.5.0"), out


# ---- the controller's reports and `fleet rollout status` -----------------------------------------------


def test_a_report_key_id_cannot_write_lines_into_the_controller_log() -> None:
    """The key id a report's signature claims is the reporter's choice; it went into the `report.unenrolled`
    reason as it was, and that reason into the controller's log line and the state file: newlines forged
    log lines, escapes reached whoever read them. It is now quoted printable and short."""
    key = Ed25519PrivateKey.generate()
    checker = ReportChecker({"cam-1": Enrolled("cam-1", key.public_key(), key_id(key.public_key()), "g")})
    report = DeviceReport(
        schema=1, device="cam-1", order="o-1", ts=utc_iso(time.time()), model="m", version="2.0.0", state="active"
    )
    text = report_text(report)
    sig = json.loads(sign(Ed25519PrivateKey.generate(), text, DEVICE_REPORT))
    sig["signatures"][0]["key"] = f"{SCREEN}{FORGED_LINE}" + "k" * 10_000
    signed = SignedReport(text, json.dumps(sig).encode(), report)
    rejected = checker.check("cam-1", signed)
    assert rejected is not None and rejected.type == "report.unenrolled"
    assert no_controls(rejected.reason) and "\n" not in rejected.reason, repr(rejected.reason)
    assert len(rejected.reason) < 300 and "\\x1b[2J" in rejected.reason


def test_rollout_status_shows_a_device_reason_printable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A refusal's reason is the device's line, and the gates keep it as the target's reason: `fleet rollout
    status` printed it as it was, escapes and forged lines included."""
    db_path = tmp_path / "controller.db"
    db = StateDB(db_path)
    db.add_rollout("ro-1", RolloutSpec(model="m", version="2.0.0", group="g", waves=("100%",)))
    (rollout,) = db.rollouts()
    key = Ed25519PrivateKey.generate()
    driver = Driver(db, rollout, key)
    driver.plan({"cam-1": ("x86_64/CPU", "1.0.0")})
    sent: list[tuple[str, bytes]] = []
    driver.tick(sent.extend)
    target = driver.targets["cam-1"]
    assert target.order_id is not None and sent
    refused = DeviceReport(
        schema=1, device="cam-1", order=target.order_id, ts=utc_iso(time.time()), model="m", version="2.0.0",
        state="refused", running="1.0.0", reason=f"{SCREEN}opset 27{FORGED_LINE}",
    )  # fmt: skip
    driver.on_report(refused)
    driver.flush()
    db.event("ro-1", "cam-1", "report.forged", f"{SCREEN}forged{FORGED_LINE}")
    db.close()
    code, out, err = fleet_cli(capsys, "fleet", "rollout", "status", "ro-1", "--db", str(db_path))
    assert code == 0, err
    assert no_controls(out), repr(out)
    assert "  cam-1: failed: refused: \\x1b[2J\\x1b[31mopset 27\\n2026-01-01" in out, out
    assert "  event report.forged: \\x1b[2J\\x1b[31mforged\\n2026-01-01" in out, out
    assert not any(line.startswith("2026-01-01") for line in out.splitlines()), out


# ---- the fleet's checks against a real agent ----------------------------------------------------------


def test_what_a_real_agent_sends_passes_the_fleets_own_checks(
    tmp_path: Path, own_broker: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    """The fleet asks more of a device's messages than the contract (ids and groups are names, health figures
    finite, not negative, below 2^63): a real agent's status and health must pass them, or `fleet status` would
    count the whole fleet as refused."""
    registry = make_registry(tmp_path / "reg")
    registry.publish("m", "1.0.0", linear(tmp_path, "v1", 1.0), channel="stable")
    with running(tmp_path, own_broker, registry) as rig:
        health_topic = f"{rig.base}/health"
        assert wait_for(lambda: len(rig.sub.payloads(health_topic)) >= 2, 30), rig.agent.stderr()[-3000:]
        code, out, err = status_cli(capsys, own_broker, "edge", "--json")
    assert code == 0, err
    state = json.loads(out)
    assert state["refused"] == {"count": 0, "first": []}, state["refused"]
    (dev,) = state["devices"]
    assert (dev["device"], dev["state"], dev["group"]) == (DEVICE, "online", "g"), dev
    assert dev["models"]["m"]["version"] == "1.0.0" and dev["health_age_s"] is not None, dev
