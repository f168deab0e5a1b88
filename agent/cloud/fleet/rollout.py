"""One rollout, driven a step at a time: plan, waves of signed device orders, the gates, completion or abort.

Every step that publishes is written ahead: the orders of a wave (their exact signed bytes), the rollback
orders of an abort and the group order of a completion are committed to the state file first, then
published; a controller killed in between finds them there and publishes the same bytes again (orders
are idempotent by their id: a device acts on an id once). Outcomes come from the devices' signed reports,
which are retained: a restarted controller reads them back and reaches the same outcomes, so no wave is
lost or started twice. A report on a target's order counts only when its `ts` is later than that of the
last one counted (kept with the outcome): the same report again (a retained one read back) changes
nothing, and an older one, a signed report published again after the device moved on, is a replay,
recorded as the fleet event `report.replayed`.

- running: the current wave's devices are waited for (a report that passes the gates, one that fails,
  or the per-device timeout); once every one has an outcome and the soak is over, the next wave starts
  (inside a maintenance window, when the spec names some), or, after the last, the rollout completes.
- completing -> completed: the group order is written, so devices that join the group from now on get
  the version; devices of the group not in the plan get it then too.
- aborting -> aborted: the version is held fleet-wide (no rollout of it starts until an operator
  releases it), every device that was sent the version and does not already run its previous one gets a
  rollback order (`allow_older`, to that previous version); devices not reached yet are sent nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.cloud.fleet.gates import abort_reason, judge
from agent.cloud.fleet.plan import in_window, order_devices, wave_ends
from agent.cloud.fleet.state import Rollout, StateDB, Target
from agent.models.deploy import new_order, sign_order
from agent.transport.contract.report import DeviceReport
from agent.transport.topics import Topics
from agent.util.printable import printable
from agent.util.timefmt import parse_utc_iso

log = logging.getLogger(__name__)

Publish = Callable[[list[tuple[str, bytes]]], None]  # retained, QoS 1, every PUBACK waited for
FAILED = ("failed", "timed-out")
ORDER_CHARS = 80  # of an order id a report names (the controller's own are about 40)


# Records a device's rejected report (device, event type, reason): the controller's budget per device.
Record = Callable[[str, str, str], None]


class Driver:
    def __init__(
        self,
        db: StateDB,
        rollout: Rollout,
        key: Ed25519PrivateKey,
        prefix: str = "edge",
        record: Record | None = None,
    ) -> None:
        self.db, self.r, self.key, self.prefix = db, rollout, key, prefix
        self.record = record or self._event
        self.spec = rollout.spec
        self.targets = {t.device: t for t in db.targets(rollout.id)}
        self.dirty: set[str] = set()
        # Per device, the stamp last recorded as replayed: once per report, not at every resync, and one entry
        # per device however many old reports a device's key has signed.
        self.replayed: dict[str, str] = {}

    # ---- planning ---------------------------------------------------------------------------------

    def plan(self, members: dict[str, tuple[str, str | None]]) -> None:
        """`members`: the enrolled devices of the group -> (hardware kind, version of the model they run)."""
        order = order_devices(self.r.id, {d: kind for d, (kind, _) in members.items()})
        ends = wave_ends(self.spec.waves, len(order), len({kind for kind, _ in members.values()}))
        targets, wave = [], 0
        for pos, device in enumerate(order):
            while pos >= ends[wave]:
                wave += 1
            kind, previous = members[device]
            targets.append(Target(device, pos, wave, kind, previous, "planned", None, None, None))
        with self.db.tx() as db:
            self.db.add_targets(db, self.r.id, targets)
            state, reason = ("running", None) if targets else ("aborted", "no enrolled device in the group")
            self.db.update_rollout(db, self.r.id, state=state, reason=reason)
        self.r.state, self.r.reason = state, reason
        self.targets = {t.device: t for t in targets}
        log.info("rollout %s planned devices=%d waves=%s", self.r.id, len(targets), ends)

    # ---- reports ----------------------------------------------------------------------------------

    def expects(self, device: str) -> set[str]:
        """The order ids this rollout sent the device (a report must answer one of them)."""
        t = self.targets.get(device)
        return {o for o in (t.order_id, t.rb_order) if o} if t is not None else set()

    def on_report(self, report: DeviceReport) -> None:
        t = self.targets.get(report.device)
        if t is None:
            return
        if report.order == t.rb_order:
            if report.state == "active" and report.running == t.previous and t.rb_state != "done":
                t.rb_state = "done"
                self.dirty.add(t.device)
            return
        if report.order != t.order_id or t.state == "planned":
            return
        # As times: the contract fixes the stamp's format, not that it is a real date (one that is not never counts).
        when, last = parse_utc_iso(report.ts), parse_utc_iso(t.report_ts) if t.report_ts is not None else None
        if when is None or (last is not None and when <= last):
            if when is None or when != last:  # the same one again (a retained report read back) is no replay
                self._replayed(report, t.report_ts)
            return
        t.report_ts = report.ts
        self.dirty.add(t.device)  # saved with the verdict it gives, in one transaction
        verdict, why = judge(report, self.spec)
        state = {"pass": "passed", "fail": "failed", "wait": "ordered"}[verdict]
        if state == "ordered" and t.state == "timed-out":
            return  # its time ran out; only an outcome changes that
        t.state, t.reason = state, why

    def _replayed(self, report: DeviceReport, last: str | None) -> None:
        """One event per replayed report: the controller reads a retained one back at every resync."""
        if self.replayed.get(report.device) == report.ts:
            return
        self.replayed[report.device] = report.ts
        reason = (
            f"report of {report.device} on order {printable(report.order, ORDER_CHARS)} is stamped {report.ts}, "
            f"not after the last one counted ({last or 'none'})"
        )
        self.record(report.device, "report.replayed", reason)

    def _event(self, device: str, type_: str, reason: str) -> None:
        """A fleet event, when no controller budgets them (a driver on its own, as tests run it)."""
        log.warning("fleet event type=%s device=%s rollout=%s %s", type_, device, self.r.id, reason)
        self.db.event(self.r.id, device, type_, reason)

    # ---- steps ------------------------------------------------------------------------------------

    def tick(self, publish: Publish, now: float | None = None) -> None:
        now = time.time() if now is None else now
        request = self.r.request
        if request == "abort" and self.r.state in ("running", "paused"):
            self.abort("aborted by the operator", publish, now)
        elif request == "pause" and self.r.state == "running":
            self._set(request=None, state="paused")
        elif request == "resume" and self.r.state == "paused":
            self._set(request=None, state="running")
        elif request is not None:
            self._set(request=None)  # nothing to do in this state (a pause of a completed rollout, say)
        if self.r.state in ("running", "paused"):
            self._run(publish, now)
        elif self.r.state == "aborting":
            self._aborting(now)
        elif self.r.state == "completing" and self.r.group_order is not None:
            publish([(Topics(self.prefix, "-", self.spec.group).fleet_deploy, self.r.group_order)])
            self._set(state="completed", reason=f"every wave passed; the group order names {self.spec.version}")
        self.flush()

    def _run(self, publish: Publish, now: float) -> None:
        wave = [t for t in self.targets.values() if t.wave == self.r.wave]
        if self.r.wave >= 0:
            started = self.r.wave_started or now
            for t in wave:
                if t.state == "ordered" and now - started > self.spec.device_timeout_s:
                    t.state, t.reason = "timed-out", f"no outcome within {self.spec.device_timeout_s:g}s"
                    self.dirty.add(t.device)
            ordered = [t for t in self.targets.values() if t.state != "planned"]
            failed = sum(t.state in FAILED for t in ordered)
            reason = abort_reason(failed, len(ordered), self.spec)
            if reason is not None:
                self.abort(reason, publish, now)
                return
            if any(t.state == "ordered" for t in wave):
                return
            if self.r.wave_settled is None:
                self.flush()
                self._set(wave_settled=now)
            if now - (self.r.wave_settled or now) < self.spec.soak_s:
                return
        if self.r.state == "paused":
            return
        last = max((t.wave for t in self.targets.values()), default=-1)
        if self.r.wave >= last:
            self._complete(publish, now)
        elif in_window(self.spec.windows):
            self._start_wave(self.r.wave + 1, publish, now)

    def _start_wave(self, wave: int, publish: Publish, now: float) -> None:
        chosen = [t for t in self.targets.values() if t.wave == wave]
        expires = timedelta(seconds=self.spec.expires_s)
        for t in chosen:
            order = new_order(
                self.spec.model,
                self.spec.version,
                f"device:{t.device}",
                expires_in=expires,
                order_id=f"{self.r.id}.w{wave}.{t.pos}",
            )
            t.state, t.reason, t.order_id, t.payload = "ordered", "order sent", order.id, sign_order(order, self.key)
        with self.db.tx() as db:  # write-ahead: the wave and its exact orders, then the broker
            self.db.save_targets(db, self.r.id, chosen)
            self.db.update_rollout(db, self.r.id, wave=wave, wave_started=now, wave_settled=None)
        self.dirty -= {t.device for t in chosen}
        self.r.wave, self.r.wave_started, self.r.wave_settled = wave, now, None
        log.info("rollout %s wave %d: %d device order(s)", self.r.id, wave, len(chosen))
        self.republish(publish)

    def republish(self, publish: Publish) -> None:
        """Publish the current step's orders again (after a restart: those written ahead and maybe not sent)."""
        if self.r.state in ("running", "paused"):
            wave = [t for t in self.targets.values() if t.wave == self.r.wave and t.payload is not None]
            publish([(Topics(self.prefix, t.device).deploy, t.payload) for t in wave if t.payload is not None])
        elif self.r.state == "aborting":
            publish(
                [
                    (Topics(self.prefix, t.device).deploy, t.rb_payload or b"")
                    for t in self.targets.values()
                    if t.rb_state in ("ordered", "withdrawn")
                ]
            )

    def _complete(self, publish: Publish, now: float) -> None:
        order = new_order(
            self.spec.model,
            self.spec.version,
            f"group:{self.spec.group}",
            expires_in=timedelta(seconds=self.spec.expires_s),
            order_id=f"{self.r.id}.group",
        )
        self._set(state="completing", group_order=sign_order(order, self.key))
        self.tick(publish, now)

    def abort(self, reason: str, publish: Publish, now: float) -> None:
        """Hold the version, and roll back every device that may run it (written ahead, then published)."""
        touched = []
        for t in self.targets.values():
            if t.state == "planned" or t.rb_state is not None:
                continue
            if t.previous is None:
                t.rb_state = "withdrawn"  # nothing to go back to: the order is withdrawn, the device keeps serving
            else:
                rb = new_order(
                    self.spec.model,
                    t.previous,
                    f"device:{t.device}",
                    expires_in=timedelta(seconds=self.spec.expires_s),
                    allow_older=True,
                    order_id=f"{self.r.id}.rb.{t.pos}",
                    # Orders are issued to the second and the newest wins: one second after the wave's
                    # order, or a device that got both within a second might keep the wave's.
                    now=datetime.now(timezone.utc) + timedelta(seconds=1),
                )
                t.rb_order, t.rb_payload, t.rb_state = rb.id, sign_order(rb, self.key), "ordered"
            touched.append(t)
        with self.db.tx() as db:
            self.db.save_targets(db, self.r.id, touched)
            self.db.hold(db, self.spec.model, self.spec.version, f"rollout {self.r.id} aborted: {reason}", self.r.id)
            self.db.update_rollout(db, self.r.id, state="aborting", reason=reason, aborted_at=now, request=None)
        self.dirty -= {t.device for t in touched}
        self.r.state, self.r.reason, self.r.aborted_at, self.r.request = "aborting", reason, now, None
        log.warning("rollout %s aborting: %s; %d rollback order(s)", self.r.id, reason, len(touched))
        self.republish(publish)

    def _aborting(self, now: float) -> None:
        waiting = [t for t in self.targets.values() if t.rb_state == "ordered"]
        timed_out = now - (self.r.aborted_at or now) > self.spec.device_timeout_s
        if not waiting or timed_out:
            left = f"; {len(waiting)} device(s) did not confirm the rollback" if waiting else ""
            self._set(state="aborted", reason=f"{self.r.reason}{left}")

    # ---- bookkeeping ------------------------------------------------------------------------------

    def _set(self, **fields: object) -> None:
        with self.db.tx() as db:
            self.db.update_rollout(db, self.r.id, **fields)
        for key, value in fields.items():
            setattr(self.r, key, value)

    def flush(self) -> None:
        if self.dirty:
            with self.db.tx() as db:
                self.db.save_targets(db, self.r.id, (self.targets[d] for d in self.dirty))
            self.dirty.clear()

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.targets.values():
            out[t.state] = out.get(t.state, 0) + 1
        return out
