"""A device's earlier signed report on the same order, published again after the device moved on, is a
replay: a report counts only when its `ts` is later than that of the last one counted for the target,
which the state file keeps with the outcome. Real parts: the controller's report path (signatures checked
against the enrolled keys), the driver and the SQLite state file; no broker."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.cloud.fleet.client import BrokerSettings
from agent.cloud.fleet.controller import Controller
from agent.cloud.fleet.inventory import SignedReport
from agent.cloud.fleet.plan import RolloutSpec
from agent.cloud.fleet.state import ACTIVE_STATES, SCHEMA, StateDB, Target
from agent.service.identity import enrollment_entry
from agent.transport.contract.report import Vitals
from tests.test_rollouts import Published, report, signed

SPEC = RolloutSpec(model="m", version="2.0.0", group="g", waves=("100%",), abort_min=2)  # aborts at 2 failures
GOOD = Vitals(inferences=100, errors=0, nan=0, drops=0, p95_ms=10.0, baseline_p95_ms=10.0, active_s=5)
EARLY, LATE, LATER = "2026-12-02T10:00:00.000Z", "2026-12-02T10:05:00.000Z", "2026-12-02T10:06:00.000Z"


class Fleet:
    """Four enrolled devices and a controller driving one rollout of the version to all of them (one wave)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp, self.key, self.sent = tmp_path, Ed25519PrivateKey.generate(), Published()
        self.keys = {f"d{i}": Ed25519PrivateKey.generate() for i in range(4)}
        (tmp_path / "inventory.yaml").write_text(
            "devices:\n" + "".join(enrollment_entry(d, "g", k) for d, k in self.keys.items())
        )
        self.controller = self.start()
        self.controller.db.add_rollout("ro-1", SPEC)
        self.driver = self.controller.drivers["ro-1"] = self.controller.driver(self.controller.db.rollouts()[0])
        self.driver.plan(dict.fromkeys(self.keys, ("x86_64/CPU", "1.0.0")))
        self.driver.tick(self.sent)

    def start(self) -> Controller:
        """A controller on the state file as it starts (not connected: its report path is what is tested)."""
        c = Controller(BrokerSettings("mqtt://127.0.0.1"), self.tmp / "c.db", self.key, self.tmp / "inventory.yaml")
        c._load_enrollment()
        for rollout in c.db.rollouts(ACTIVE_STATES):
            c.drivers[rollout.id] = c.driver(rollout)
        return c

    def restart(self) -> None:
        """The controller stopped and started again: a new store object on the same file, new drivers."""
        self.controller.db.close()
        self.controller = self.start()
        self.driver = self.controller.drivers["ro-1"]

    def report(self, device: str, state: str, ts: str) -> SignedReport:
        """The device's signed report on its order: active and healthy, or rolled back."""
        order = self.driver.targets[device].order_id
        assert order is not None
        if state == "active":
            return signed(self.keys[device], report(order, device=device, ts=ts, vitals=GOOD))
        return signed(self.keys[device], report(order, state, device=device, ts=ts, reason="probation failed"))

    def deliver(self, *reports: SignedReport, live: bool = True) -> None:
        """Reports as they come off the broker (live), or as a starting controller reads the retained ones."""
        for r in reports:
            self.controller._report(r.report.device, r, live=live)
        self.driver.tick(self.sent)

    def states(self) -> dict[str, str]:
        return {t.device: t.state for t in self.controller.db.targets("ro-1")}

    def events(self) -> list[tuple[str | None, str]]:
        return [(device, type_) for _, device, type_, _ in self.controller.db.events("ro-1")]


def test_an_earlier_report_published_again_is_a_replay_and_the_rollout_aborts(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    captured = fleet.report("d0", "active", EARLY)  # kept by someone who can write edge/d0/report
    fleet.deliver(captured, fleet.report("d0", "rolled-back", LATE))
    assert fleet.states()["d0"] == "failed" and fleet.controller.db.rollouts()[0].state == "running"  # 1 < 2
    fleet.deliver(captured)  # the same bytes, published again
    assert fleet.states()["d0"] == "failed"
    assert fleet.events() == [("d0", "report.replayed")]
    fleet.deliver(fleet.report("d1", "rolled-back", LATE), *(fleet.report(d, "active", LATER) for d in ("d2", "d3")))
    rollout = fleet.controller.db.rollouts()[0]
    assert rollout.state == "aborting" and rollout.reason == "2 of 4 device(s) failed (more than 5%)"
    assert rollout.group_order is None and not any(topic == "edge/fleet/g/deploy" for topic, _ in fleet.sent.items)
    assert fleet.events() == [("d0", "report.replayed")]  # once, however often the replay comes


def test_the_latest_report_again_changes_nothing_and_records_nothing(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    early, latest = fleet.report("d0", "active", EARLY), fleet.report("d0", "rolled-back", LATE)
    fleet.deliver(early, latest)
    before = fleet.controller.db.targets("ro-1")
    fleet.deliver(latest)  # delivered twice (QoS 1)
    fleet.deliver(latest, live=False)  # the retained report read back, as at a start or a resync
    assert fleet.controller.db.targets("ro-1") == before and fleet.events() == []
    assert next(t for t in before if t.device == "d0").report_ts == LATE  # what a later report is compared with
    fleet.deliver(early)  # an older one is a replay: the duplicate was told apart from it, not merely unrecorded
    assert fleet.events() == [("d0", "report.replayed")] and fleet.controller.db.targets("ro-1") == before


def test_the_last_counted_ts_survives_a_restart_so_a_replay_after_it_is_refused(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    captured = fleet.report("d0", "active", EARLY)
    latest = fleet.report("d0", "rolled-back", LATE)
    fleet.deliver(captured, latest)
    fleet.restart()
    fleet.deliver(captured, live=False)  # republished retained while the controller was down: what it reads back
    assert fleet.states()["d0"] == "failed" and fleet.events() == [("d0", "report.replayed")]
    fleet.restart()
    fleet.deliver(latest, live=False)  # the device's own latest report, retained: nothing new
    assert fleet.states()["d0"] == "failed" and fleet.events() == [("d0", "report.replayed")]
    fleet.deliver(fleet.report("d1", "rolled-back", LATE))
    assert fleet.controller.db.rollouts()[0].state == "aborting"


def test_a_state_file_from_before_the_report_ts_column_opens_and_keeps_its_targets(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    old = sqlite3.connect(path)
    old.executescript(SCHEMA.replace(" report_ts TEXT,", ""))
    old.execute(
        "INSERT INTO targets (rollout, device, pos, wave, kind, state) VALUES ('ro-1', 'd0', 0, 0, 'k', 'failed')"
    )
    old.commit()
    old.close()
    db = StateDB(path)
    (target,) = db.targets("ro-1")
    assert target == Target("d0", 0, 0, "k", None, "failed", None, None, None)  # no report counted yet
    target.report_ts = LATE
    with db.tx() as tx:
        db.save_targets(tx, "ro-1", [target])
    db.close()
    assert StateDB(path).targets("ro-1")[0].report_ts == LATE
