"""Following one deployment order: each targeted device's progress, from its events and its health.

A device moves pending -> downloading -> verifying -> active, or ends refused, rolled back or with a
failed rollback; `error` is a step it retries. Events are read through the agent's contract
(`agent.transport.contract`): an event that names an order decides by its id; one without (a channel
pull serving the same version) decides by model and version, which for a rollback is the version rolled
back from. A device whose retained health already reports the version is active from the start, and
one whose health goes back to another version after reporting this one was rolled back. A device that is
or goes offline has not ended anything: the crash guard's rollback, for one, is reported by the device
when it comes back. It is waited for, and named offline only when the wait runs out. Pure logic fed with
the inventory's messages: no I/O but the progress lines. Only the order's targets count: a device order's
device, a group order's members (by their status or health); another device's event, a channel pull of
the same version or a hostile one naming the order, once joined the targets and could fail the deploy.
What a device wrote is shown `printable`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal, Protocol, TextIO

from agent.cloud.fleet.inventory import MAX_FIGURE, Inventory, Message
from agent.models.deploy import DeployOrder
from agent.transport.contract.events import (
    DeployRefused,
    EventBody,
    ModelActivated,
    ModelDownloading,
    ModelErrorEvent,
    ModelEvent,
    ModelRefused,
    ModelRollbackFailed,
    ModelRolledBack,
    ModelVerifying,
)
from agent.util.printable import printable

DeployState = Literal[
    "pending", "downloading", "verifying", "active", "refused", "rolled-back", "rollback-failed", "error"
]
PENDING: Final = "pending"
DOWNLOADING: Final = "downloading"
VERIFYING: Final = "verifying"
ACTIVE: Final = "active"
REFUSED: Final = "refused"
ROLLED_BACK: Final = "rolled-back"
ROLLBACK_FAILED: Final = "rollback-failed"  # the device judged the version bad and had nothing to go back to
ERROR: Final = "error"
TERMINAL: frozenset[DeployState] = frozenset({ACTIVE, REFUSED, ROLLED_BACK, ROLLBACK_FAILED})
FAILED: frozenset[DeployState] = frozenset({REFUSED, ROLLED_BACK, ROLLBACK_FAILED})
AFTER_ACTIVE: frozenset[DeployState] = frozenset({ROLLED_BACK, ROLLBACK_FAILED})  # what may undo "active"
EVENT_STATE: dict[type[EventBody], DeployState] = {
    ModelDownloading: DOWNLOADING,
    ModelVerifying: VERIFYING,
    ModelActivated: ACTIVE,
    ModelRefused: REFUSED,
    ModelRolledBack: ROLLED_BACK,
    ModelRollbackFailed: ROLLBACK_FAILED,
    ModelErrorEvent: ERROR,
    DeployRefused: REFUSED,
}
# An offline device ends nothing (a crash guard's rollback is reported once the device is back).
OFFLINE_WAIT = "offline; waiting for it to come back and report"
POLL = 0.5  # the longest a follow loop waits for one message before it checks its deadline
# Health is published at once, events through the device's outbox: the event with the reason follows.
EXPLAIN_WAIT = 3.0


@dataclass
class Progress:
    state: DeployState = PENDING
    reason: str | None = None
    healthy: bool = False  # its health reports the order's version
    offline: bool = False  # said to be offline, and not back since
    via: Literal["", "event", "health"] = ""  # what made it active (or rolled back)


def event_matches(event: EventBody, order: DeployOrder, topic: str) -> bool:
    """Is this device event about this order? One that names an order decides by its id; one that does
    not by model and version (for a rollback: the version rolled back from)."""
    if isinstance(event, DeployRefused):
        return event.order == order.id or (event.order is None and event.topic == topic)
    if type(event) not in EVENT_STATE or not isinstance(event, ModelEvent):
        return False
    if event.order is not None:
        return event.order == order.id
    return event.model == order.model and event.version == order.version


def _mb(n: int) -> str:
    # The device's count: a 400-digit one made the float division raise OverflowError mid-deploy.
    return f"{n / 1e6:.1f} MB" if 0 <= n < MAX_FIGURE else f"{printable(n, 40)} bytes"


def describe(state: DeployState, event: EventBody) -> str:
    if isinstance(event, ModelDownloading):
        more = f", resuming at {_mb(event.resume_from)}" if event.resume_from > 0 else ""
        return f"downloading (variant {printable(event.variant)}, {_mb(event.bytes)}{more})"
    if isinstance(event, ModelActivated):
        return f"active (variant {printable(event.variant)} on {printable(event.provider)})"
    if isinstance(event, (ModelRefused, ModelRolledBack, ModelRollbackFailed, DeployRefused)):
        return f"{state}: {printable(event.reason)}"
    if isinstance(event, ModelErrorEvent):
        return f"error: {printable(event.reason)} (the device retries)"
    return state


class Followed(Protocol):
    """What `follow` drives: one order's watch, or several followed as one."""

    started: float

    def seed(self) -> list[str]: ...
    def feed(self, msg: Message) -> list[str]: ...
    def done(self) -> bool: ...
    def all_ok(self) -> bool: ...
    def failures(self) -> list[tuple[str, str]]: ...
    def unexplained(self) -> bool: ...
    def summary(self, waited: float) -> list[str]: ...


class DeployWatch:
    """The progress of one order on its target devices, fed with the inventory's messages."""

    def __init__(
        self,
        inventory: Inventory,
        order: DeployOrder,
        topic: str,
        *,
        need_health: bool = False,
        targets: list[str] | None = None,
    ) -> None:
        self.inventory, self.order, self.topic, self.need_health = inventory, order, topic, need_health
        self.fixed = targets
        self.progress: dict[str, Progress] = {}
        self.unreadable: set[tuple[str, str]] = set()
        self.started = time.monotonic()

    def members(self) -> set[str]:
        """The devices the order is for now (a group's grows as devices join it)."""
        if self.fixed is not None:
            return set(self.fixed)
        if self.order.target_kind == "device":
            return {self.order.target_name}
        return set(self.inventory.group_members(self.order.target_name))

    def targets(self) -> list[str]:
        """The members, and any device followed so far (one that left the group keeps its outcome)."""
        return sorted(self.members() | set(self.progress))

    def _p(self, device: str) -> Progress:
        return self.progress.setdefault(device, Progress())

    def seed(self) -> list[str]:
        """Devices whose retained health already reports the version (nothing left to do there), and those
        offline now (waited for)."""
        lines = []
        for device in self.targets():
            dev = self.inventory.devices.get(device)
            if dev is not None and dev.model_version(self.order.model) == self.order.version:
                p = self._p(device)
                p.state, p.healthy, p.via = ACTIVE, True, "health"
                lines.append(f"{device}: active (already runs {self.order.model} {self.order.version})")
            elif dev is not None and dev.state == "offline":
                self._p(device).offline = True
                lines.append(f"{device}: {OFFLINE_WAIT}")
        return lines

    def feed(self, msg: Message) -> list[str]:
        if msg.device is None:
            return []
        if msg.error is not None:
            return self._unreadable(msg.device, msg.kind, msg.error)
        if msg.event is not None:
            return self._event(msg.device, msg.event.body)
        if msg.kind == "health" and msg.device in self.targets():
            return self._health(msg.device)
        if msg.kind == "status" and msg.device in self.targets():
            return self._status(msg.device)
        return []

    def _status(self, device: str) -> list[str]:
        """Offline is no outcome: the device is waited for, and said to be back when it is."""
        p = self._p(device)
        if self.settled(device):
            return []
        offline = self.inventory.devices[device].state == "offline"
        if offline == p.offline:
            return []
        p.offline = offline
        return [f"{device}: {OFFLINE_WAIT if offline else 'back online'}"]

    def _unreadable(self, device: str, kind: str, error: str) -> list[str]:
        """A target's message that the contract cannot read: said once per device and kind."""
        if device not in self.targets() or (device, kind) in self.unreadable:
            return []
        self.unreadable.add((device, kind))
        return [f"{device}: sent {kind} this agent cannot read ({printable(error)})"]

    def _event(self, device: str, event: EventBody) -> list[str]:
        if not event_matches(event, self.order, self.topic):
            return []
        if device not in self.progress and device not in self.members():
            return []
        state = EVENT_STATE[type(event)]
        p = self._p(device)
        undoes = state in AFTER_ACTIVE and p.state == ACTIVE
        explains = state in AFTER_ACTIVE and p.state in AFTER_ACTIVE and p.via == "health"  # the device's reason
        if p.state in TERMINAL and not (undoes or explains):
            return []
        text = describe(state, event)
        changed = (p.state, p.reason) != (state, text)
        p.state, p.reason, p.via = state, text, "event"
        if state in AFTER_ACTIVE:
            p.healthy = False
        return [f"{device}: {text}"] if changed else []

    def _health(self, device: str) -> list[str]:
        dev = self.inventory.devices[device]
        if dev.health is None or not isinstance(dev.health.models, dict):
            return []  # no models section, or its source failed this time: it says nothing either way
        version = dev.model_version(self.order.model)
        p = self._p(device)
        if version != self.order.version:
            if not (p.healthy and p.state == ACTIVE):
                return []
            # It reported this version, and now another: it went back, whatever its events said.
            now = f"{self.order.model} {printable(version)}" if version else f"no {self.order.model}"
            p.state, p.healthy, p.via = ROLLED_BACK, False, "health"
            p.reason = f"{ROLLED_BACK}: its health reports {now} instead"
            return [f"{device}: {p.reason}"]
        first = not p.healthy
        p.healthy = True
        if p.state not in TERMINAL:
            p.state, p.via = ACTIVE, "health"
            serving = dev.models().get(self.order.model)
            on = f" on {printable(serving.provider)}" if serving is not None else ""
            return [f"{device}: active (health reports {self.order.version}{on})"]
        if first and self.need_health and p.state == ACTIVE:
            return [f"{device}: healthy (health reports {self.order.version})"]
        return []

    def ok(self, device: str) -> bool:
        p = self.progress.get(device)
        return p is not None and p.state == ACTIVE and (p.healthy or not self.need_health)

    def settled(self, device: str) -> bool:
        """Whether the device reached its outcome (an offline one has not: it is waited for)."""
        p = self.progress.get(device)
        return (p is not None and p.state in FAILED) or self.ok(device)

    def failures(self) -> list[tuple[str, str]]:
        return [(d, p.reason or p.state) for d, p in sorted(self.progress.items()) if p.state in FAILED]

    def unexplained(self) -> bool:
        """A failure seen in health only: the device's event with its reason is usually a moment behind."""
        return any(p.state in FAILED and p.via == "health" for p in self.progress.values())

    def done(self) -> bool:
        targets = self.targets()
        return bool(targets) and all(self.settled(d) for d in targets)

    def all_ok(self) -> bool:
        targets = self.targets()
        return bool(targets) and all(self.ok(d) for d in targets)

    def summary(self, waited: float) -> list[str]:
        """One line for each target that is not active (and healthy, where that is asked)."""
        lines = []
        for d in self.targets():
            if self.ok(d):
                continue
            p = self.progress.get(d, Progress())
            dev = self.inventory.devices.get(d)
            if p.state in FAILED:
                lines.append(f"  {d}: {p.reason}")
            elif dev is not None and dev.state == "offline":
                # A canary's order is withdrawn when it fails; any other stays retained.
                stays = " (the retained order applies when it reconnects)" if self.fixed is None else ""
                lines.append(f"  {d}: offline, no final report within {waited:g}s{stays}")
            elif p.state == ACTIVE:
                lines.append(f"  {d}: active, but no health report with {self.order.version} within {waited:g}s")
            else:
                last = f" (last: {p.reason or p.state})" if p.state != PENDING else ""
                lines.append(f"  {d}: no final report within {waited:g}s{last}")
        return lines


class Combined:
    """Several single-device watches (the canaries' own orders) followed as one."""

    def __init__(self, watches: list[DeployWatch]) -> None:
        self.watches = watches
        self.started = time.monotonic()

    def seed(self) -> list[str]:
        return [line for w in self.watches for line in w.seed()]

    def feed(self, msg: Message) -> list[str]:
        return [line for w in self.watches for line in w.feed(msg)]

    def done(self) -> bool:
        return all(w.done() for w in self.watches)

    def all_ok(self) -> bool:
        return all(w.all_ok() for w in self.watches)

    def failures(self) -> list[tuple[str, str]]:
        return [f for w in self.watches for f in w.failures()]

    def unexplained(self) -> bool:
        return any(w.unexplained() for w in self.watches)

    def summary(self, waited: float) -> list[str]:
        return [line for w in self.watches for line in w.summary(waited)]


def follow(
    inventory: Inventory, watch: Followed, wait: float, out: TextIO, stop: Callable[[], bool] | None = None
) -> None:
    """Print progress until the watch is done (or `stop` says so) or `wait` seconds pass."""
    for line in watch.seed():
        say(out, watch, line)
    pump(inventory, watch, wait, out, lambda: watch.done() or (stop is not None and stop()))


def explain(inventory: Inventory, watch: Followed, out: TextIO) -> None:
    """Give a failure seen in health a moment for the device's own event, which says why."""
    if watch.unexplained():
        pump(inventory, watch, EXPLAIN_WAIT, out, lambda: not watch.unexplained())


def pump(inventory: Inventory, watch: Followed, seconds: float, out: TextIO, until: Callable[[], bool]) -> None:
    """Feed the watch what arrives for `seconds`, printing its lines, until `until()` says enough."""
    deadline = time.monotonic() + seconds
    while not until() and (left := deadline - time.monotonic()) > 0:
        msg = inventory.poll(min(left, POLL))
        if msg is not None:
            for line in watch.feed(msg):
                say(out, watch, line)


def say(out: TextIO, watch: Followed, line: str) -> None:
    print(f"[{time.monotonic() - watch.started:6.1f}s] {line}", file=out, flush=True)
