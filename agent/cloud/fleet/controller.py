"""`edge-agent fleet controller`: the service that drives every rollout, from the broker and one state file.

It holds the leases (`agent.cloud.fleet.lease`), reads every device's retained status, health and
signed report (`Inventory.load`), then loops: the devices' messages as they come, and every `TICK` the
rollouts in the state file (new ones are planned, operators' requests applied, each driven a step by
`agent.cloud.fleet.rollout.Driver`). A report counts only when it verifies against the inventory of
enrolled devices (`agent.cloud.fleet.reports`); one that does not, and a live report that answers an
older order than the one the device was sent, are ignored and recorded as fleet events (the state
file's `events`, shown by `fleet rollout status`, and the log). With `registry` known, a rollout is
planned only while the registry's keys document names the controller's key for orders
(`agent.cloud.fleet.orderkey`): one that would write orders every device refuses is aborted unsent.

What one device can make the controller keep and write is bounded by the controller, not by how many
reports the device sends (a compromised device once grew the memory by each distinct rejected report, up
to 16 KB, and the state file and the log by a line each): per rollout and device, the first
`KEPT_REJECTIONS` rejected reports are recorded one by one, the rest are counted in one event,
`report.rejected`, rewritten at most every `COUNT_EVERY` seconds (and when the rollout ends or the
controller stops). What is remembered of them is the digests of the device's latest `RECENT`: a retained
report read back (every `RESYNC`, every start) is recorded once, and one forgotten is judged again at the
cost of one signature check and counted again, never counted for the rollout (judging comes first, and a
report that counts is the driver's, keyed by its `ts`). Reasons quote the device's text `printable`.
Messages the contract refused (`Inventory.refused`) are logged, the inventory's first `KEPT_REFUSALS`
one line each, then their count at most every `REFUSALS_EVERY` seconds and when the controller stops.

Live messages are read at QoS 0 and can be dropped by a broker whose per-client queue is full; the
reports are retained, so every `RESYNC` seconds the controller reads back the reports of the devices it
is still waiting for.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.cloud.fleet.client import BrokerClient, BrokerSettings, FleetError
from agent.cloud.fleet.enrollment import EnrollmentError, load_enrollment
from agent.cloud.fleet.inventory import BATCH, Inventory, SignedReport
from agent.cloud.fleet.lease import Leases, owner_id
from agent.cloud.fleet.orderkey import check_order_key
from agent.cloud.fleet.reports import ReportChecker
from agent.cloud.fleet.rollout import ORDER_CHARS, Driver
from agent.cloud.fleet.state import ACTIVE_STATES, Rollout, StateDB
from agent.util.hashing import sha256_bytes
from agent.util.printable import printable
from agent.util.ratelimit import RateLimit

log = logging.getLogger(__name__)

TICK = 0.25  # seconds between two steps of the rollouts
RESYNC = 10.0  # seconds between two read-backs of the reports still awaited
STANDBY_POLL = 2.0  # how often a controller without the lease looks again
# A device's rejected reports in one rollout recorded one by one (an event, a log line each): enough to show
# what is wrong; a device whose key was replaced without enrolling it is rejected ~125 times a rollout
# (each step, and fresh vitals every 5 s for 10 min), a compromised one as often as it publishes.
KEPT_REJECTIONS = 5
COUNT_EVERY = 60.0  # seconds between two rewrites of a device's count of the rest (one row, one log line)
RECENT = 8  # a device's latest rejected reports remembered, as digests, so that one read back is not counted again
COUNTED = "report.rejected"  # the event that counts a device's rejected reports beyond the first ones
REASON_CHARS = 1000  # of an event's reason: rollout.unenrolled names up to 10 device ids of 64 characters
REFUSALS_EVERY = 60.0  # seconds between two log lines counting the devices' messages the contract refused


@dataclass
class Rejections:
    """What one device's rejected reports in one rollout made the controller write."""

    recent: deque[str] = field(default_factory=lambda: deque(maxlen=RECENT))  # digests, the latest last
    recorded: int = 0  # written one by one (KEPT_REJECTIONS at most)
    counted: int = 0  # the rest
    latest: str = ""  # the latest of the rest: its type and reason
    row: int | None = None  # the event that says how many the rest are
    shown: int = 0  # how many that event says
    when: float = 0.0  # when it was written (time.monotonic)


class Controller:
    def __init__(
        self,
        settings: BrokerSettings,
        db_path: Path,
        key: Ed25519PrivateKey,
        enrollment: Path,
        *,
        prefix: str = "edge",
        name: str = "controller",
        lease_ttl: float = 15.0,
        registry: str | None = None,
    ) -> None:
        self.settings, self.key, self.enrollment_path, self.prefix = settings, key, enrollment, prefix
        self.registry = registry
        self.db = StateDB(db_path)
        self.owner = owner_id(name)
        self.lease_ttl = lease_ttl
        self.drivers: dict[str, Driver] = {}
        self.checker = ReportChecker({})
        self._enrolled_mtime: float | None = None
        # (rollout, device) -> its rejected reports: only targets of a rollout under way reach it, so its size
        # is bounded by the plans (the operator's), and an entry is dropped when its rollout ends.
        self._rejections: dict[tuple[str | None, str], Rejections] = {}
        self._refusals_said = 0  # of the inventory's refusals kept as lines, those logged
        self._refused_said = 0  # the count of refused messages last logged
        self._refused_line = RateLimit(1, window=REFUSALS_EVERY)

    # ---- the service --------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> int:
        self._load_enrollment()
        client = BrokerClient(self.settings, client_id=f"edge-agent-{self.owner.replace('@', '-').replace(':', '-')}")
        client.connect()
        inventory = Inventory(client, self.prefix)
        leases = Leases(self.db, inventory, self.owner, self.lease_ttl)
        inventory.other = leases.note
        try:
            client.subscribe((leases.topic, 1, True), (inventory.marker_topic(), 0, True))
            inventory.sync()
            while not stop.is_set():
                holder = leases.acquire()
                if holder is None:
                    break
                log.info("standby: the lease is held by %s", holder)
                stop.wait(STANDBY_POLL)
                inventory.sync()
            if stop.is_set():
                return 0
            log.info("controller %s holds the lease; reading the fleet", self.owner)
            started = time.monotonic()
            inventory.load(("status", "health", "report"))
            log.info("fleet read devices=%d in %.1fs", len(inventory.devices), time.monotonic() - started)
            self._refresh(inventory)
            for device in sorted(inventory.devices):
                signed = inventory.devices[device].report
                if signed is not None:
                    self._report(device, signed, live=False)
            for driver in self.drivers.values():
                driver.republish(client.publish_many)  # what was written ahead and maybe never sent
            self._loop(inventory, leases, stop)
        finally:
            self._closing(inventory)
            try:
                leases.release()
            except FleetError as exc:
                log.warning("lease not released: %s", exc)
            client.close()
        return 0

    def _loop(self, inventory: Inventory, leases: Leases, stop: threading.Event) -> None:
        client = inventory.client
        next_tick = next_resync = time.monotonic()
        while not stop.is_set():
            msg = inventory.poll(max(0.0, min(TICK, next_tick - time.monotonic())))
            if msg is not None and msg.report is not None and msg.device is not None:
                self._report(msg.device, msg.report, live=True)
            if time.monotonic() < next_tick:
                continue
            next_tick = time.monotonic() + TICK
            if not leases.renew():
                raise FleetError("another controller holds the lease now; stopping (see the log)")
            self._load_enrollment()
            self._refresh(inventory)
            for driver in list(self.drivers.values()):
                driver.tick(client.publish_many)
            self._write_counts()
            self._say_refused(inventory)
            if time.monotonic() >= next_resync:
                next_resync = time.monotonic() + RESYNC
                self._resync(inventory)

    # ---- rollouts -------------------------------------------------------------------------------------

    def driver(self, rollout: Rollout) -> Driver:
        """The rollout's driver, its rejected reports in this controller's budget."""
        return Driver(self.db, rollout, self.key, self.prefix, functools.partial(self._budgeted, rollout.id))

    def _refresh(self, inventory: Inventory) -> None:
        """New rollouts are planned, finished ones dropped, operators' requests picked up."""
        for rollout in self.db.rollouts(ACTIVE_STATES):
            driver = self.drivers.get(rollout.id)
            if driver is None:
                driver = self.drivers[rollout.id] = self.driver(rollout)
            else:
                driver.r.request = rollout.request
            if driver.r.state == "pending":
                if driver.r.request == "abort":
                    with self.db.tx() as db:
                        self.db.update_rollout(db, rollout.id, state="aborted", reason="aborted before it started")
                    driver.r.state = "aborted"
                elif (refused := self._key_refused()) is not None:
                    with self.db.tx() as db:
                        self.db.update_rollout(db, rollout.id, state="aborted", reason=refused)
                    driver.r.state = "aborted"
                    log.error("rollout %s not started: %s", rollout.id, refused)
                else:
                    driver.plan(self._members(inventory, driver))
        for rid in [rid for rid, d in self.drivers.items() if d.r.state not in ACTIVE_STATES]:
            del self.drivers[rid]
        for key in [key for key in self._rejections if key[0] not in self.drivers]:
            self._write_count(key, self._rejections.pop(key), force=True)

    def _key_refused(self) -> str | None:
        """Why the registry's keys document no longer names this controller's key for orders (None: it does,
        or the registry is unknown or unreachable, which is logged)."""
        if not self.registry:
            return None
        try:
            warning = check_order_key(self.registry, self.key)
        except FleetError as exc:
            return str(exc)
        if warning is not None:
            log.warning("%s", warning)
        return None

    def _members(self, inventory: Inventory, driver: Driver) -> dict[str, tuple[str, str | None]]:
        spec = driver.spec
        members: dict[str, tuple[str, str | None]] = {}
        unenrolled = []
        for device_id in inventory.group_members(spec.group):
            if device_id not in self.checker.enrolled:
                unenrolled.append(device_id)
                continue
            dev = inventory.devices[device_id]
            hardware = dev.health.hardware if dev.health is not None else None
            arch = getattr(hardware, "arch", "?")
            serving = dev.models().get(spec.model)
            kind = f"{arch}/{serving.provider if serving is not None else '?'}"
            members[device_id] = (kind, serving.version if serving is not None else None)
        if unenrolled:
            self._event(
                driver.r.id,
                None,
                "rollout.unenrolled",
                f"{len(unenrolled)} device(s) of group {spec.group} are not enrolled and not in the plan "
                f"(they get the version with the group order): {', '.join(unenrolled[:10])}",
            )
        return members

    # ---- reports --------------------------------------------------------------------------------------

    def _report(self, device: str, signed: SignedReport, live: bool) -> None:
        """One device's report counted where it answers an order. One that breaks the controller is that
        device's fleet event, not the fleet's outage: it is retained, and read back after every restart."""
        waiting = [(driver, ids) for driver in self.drivers.values() if (ids := driver.expects(device))]
        if not waiting:
            return  # no rollout was sent to this device: nothing counts the report (its signature is not checked)
        report = signed.report
        try:
            rejected = self.checker.check(device, signed)
            answered = None if rejected else next((d for d, ids in waiting if report.order in ids), None)
            if answered is not None:
                answered.on_report(report)
        except Exception as exc:  # any bug a report reaches: one line for this device, the others go on
            log.debug("report of %s not counted", device, exc_info=True)
            # The exception may quote what the device wrote (up to 16 KB, escape sequences, line breaks).
            said = printable(f"{type(exc).__name__}: {exc}")
            self._reject(device, signed, "report.unhandled", f"report of {device} not counted: {said}")
            return
        if rejected is not None:
            self._reject(device, signed, rejected.type, rejected.reason)
        elif answered is None and live:
            self._reject(
                device,
                signed,
                "report.replayed",
                f"report of {device} answers order {printable(report.order, ORDER_CHARS)}, not one it was sent",
            )

    def _reject(self, device: str, signed: SignedReport, type_: str, reason: str) -> None:
        """Record a rejected report: one by one up to KEPT_REJECTIONS per rollout and device, then counted."""
        rollout = next((d.r.id for d in self.drivers.values() if device in d.targets), None)
        seen = self._rejections.setdefault((rollout, device), Rejections())
        # The text's length first: no other (text, signature) pair hashes the same bytes.
        digest = sha256_bytes(len(signed.text).to_bytes(8, "big") + signed.text + signed.sig)
        if digest in seen.recent:
            return  # the same report again: a retained one read back at every resync and every start
        seen.recent.append(digest)
        self._budgeted(rollout, device, type_, reason)

    def _budgeted(self, rollout: str | None, device: str, type_: str, reason: str) -> None:
        """A device's rejected report in the rollout's budget: recorded, or counted past KEPT_REJECTIONS (a
        driver's replayed reports come here too: a stolen key signs ever older stamps as fast as it likes)."""
        seen = self._rejections.setdefault((rollout, device), Rejections())
        if seen.recorded < KEPT_REJECTIONS:
            seen.recorded += 1
            self._event(rollout, device, type_, reason)
            return
        seen.counted += 1
        seen.latest = f"{type_}: {reason}"
        self._write_count((rollout, device), seen)

    def _write_counts(self, force: bool = False) -> None:
        for key, seen in self._rejections.items():
            self._write_count(key, seen, force)

    def _write_count(self, key: tuple[str | None, str], seen: Rejections, force: bool = False) -> None:
        """The device's one `report.rejected` event says how many more there were: written at once the first
        time, then at most every COUNT_EVERY seconds (`force`: whatever the time, when the rollout ends or the
        controller stops)."""
        due = force or seen.row is None or time.monotonic() - seen.when >= COUNT_EVERY
        if seen.counted == seen.shown or not due:
            return
        rollout, device = key
        reason = printable(
            f"{seen.counted} more rejected report(s) of {device} not recorded one by one (the first "
            f"{KEPT_REJECTIONS} were); the latest: {seen.latest}",
            REASON_CHARS,
        )
        log.warning("fleet event type=%s device=%s rollout=%s %s", COUNTED, device, rollout, reason)
        seen.row = self.db.event(rollout, device, COUNTED, reason, replaces=seen.row)
        seen.shown, seen.when = seen.counted, time.monotonic()

    def _event(self, rollout: str | None, device: str | None, type_: str, reason: str) -> None:
        reason = printable(reason, REASON_CHARS)  # whatever a reason quotes, it writes no line of its own
        log.warning("fleet event type=%s device=%s rollout=%s %s", type_, device, rollout, reason)
        self.db.event(rollout, device, type_, reason)

    def _say_refused(self, inventory: Inventory, force: bool = False) -> None:
        """The devices' messages the contract refused: the inventory's first KEPT_REFUSALS one line each, then
        their count, at most every REFUSALS_EVERY seconds (`force`: whatever the time, as the controller stops)."""
        for line in inventory.refusals[self._refusals_said :]:
            log.warning("device message refused: %s", line)
        self._refusals_said = len(inventory.refusals)
        if inventory.refused > max(self._refused_said, self._refusals_said) and (force or self._refused_line.allow()):
            log.warning(
                "%d message(s) from devices refused since the start (the first %d logged one by one)",
                inventory.refused,
                self._refusals_said,
            )
            self._refused_said = inventory.refused

    def _closing(self, inventory: Inventory) -> None:
        """What is still only counted goes to the log and the state file as the controller stops."""
        self._say_refused(inventory, force=True)
        try:
            self._write_counts(force=True)
        except sqlite3.Error as exc:  # the lease is released all the same
            log.warning("counts of rejected reports not written: %s", exc)

    def _resync(self, inventory: Inventory) -> None:
        """Read back the retained reports of the devices still awaited (a live report may have been dropped)."""
        waiting = sorted(
            {t.device for d in self.drivers.values() for t in d.targets.values() if t.state == "ordered"}
            | {t.device for d in self.drivers.values() for t in d.targets.values() if t.rb_state == "ordered"}
        )
        for i in range(0, len(waiting), BATCH * 2):
            topics = [f"{self.prefix}/{device}/report" for device in waiting[i : i + BATCH * 2]]
            inventory.client.subscribe(*((t, 0, True) for t in topics))
            for msg in inventory.sync():
                if msg.report is not None and msg.device is not None:
                    self._report(msg.device, msg.report, live=False)
            inventory.client.unsubscribe(*topics)

    def _load_enrollment(self) -> None:
        try:
            mtime = self.enrollment_path.stat().st_mtime
        except OSError as exc:
            raise FleetError(f"--inventory: cannot read {self.enrollment_path}: {exc.strerror or exc}") from None
        if mtime == self._enrolled_mtime:
            return
        try:
            self.checker = ReportChecker(load_enrollment(self.enrollment_path))
        except EnrollmentError as exc:
            if self._enrolled_mtime is None:
                raise FleetError(str(exc), 2) from None
            log.error("inventory not reloaded (the previous one stays): %s", exc)
        self._enrolled_mtime = mtime
        log.info("inventory loaded devices=%d", len(self.checker.enrolled))
