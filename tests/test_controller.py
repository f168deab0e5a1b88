"""The rollout controller as a real process, against a real Mosquitto and registry, with simulated devices
(tests/helpers/simfleet.py: real MQTT clients that verify orders and sign their reports) and, at the
end, real agents: waves, kill -9 in every phase, the lease, and reports that must not count."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.cloud.roots import Change
from agent.models.signing import DEVICE_REPORT, key_id, load_public_keys, sign
from agent.service.identity import sign_report
from agent.transport.contract.report import DeviceReport, parse_report_text, signed_payload, split_signed
from agent.util.timefmt import utc_iso
from tests.helpers.broker import Mosquitto
from tests.helpers.daemon_proc import REPO, AgentProcess, heavy_linear, sensor_csv
from tests.helpers.fleet_rig import ControllerProcess, Rig, make_rig
from tests.helpers.models import linear_model, save
from tests.helpers.mqtt_client import Subscriber
from tests.helpers.registry import make_registry
from tests.helpers.simfleet import SimFleet, make_devices, write_inventory
from tests.helpers.waiting import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def rig(tmp_path: Path, own_broker: Mosquitto) -> Iterator[Rig]:
    made = make_rig(tmp_path, own_broker, n=8, regress={"3.0.0": ("p95", 1.0)})
    try:
        yield made
    finally:
        made.controller.stop()
        made.fleet.stop()
        made.registry.server.stop()


def one_order_each(rig: Rig, rollout_id: str) -> None:
    """No device was sent a wave twice: each acted on at most one order of the rollout (and one rollback)."""
    for device, ids in rig.fleet.received.items():
        mine = [i for i in ids if i.startswith(rollout_id + ".w")]
        assert len(mine) <= 1, (device, ids)


def test_a_rollout_goes_in_waves_and_completes_on_signed_reports(rig: Rig) -> None:
    rig.controller.start()
    rollout_id = rig.start_rollout("2.0.0", "--waves", "25%,50%,75%,100%")
    done = rig.wait_state(rollout_id, "completed")
    targets = rig.targets(rollout_id)
    assert {t.state for t in targets} == {"passed"} and done.wave == max(t.wave for t in targets) == 1
    # 8 devices of 6 hardware kinds: the first wave (25%) grows to one device of each kind
    assert len({t.kind for t in targets if t.wave == 0}) == 6 == len({t.kind for t in targets})
    assert set(rig.versions().values()) == {"2.0.0"}
    one_order_each(rig, rollout_id)
    status = rig.cli("status", rollout_id)
    assert "completed" in status.stdout and "wave 2: 2 device(s): 2 passed" in status.stdout, status.stdout


def test_kill9_between_waves_then_restart_finishes_as_if_not_killed(rig: Rig) -> None:
    rig.controller.start()
    rollout_id = rig.start_rollout("2.0.0", "--waves", "25%,50%,75%,100%", "--soak", "3s")
    assert wait_for(lambda: rig.rollout(rollout_id).wave_settled is not None, 30)  # wave 1 done, soaking
    rig.controller.kill9()
    rig.controller.start()
    rig.wait_state(rollout_id, "completed")
    one_order_each(rig, rollout_id)
    assert set(rig.versions().values()) == {"2.0.0"}


def test_kill9_mid_wave_then_restart_finishes_without_repeating_the_wave(rig: Rig) -> None:
    rig.fleet.held.update(d.id for d in rig.fleet.devices)  # they sit on their orders
    rig.controller.start()
    rollout_id = rig.start_rollout("2.0.0", "--waves", "50%,100%")
    assert wait_for(lambda: sum(rig.fleet.received.values(), []) == [] and any(
        t.state == "ordered" for t in rig.targets(rollout_id)), 30)  # fmt: skip
    assert wait_for(lambda: len(rig.fleet._waiting) == 6, 30)  # wave 1: one device of each of 6 kinds
    rig.controller.kill9()
    rig.fleet.release(*(d.id for d in rig.fleet.devices))  # the wave goes on while no controller runs
    rig.controller.start()
    rig.wait_state(rollout_id, "completed")
    one_order_each(rig, rollout_id)
    assert set(rig.versions().values()) == {"2.0.0"}


def test_a_regressing_wave_aborts_and_kill9_during_the_abort_still_rolls_everyone_back(rig: Rig) -> None:
    rig.controller.start()
    first = rig.start_rollout("2.0.0", "--waves", "100%")
    rig.wait_state(first, "completed")
    rollout_id = rig.start_rollout("3.0.0", "--waves", "25%,50%,75%,100%")  # p95 x3 on every device
    assert wait_for(lambda: any(t.state == "failed" for t in rig.targets(rollout_id)), 30)
    rig.fleet.held.update(d.id for d in rig.fleet.devices)  # the rollback orders wait on the devices
    aborting = rig.wait_state(rollout_id, "aborting", "aborted")
    assert aborting.state == "aborting", aborting
    rig.controller.kill9()
    rig.fleet.release(*(d.id for d in rig.fleet.devices))
    rig.controller.start()
    aborted = rig.wait_state(rollout_id, "aborted")
    assert "failed (more than 5%)" in (aborted.reason or ""), aborted
    wave1 = [t for t in rig.targets(rollout_id) if t.wave == 0]
    assert {t.rb_state for t in wave1} == {"done"}
    assert {t.state for t in rig.targets(rollout_id) if t.wave > 0} == {"planned"}  # never sent the version
    assert set(rig.versions().values()) == {"2.0.0"}
    again = rig.cli("start", "--model", "m", "--version", "3.0.0", "--to", "group:g")
    assert again.returncode == 1 and "is held fleet-wide" in again.stderr, again.stderr


def test_forged_replayed_and_unenrolled_reports_are_ignored_and_reported(rig: Rig) -> None:
    rig.controller.start()
    first = rig.start_rollout("2.0.0", "--waves", "100%")
    rig.wait_state(first, "completed")
    sub = Subscriber(rig.broker.port, "edge/+/report")
    sub.sync()  # every device's retained report is in (a count of messages could hold one device's twice)
    old = {
        d.id: bytes(sub.on(f"edge/{d.id}/report")[-1].payload)
        for d in rig.fleet.devices
        if sub.on(f"edge/{d.id}/report")
    }
    assert len(old) == 8, sorted(old)
    rig.fleet.held.update(d.id for d in rig.fleet.devices)
    rollout_id = rig.start_rollout("3.0.0", "--waves", "100%", "--allow-fallback")
    assert wait_for(lambda: len(rig.fleet._waiting) == 8, 30)
    victim, other = rig.fleet.devices[0], rig.fleet.devices[1]
    target = next(t for t in rig.targets(rollout_id) if t.device == victim.id)
    assert target.order_id is not None

    def claim(key: Ed25519PrivateKey) -> bytes:
        text, _ = split_signed(old[victim.id])
        fields = json.loads(text)
        fields.update(order=target.order_id, version="3.0.0", running="3.0.0", ts=utc_iso(0))
        return sign_report(key, DeviceReport(**fields))

    sub.publish(f"edge/{victim.id}/report", claim(other.key))  # another device's key
    sub.publish(f"edge/{victim.id}/report", claim(Ed25519PrivateKey.generate()))  # a key nobody enrolled
    sub.publish(f"edge/{victim.id}/report", old[victim.id])  # its own, genuine report of the older order
    kinds = {"report.forged", "report.unenrolled", "report.replayed"}
    assert wait_for(lambda: kinds <= {e[2] for e in rig.events() if e[1] == victim.id}, 20), rig.events()
    assert next(t for t in rig.targets(rollout_id) if t.device == victim.id).state == "ordered"  # none counted
    assert parse_report_text(split_signed(old[victim.id])[0]).order != target.order_id
    status = rig.cli("status", rollout_id)
    assert "event report.forged" in status.stdout and "event report.replayed" in status.stdout, status.stdout
    rig.fleet.release(*(d.id for d in rig.fleet.devices))
    rig.wait_state(rollout_id, "aborted")  # every device regresses on 3.0.0: p95 x3
    sub.close()


def test_a_second_controller_waits_while_the_first_holds_the_lease(rig: Rig) -> None:
    rig.controller.start()
    second = ControllerProcess(rig.tmp, rig.broker, rig.registry.key, rig.inventory, name="c2")
    second.start(ready=False)
    try:
        assert wait_for(lambda: "standby: the lease is held by c1@" in second.text(), 20), second.text()
        rollout_id = rig.start_rollout("2.0.0", "--waves", "50%,100%")
        rig.wait_state(rollout_id, "completed")
        # A standby line written after the completion: the second's log holds all it did until then.
        standby = second.text().count("standby: the lease is held by")
        assert wait_for(lambda: second.text().count("standby: the lease is held by") > standby, 30), second.text()
        assert "planned" not in second.text() and "fleet read devices=" not in second.text()
        rig.controller.kill9()  # the first dies: the second takes over once the lease (3 s) runs out
        assert wait_for(lambda: "fleet read devices=" in second.text(), 30), second.text()
    finally:
        second.stop()


def test_real_agents_roll_forward_then_a_slow_version_aborts_and_rolls_the_wave_back(
    tmp_path: Path, own_broker: Mosquitto
) -> None:
    """Three real agents: 2.0.0 goes to all in two waves; 3.0.0, far slower, fails the p95 gate on the
    first wave, which is rolled back to 2.0.0, and the device of the second wave never sees it."""
    registry = make_registry(tmp_path / "reg")
    registry.publish("m", "1.0.0", save(linear_model(np.full((3, 1), 1.0)), tmp_path / "v1.onnx"), channel="stable")
    registry.publish("m", "2.0.0", save(linear_model(np.full((3, 1), 2.0)), tmp_path / "v2.onnx"), channel=None)
    registry.publish("m", "3.0.0", heavy_linear(tmp_path / "v3.onnx", 3.0, size=256, layers=12), channel=None)
    csv = sensor_csv(tmp_path / "sensor.csv")
    names = ("ra", "rb", "rc")
    agents = [
        AgentProcess(tmp_path, d, "g", own_broker.url, registry.url, registry.public_key, csv=csv,
                     registry={"probation": {"duration": "60s", "min_inferences": 20}})
        for d in names
    ]  # fmt: skip
    controller = None
    try:
        for agent in agents:
            agent.start()
        inventory = tmp_path / "inventory.yaml"
        entries = []
        for agent in agents:
            enrolled = subprocess.run(
                [sys.executable, "-m", "agent", "fleet", "enroll", "--profile", str(agent.profile)],
                capture_output=True, text=True, cwd=REPO, timeout=60,
            )  # fmt: skip
            assert enrolled.returncode == 0, enrolled.stderr
            entries.append(enrolled.stdout.splitlines()[-1] + "\n")
        inventory.write_text("devices:\n" + "".join(entries))
        sub = Subscriber(own_broker.port, "edge/+/health")
        assert wait_for(lambda: len({m.topic for m in sub.messages}) == 3, 90), [a.stderr()[-2000:] for a in agents]
        sub.close()
        controller = ControllerProcess(tmp_path, own_broker, registry.key, inventory).start()
        rig = Rig(tmp_path, own_broker, registry, None, inventory, controller)  # type: ignore[arg-type]  # no simulated devices
        good = rig.start_rollout("2.0.0", "--waves", "2,all", "--min-inferences", "10")
        rig.wait_state(good, "completed", timeout=120)
        bad = rig.start_rollout("3.0.0", "--waves", "2,all", "--min-inferences", "10")
        aborted = rig.wait_state(bad, "aborted", timeout=180)
        targets = rig.targets(bad)
        first = [t for t in targets if t.wave == 0]
        assert len(first) == 2 and {t.rb_state for t in first} == {"done"}, targets
        assert any("p95" in (t.reason or "") for t in first), targets
        assert [t.state for t in targets if t.wave == 1] == ["planned"], aborted
        served = Subscriber(own_broker.port, "edge/+/report")
        served.sync()  # every agent's retained report is in; the latest of each is what it runs
        running = {
            d: parse_report_text(split_signed(bytes(served.on(f"edge/{d}/report")[-1].payload))[0]).running
            for d in names
            if served.on(f"edge/{d}/report")
        }
        served.close()
        assert set(running) == set(names), running
        assert set(running.values()) == {"2.0.0"}, running
    finally:
        if controller is not None:
            controller.stop()
        for agent in agents:
            agent.stop()
        registry.server.stop()


def test_a_device_that_joins_the_group_mid_rollout_gets_the_version_only_once_it_completed(rig: Rig) -> None:
    """A dynamic group: the plan is the group as it stood at the start; a device that connects later is
    sent nothing by the waves, and follows the group order the completion writes."""
    rig.fleet.held.update(d.id for d in rig.fleet.devices)  # the first wave sits on its orders
    rig.controller.start()
    rollout_id = rig.start_rollout("2.0.0", "--waves", "50%,100%")
    assert wait_for(lambda: len(rig.fleet._waiting) == 6, 30)
    (late,) = make_devices(1, start=50, group="g", model="m", version="1.0.0", seed="test", regress={})
    write_inventory(rig.inventory, [*rig.fleet.devices, late])  # enrolled, too: the plan is what decides
    joined = SimFleet([late], rig.broker.port, rig.registry.url, load_public_keys(rig.registry.public_key)).start()
    try:
        assert wait_for(lambda: joined.online() == 1, 30)
        time.sleep(2)  # a few of the controller's steps while it is in the group
        assert joined.received == {} and late.version == "1.0.0"
        assert late.id not in {t.device for t in rig.targets(rollout_id)}
        rig.fleet.release(*(d.id for d in rig.fleet.devices))
        rig.wait_state(rollout_id, "completed")
        assert wait_for(lambda: late.version == "2.0.0", 30), joined.received
        assert joined.received == {late.id: [f"{rollout_id}.group"]}
    finally:
        joined.stop()


def test_a_rollout_is_not_started_once_the_registry_no_longer_names_the_key_for_orders(rig: Rig) -> None:
    """The registry's root moves orders to another key while the controller runs: the next rollout would
    write orders every device refuses, so it is aborted unsent, with the reason."""
    rig.controller.start()
    new = Ed25519PrivateKey.generate()
    rig.registry.next_root(Change(role="orders", keys={key_id(new.public_key()): new.public_key()}))
    rollout_id = rig.start_rollout("2.0.0", "--waves", "100%")
    aborted = rig.wait_state(rollout_id, "aborted")
    assert "is not an orders key of" in (aborted.reason or "") and "root version 2" in (aborted.reason or ""), aborted
    assert rig.targets(rollout_id) == [] and rig.fleet.received == {}
    # The log line may be written after the state: waited for, not read once.
    line = "rollout " + rollout_id + " not started"
    assert wait_for(lambda: line in rig.controller.text(), 30), rig.controller.text()[-3000:]


def test_a_lost_broker_connection_ends_the_controller_in_one_line_for_its_service_to_restart(rig: Rig) -> None:
    """paho's own loop reconnected into a new session without the subscriptions: the controller went on
    renewing its lease and hearing no report. Now a lost connection ends it (exit 1, one line) and the
    service manager starts it again, reading the fleet afresh (systemd/edge-agent-controller.service)."""
    rig.controller.start()
    proc = rig.controller.proc
    assert proc is not None
    rig.broker.kill()
    try:
        code = proc.wait(60)  # a loaded machine: the exit is waited for, its absence said plainly
    except subprocess.TimeoutExpired:
        code = None
    assert code == 1, rig.controller.text()[-2000:]
    log = rig.controller.text()
    assert f"lost the connection to the broker at {rig.broker.url}" in log.splitlines()[-1], log[-2000:]
    assert "Traceback" not in log


def test_a_hostile_signed_report_does_not_stop_the_controller(rig: Rig) -> None:
    """An enrolled device signs errors = -inferences: the gates divided by zero and the controller died, and
    again at every restart (the report is retained). Now the contract refuses it and the others count."""
    rig.fleet.held.update(d.id for d in rig.fleet.devices)
    rig.controller.start()
    rollout_id = rig.start_rollout("2.0.0", "--waves", "100%")
    assert wait_for(lambda: len(rig.fleet._waiting) == 8, 30)
    victim, others = rig.fleet.devices[0], [d.id for d in rig.fleet.devices[1:]]
    order = next(t.order_id for t in rig.targets(rollout_id) if t.device == victim.id)
    hostile = {"schema": 1, "device": victim.id, "order": order, "ts": utc_iso(time.time()), "model": "m",
               "version": "2.0.0", "state": "active", "running": "2.0.0", "previous": "1.0.0",
               "vitals": {"inferences": 20, "errors": -20, "nan": 0, "drops": 0, "active_s": 1.0}}  # fmt: skip
    text = json.dumps(hostile).encode()
    sub = Subscriber(rig.broker.port, "edge/+/nothing")
    sub.client.publish(
        f"edge/{victim.id}/report", signed_payload(text, sign(victim.key, text, DEVICE_REPORT)), qos=1, retain=True
    ).wait_for_publish(5)
    sub.close()
    rig.fleet.release(*others)
    passed = dict.fromkeys(others, "passed")
    assert wait_for(
        lambda: {t.device: t.state for t in rig.targets(rollout_id)} == {victim.id: "ordered", **passed}, 30
    ), rig.controller.text()[-3000:]
    rig.controller.kill9()
    rig.controller.start()  # reads the retained hostile report back
    rig.fleet.release(victim.id)
    rig.wait_state(rollout_id, "completed")
    assert "Traceback" not in rig.controller.text()
