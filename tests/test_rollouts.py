"""Rollouts without a broker: wave sizes, the spread over hardware kinds, the gates, the abort rule, the
driver's steps on a real state file (write-ahead included), and which signed reports count."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.cloud.fleet.client import BrokerSettings
from agent.cloud.fleet.controller import Controller
from agent.cloud.fleet.enrollment import EnrollmentError, load_enrollment
from agent.cloud.fleet.gates import abort_reason, judge
from agent.cloud.fleet.inventory import SignedReport
from agent.cloud.fleet.plan import RolloutSpec, check_spec, in_window, order_devices, wave_ends
from agent.cloud.fleet.reports import ReportChecker
from agent.cloud.fleet.rollout import Driver
from agent.cloud.fleet.state import StateDB
from agent.models.deploy import parse_order
from agent.models.signing import key_id
from agent.service.identity import enrollment_entry, sign_report
from agent.transport.contract.base import ContractError
from agent.transport.contract.report import DeviceReport, Vitals, parse_report_text, report_text, split_signed

NAN, INF = float("nan"), float("inf")
SPEC = RolloutSpec(model="m", version="2.0.0", group="g", waves=("25%", "50%", "75%", "100%"))


def report(order: str, state: str = "active", device: str = "d0", **kw: object) -> DeviceReport:
    vitals = kw.pop(
        "vitals", Vitals(inferences=100, errors=0, nan=0, drops=0, p95_ms=10.0, baseline_p95_ms=9.0, active_s=5)
    )
    fields = {"schema": 1, "device": device, "order": order, "ts": "2026-12-02T10:00:00.000Z", "model": "m",
              "version": "2.0.0", "state": state, "running": "2.0.0" if state == "active" else "1.0.0",
              "previous": "1.0.0", "provider": "CPUExecutionProvider", "vitals": vitals if state == "active" else None}  # fmt: skip
    return DeviceReport(**{**fields, **kw})  # type: ignore[arg-type]  # the test's own keyword fields


def test_waves_are_cumulative_and_the_first_covers_every_kind() -> None:
    assert wave_ends(("1%", "10%", "50%", "100%"), 10000) == [100, 1000, 5000, 10000]
    assert wave_ends(("10", "100", "all"), 50) == [10, 50]
    assert wave_ends(("exp:10,2",), 100) == [10, 30, 70, 100]
    assert wave_ends(("1%",), 200, kinds=6) == [6, 200]  # at least one device of every kind, and the rest at the end
    for bad in (("0%",), ("x",), ("exp:1,1",), ("exp:1,inf",), ("exp:1,nan",)):
        with pytest.raises(ValueError, match="wave"):
            wave_ends(bad, 10)


def test_devices_are_ordered_deterministically_and_spread_over_hardware_kinds() -> None:
    kinds = {f"d{i:03d}": ("x86_64/CUDA", "aarch64/CPU", "x86_64/OpenVINO")[i % 3] for i in range(300)}
    kinds["odd-one"] = "aarch64/NPU"
    first = order_devices("ro-1", kinds)
    assert first == order_devices("ro-1", kinds) and first != order_devices("ro-2", kinds)
    assert {kinds[d] for d in first[:4]} == set(kinds.values())  # wave 1 of 4 devices: one of each kind
    tenth = first[: len(first) // 10]
    share = sum(kinds[d] == "x86_64/CUDA" for d in tenth) / len(tenth)
    assert 0.28 < share < 0.38  # every prefix holds each kind in its share


def test_the_gates_judge_the_new_version_against_the_same_devices_previous_one() -> None:
    assert judge(report("o"), SPEC) == ("pass", "active and healthy")
    slow = Vitals(inferences=100, errors=0, nan=0, drops=0, p95_ms=30.0, baseline_p95_ms=10.0, active_s=5)
    verdict, why = judge(report("o", vitals=slow), SPEC)
    assert verdict == "fail" and "3.0x the previous version's 10.0 ms (allowed 1.5x)" in why
    jitter = Vitals(inferences=100, errors=0, nan=0, drops=0, p95_ms=0.4, baseline_p95_ms=0.2, active_s=5)
    assert judge(report("o", vitals=jitter), SPEC) == ("pass", "active and healthy")  # 2x, but 0.2 ms: jitter
    tiny_but_slow = Vitals(inferences=100, errors=0, nan=0, drops=0, p95_ms=1.6, baseline_p95_ms=0.2, active_s=5)
    assert judge(report("o", vitals=tiny_but_slow), SPEC)[0] == "fail"
    fell = report("o", fallback=True, previous_provider="CUDAExecutionProvider")
    assert judge(fell, SPEC) == ("fail", "provider fell back from CUDAExecutionProvider to CPUExecutionProvider")
    errors = Vitals(inferences=100, errors=5, nan=0, drops=0, p95_ms=10.0, baseline_p95_ms=10.0, active_s=5)
    assert judge(report("o", vitals=errors), SPEC)[0] == "fail"
    drops = Vitals(inferences=100, errors=0, nan=0, drops=50, p95_ms=10.0, baseline_p95_ms=10.0, active_s=5)
    assert "drop rate" in judge(report("o", vitals=drops), SPEC)[1]
    young = Vitals(inferences=3, errors=0, nan=0, drops=0, p95_ms=10.0, baseline_p95_ms=10.0, active_s=1)
    assert judge(report("o", vitals=young), SPEC) == ("wait", "active, 3 of 20 inferences for its vitals")
    assert judge(report("o", "rolled-back", reason="probation failed"), SPEC) == (
        "fail",
        "rolled-back: probation failed",
    )
    assert judge(report("o", "downloading"), SPEC)[0] == "wait"


def test_the_abort_rule() -> None:
    assert abort_reason(5, 100, SPEC) is None  # 5% is not more than 5%
    assert abort_reason(6, 100, SPEC) == "6 of 100 device(s) failed (more than 5%)"
    strict = RolloutSpec(model="m", version="2", group="g", abort_count=2, abort_min=3)
    assert abort_reason(2, 1000, strict) == "2 device(s) failed (the limit is 2)"
    assert abort_reason(1, 2, RolloutSpec(model="m", version="2", group="g", abort_min=3)) is None


def test_windows_are_utc_and_may_wrap_midnight() -> None:
    from datetime import datetime, timezone

    night = datetime(2026, 12, 2, 23, 30, tzinfo=timezone.utc)
    assert in_window(("23:00-02:00",), night) and not in_window(("01:00-05:00",), night) and in_window((), night)


class Published:
    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []
        self.fail = False

    def __call__(self, items: list[tuple[str, bytes]]) -> None:
        if self.fail:
            raise RuntimeError("the broker is gone")
        self.items += items


def orders(published: Published, keys: dict[str, object]) -> dict[str, str]:
    """device -> the version of its last order."""
    out = {}
    for topic, payload in published.items:
        order = parse_order(payload, keys)  # type: ignore[arg-type]  # ed25519 public keys
        if order is not None:
            out[topic.split("/")[1]] = f"{order.version}{' allow_older' if order.allow_older else ''}"
    return out


def test_a_rollout_goes_wave_by_wave_and_completes_with_the_group_order(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    keys = {key_id(key.public_key()): key.public_key()}
    db = StateDB(tmp_path / "c.db")
    db.add_rollout("ro-1", SPEC)
    driver = Driver(db, db.rollouts()[0], key)
    driver.plan({f"d{i}": ("x86_64/CPU", "1.0.0") for i in range(8)})
    sent = Published()
    driver.tick(sent)
    assert db.rollouts()[0].wave == 0 and len(orders(sent, keys)) == 2
    for wave in range(4):
        for t in [t for t in driver.targets.values() if t.wave == wave]:
            assert t.order_id is not None
            driver.on_report(report(t.order_id, device=t.device))
        driver.tick(sent)
    assert db.rollouts()[0].state == "completed"
    assert sent.items[-1][0] == "edge/fleet/g/deploy" and set(orders(sent, keys).values()) == {"2.0.0"}


def test_a_wave_is_written_ahead_and_published_again_by_the_next_controller(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    db = StateDB(tmp_path / "c.db")
    db.add_rollout("ro-1", SPEC)
    driver = Driver(db, db.rollouts()[0], key)
    driver.plan({f"d{i}": ("x86_64/CPU", "1.0.0") for i in range(4)})
    broken = Published()
    broken.fail = True
    with pytest.raises(RuntimeError):
        driver.tick(broken)  # killed between the commit and the broker
    again = Published()
    Driver(db, db.rollouts()[0], key).republish(again)
    assert db.rollouts()[0].wave == 0 and len(again.items) == 1
    target = next(t for t in db.targets("ro-1") if t.wave == 0)
    assert again.items == [(f"edge/{target.device}/deploy", target.payload)]  # the same bytes, the same order id


def test_an_abort_holds_the_version_and_rolls_back_only_the_devices_that_were_sent_it(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    keys = {key_id(key.public_key()): key.public_key()}
    db = StateDB(tmp_path / "c.db")
    db.add_rollout("ro-1", SPEC)
    driver = Driver(db, db.rollouts()[0], key)
    driver.plan({f"d{i}": ("x86_64/CPU", "1.0.0") for i in range(8)})
    sent = Published()
    driver.tick(sent)
    first, second = (t for t in driver.targets.values() if t.wave == 0)
    assert first.order_id and second.order_id
    driver.on_report(report(first.order_id, device=first.device))
    driver.on_report(report(second.order_id, "rolled-back", device=second.device, reason="probation failed"))
    driver.tick(sent)
    assert db.rollouts()[0].state == "aborting" and "1 of 2 device(s) failed" in (db.rollouts()[0].reason or "")
    assert db.held("m", "2.0.0") is not None
    assert orders(sent, keys) == {first.device: "1.0.0 allow_older", second.device: "1.0.0 allow_older"}
    for t in (first, second):
        assert t.rb_order is not None
        driver.on_report(report(t.rb_order, device=t.device, version="1.0.0", running="1.0.0"))
    driver.tick(sent)
    assert db.rollouts()[0].state == "aborted" and {t.state for t in db.targets("ro-1") if t.wave > 0} == {"planned"}


def signed(key: Ed25519PrivateKey, r: DeviceReport) -> SignedReport:
    text, sig = split_signed(sign_report(key, r))
    return SignedReport(text, sig, parse_report_text(text))


def test_only_reports_signed_by_the_enrolled_key_count(tmp_path: Path) -> None:
    mine, other, stranger = (Ed25519PrivateKey.generate() for _ in range(3))
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text("devices:\n" + enrollment_entry("d0", "g", mine) + enrollment_entry("d1", "g", other))
    checker = ReportChecker(load_enrollment(inventory))
    assert checker.check("d0", signed(mine, report("o"))) is None
    forged = checker.check("d0", signed(other, report("o")))
    assert forged is not None and forged.type == "report.forged" and "signed by d1's key" in forged.reason
    unknown = checker.check("d0", signed(stranger, report("o")))
    assert unknown is not None and unknown.type == "report.unenrolled"
    assert checker.check("d9", signed(mine, report("o", device="d9"))).type == "report.unenrolled"  # type: ignore[union-attr]
    assert checker.check("d1", signed(mine, report("o"))).type == "report.forged"  # type: ignore[union-attr]  # names d0
    good = signed(mine, report("o"))
    altered = SignedReport(good.text.replace(b"2.0.0", b"2.0.1", 1), good.sig, good.report)
    tampered = checker.check("d0", altered)
    assert tampered is not None and tampered.type == "report.forged" and "bad signature" in tampered.reason


@pytest.mark.parametrize(
    "text, message",
    [
        ("devices: [a]", "expected a mapping"),
        ('devices: {"../x": {key: "ed25519:AA=="}}', "is not a device id"),
        ('devices: {d0: {key: "rsa:AA=="}}', "devices.d0.key: expected ed25519:"),
        ("devices: {d0: {key: x, extra: 1}}", "devices.d0: expected"),
    ],
)
def test_a_bad_inventory_is_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "inventory.yaml"
    path.write_text(text)
    with pytest.raises(EnrollmentError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_enrollment(path)


def test_the_report_payload_is_its_text_and_a_device_report_signature() -> None:
    key = Ed25519PrivateKey.generate()
    doc = json.loads(sign_report(key, report("o")))
    assert set(doc) == {"report", "sig"} and json.loads(doc["report"])["schema"] == 1
    assert doc["sig"]["type"] == "application/vnd.edge-agent.device-report+json"


@pytest.mark.parametrize(
    "field, value",
    [("inferences", -1), ("errors", -20), ("nan", -1), ("drops", -20), ("active_s", -1.0), ("p95_ms", -1.0),
     ("baseline_p95_ms", float("inf")), ("p95_ms", float("nan"))],
)  # fmt: skip
def test_the_contract_refuses_vitals_the_gates_cannot_divide_by(field: str, value: float) -> None:
    """An enrolled device's key signs what it is given: errors = -inferences made the gates divide by zero."""
    good = Vitals(inferences=20, errors=0, nan=0, drops=0, p95_ms=10.0, baseline_p95_ms=9.0, active_s=5)
    fields = json.loads(report_text(report("o", vitals=good)))
    fields["vitals"][field] = value
    with pytest.raises(ContractError, match=f"field 'vitals.{field}'"):
        parse_report_text(json.dumps(fields))


def test_a_rate_with_nothing_to_divide_by_is_waited_for() -> None:
    """`min_inferences` 0 is refused at the start, but a rollout stored before that still runs on it."""
    lax = RolloutSpec(model="m", version="2.0.0", group="g", min_inferences=0)
    for counts in ({"inferences": 0, "errors": 0, "drops": 0}, {"inferences": 0, "errors": 5, "drops": 0}):
        vitals = Vitals(**counts, nan=0, p95_ms=10.0, baseline_p95_ms=9.0, active_s=1)  # type: ignore[arg-type]
        assert judge(report("o", vitals=vitals), lax) == ("wait", "active, 0 inferences: no rate to judge yet")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"abort_count": 0}, "--abort-count: expected a count, 1 or more"),
        ({"abort_count": -1}, "--abort-count: expected a count, 1 or more"),
        ({"abort_min": -3}, "--abort-min: expected a count, 0 or more"),
        ({"min_inferences": 0}, "--min-inferences: expected a count, 1 or more"),
        *(({"max_error_rate": v}, "--max-error-rate: expected a rate from 0 to 1") for v in (NAN, INF, -0.1, 1.5)),
        *(({"max_drop_rate": v}, "--max-drop-rate: expected a rate from 0 to 1") for v in (NAN, INF, -0.1, 1.5)),
        *(({"max_p95_ratio": v}, "--max-p95-ratio: expected a ratio above 1") for v in (NAN, INF)),
    ],
)
def test_a_spec_that_would_switch_a_gate_off_or_abort_at_once_is_refused(
    fields: dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError) as refused:
        check_spec(RolloutSpec(model="m", version="2.0.0", group="g", **fields))  # type: ignore[arg-type]
    assert str(refused.value) == message


def test_the_limits_a_spec_may_take() -> None:
    check_spec(SPEC)  # the CLI's defaults
    edges = {"abort_count": 1, "abort_min": 0, "min_inferences": 1, "max_error_rate": 0.0, "max_drop_rate": 1.0}
    check_spec(RolloutSpec(model="m", version="2.0.0", group="g", **edges))  # type: ignore[arg-type]


def test_a_nan_limit_on_the_command_line_is_one_line_and_exit_2(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "agent", "fleet", "rollout", "start", "--model", "m", "--version", "2.0.0",
            "--to", "group:g", "--max-error-rate", "nan", "--db", str(tmp_path / "c.db")]  # fmt: skip
    run = subprocess.run(argv, capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=60)
    assert run.returncode == 2 and run.stderr.splitlines() == [
        "edge-agent start: --max-error-rate: expected a rate from 0 to 1"
    ], run.stderr
    assert not (tmp_path / "c.db").exists()


def test_a_report_that_breaks_the_controller_is_one_event_and_the_others_still_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever bug a signed report reaches (here: a stored spec whose p95 margin is null, which only a slow
    device's report touches) is that device's event; the controller judges the other reports."""
    keys = {f"d{i}": Ed25519PrivateKey.generate() for i in range(2)}
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text("devices:\n" + "".join(enrollment_entry(d, "g", k) for d, k in keys.items()))
    controller = Controller(
        BrokerSettings("mqtt://127.0.0.1"), tmp_path / "c.db", Ed25519PrivateKey.generate(), inventory
    )
    controller._load_enrollment()
    spec = RolloutSpec(model="m", version="2.0.0", group="g", waves=("100%",), min_p95_increase_ms=None)  # type: ignore[arg-type]
    controller.db.add_rollout("ro-1", spec)
    driver = controller.drivers["ro-1"] = Driver(controller.db, controller.db.rollouts()[0], controller.key)
    driver.plan(dict.fromkeys(keys, ("x86_64/CPU", "1.0.0")))
    driver.tick(Published())
    slow = Vitals(inferences=100, errors=0, nan=0, drops=0, p95_ms=30.0, baseline_p95_ms=10.0, active_s=5)
    bad = signed(keys["d0"], report(driver.targets["d0"].order_id or "", device="d0", vitals=slow))
    for _ in range(2):  # a retained report is read back at every resync: one event
        controller._report("d0", bad, live=False)
    controller._report("d1", signed(keys["d1"], report(driver.targets["d1"].order_id or "", device="d1")), live=True)
    assert (driver.targets["d0"].state, driver.targets["d1"].state) == ("ordered", "passed")
    (event,) = controller.db.events()
    assert event[1:3] == ("d0", "report.unhandled") and "report of d0 not counted: TypeError" in event[3], event
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "device=d0" in lines[0].getMessage() and lines[0].exc_info is None
