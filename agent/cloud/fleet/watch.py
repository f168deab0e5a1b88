"""Following one deployment order: each targeted device's progress, from its events and its health.

A device moves pending -> downloading -> verifying -> active, or ends refused or rolled back; `error`
is a step it retries. Events that name the order decide by its id; events from a daemon that does not
add `order` decide by model and version. A device whose retained health already reports the version is
active from the start. Pure logic fed with the inventory's messages: no I/O but the progress lines.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, TextIO

from agent.cloud.fleet.inventory import Inventory, Message
from agent.models.deploy import DeployOrder

DeployState = Literal["pending", "downloading", "verifying", "active", "refused", "rolled-back", "error"]
PENDING: Final = "pending"
DOWNLOADING: Final = "downloading"
VERIFYING: Final = "verifying"
ACTIVE: Final = "active"
REFUSED: Final = "refused"
ROLLED_BACK: Final = "rolled-back"
ERROR: Final = "error"
TERMINAL: frozenset[DeployState] = frozenset({ACTIVE, REFUSED, ROLLED_BACK})
FAILED: frozenset[DeployState] = frozenset({REFUSED, ROLLED_BACK})
EVENT_STATE: dict[str, DeployState] = {
    "model.downloading": DOWNLOADING,
    "model.verifying": VERIFYING,
    "model.activated": ACTIVE,
    "model.refused": REFUSED,
    "model.rolled_back": ROLLED_BACK,
    "model.error": ERROR,
    "deploy.refused": REFUSED,
}
POLL = 0.5  # the longest a follow loop waits for one message before it checks its deadline


@dataclass
class Progress:
    state: DeployState = PENDING
    reason: str | None = None
    healthy: bool = False  # its health reports the order's version
    via: Literal["", "event", "health"] = ""  # what made it active


def event_matches(event: dict[str, Any], order: DeployOrder, topic: str) -> bool:
    """Is this device event about this order? Events that name the order decide by id; others (from a
    daemon that does not add `order`) by model and version (for a rollback: the version rolled back from)."""
    etype = event.get("type")
    if etype not in EVENT_STATE:
        return False
    if etype == "deploy.refused":
        return event.get("order") == order.id or (event.get("order") is None and event.get("topic") == topic)
    if event.get("order") is not None:
        return bool(event["order"] == order.id)
    if event.get("model") != order.model:
        return False
    if etype == "model.rolled_back":
        return event.get("previous") == order.version or event.get("from") == order.version
    return bool(event.get("version") == order.version)


def _mb(n: object) -> str:
    return f"{n / 1e6:.1f} MB" if isinstance(n, (int, float)) and not isinstance(n, bool) else "?"


def describe(state: DeployState, event: dict[str, Any]) -> str:
    reason = event.get("reason") or "no reason given"
    if state == DOWNLOADING:
        resume = event.get("resume_from")
        more = f", resuming at {_mb(resume)}" if isinstance(resume, int) and resume > 0 else ""
        variant = f"variant {event['variant']}, " if event.get("variant") else ""
        return f"downloading ({variant}{_mb(event.get('bytes'))}{more})"
    if state == ACTIVE:
        bits = [
            f"variant {event['variant']}" if event.get("variant") else "",
            f"on {event['provider']}" if event.get("provider") else "",
        ]
        detail = " ".join(b for b in bits if b)
        return f"active ({detail})" if detail else "active"
    if state in FAILED:
        return f"{state}: {reason}"
    if state == ERROR:
        return f"error: {reason} (the device retries)"
    return state


class Followed(Protocol):
    """What `follow` drives: one order's watch, or several followed as one."""

    started: float

    def seed(self) -> list[str]: ...
    def feed(self, msg: Message) -> list[str]: ...
    def done(self) -> bool: ...
    def all_ok(self) -> bool: ...
    def failures(self) -> list[tuple[str, str]]: ...
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
        self.started = time.monotonic()

    def targets(self) -> list[str]:
        if self.fixed is not None:
            ids = set(self.fixed)
        elif self.order.target_kind == "device":
            ids = {self.order.target_name}
        else:
            ids = set(self.inventory.group_members(self.order.target_name))
        return sorted(ids | set(self.progress))

    def _p(self, device: str) -> Progress:
        return self.progress.setdefault(device, Progress())

    def seed(self) -> list[str]:
        """Devices whose retained health already reports the version: nothing left to do there."""
        lines = []
        for device in self.targets():
            dev = self.inventory.devices.get(device)
            if dev is not None and dev.model_version(self.order.model) == self.order.version:
                p = self._p(device)
                p.state, p.healthy, p.via = ACTIVE, True, "health"
                lines.append(f"{device}: active (already runs {self.order.model} {self.order.version})")
        return lines

    def feed(self, msg: Message) -> list[str]:
        if msg.device is None or msg.payload is None:
            return []
        if msg.kind == "events":
            return self._event(msg.device, msg.payload)
        if msg.kind == "health" and msg.device in self.targets():
            return self._health(msg.device)
        if msg.kind == "status" and msg.device in self.targets():
            dev = self.inventory.devices[msg.device]
            p = self.progress.get(msg.device)
            if dev.state == "offline" and (p is None or p.state not in TERMINAL):
                return [f"{msg.device}: offline (the retained order applies when it reconnects)"]
        return []

    def _event(self, device: str, event: dict[str, Any]) -> list[str]:
        if not event_matches(event, self.order, self.topic):
            return []
        if self.fixed is not None and device not in self.fixed:
            return []
        state = EVENT_STATE[event["type"]]
        p = self._p(device)
        if p.state in TERMINAL and not (state == ROLLED_BACK and p.state == ACTIVE):
            return []
        text = describe(state, event)
        changed = (p.state, p.reason) != (state, text)
        p.state, p.reason, p.via = state, text, "event"
        if state == ROLLED_BACK:
            p.healthy = False
        return [f"{device}: {text}"] if changed else []

    def _health(self, device: str) -> list[str]:
        dev = self.inventory.devices[device]
        if dev.model_version(self.order.model) != self.order.version:
            return []
        p = self._p(device)
        first = not p.healthy
        p.healthy = True
        if p.state not in TERMINAL:
            p.state, p.via = ACTIVE, "health"
            provider = dev.models().get(self.order.model, {}).get("provider")
            on = f" on {provider}" if provider else ""
            return [f"{device}: active (health reports {self.order.version}{on})"]
        if first and self.need_health and p.state == ACTIVE:
            return [f"{device}: healthy (health reports {self.order.version})"]
        return []

    def ok(self, device: str) -> bool:
        p = self.progress.get(device)
        return p is not None and p.state == ACTIVE and (p.healthy or not self.need_health)

    def settled(self, device: str) -> bool:
        p = self.progress.get(device)
        if (p is not None and p.state in FAILED) or self.ok(device):
            return True
        dev = self.inventory.devices.get(device)
        return dev is not None and dev.state == "offline"

    def failures(self) -> list[tuple[str, str]]:
        return [(d, p.reason or p.state) for d, p in sorted(self.progress.items()) if p.state in FAILED]

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
                lines.append(f"  {d}: offline; the retained order applies when it reconnects")
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

    def summary(self, waited: float) -> list[str]:
        return [line for w in self.watches for line in w.summary(waited)]


def follow(
    inventory: Inventory, watch: Followed, wait: float, out: TextIO, stop: Callable[[], bool] | None = None
) -> None:
    """Print progress until the watch is done (or `stop` says so) or `wait` seconds pass."""
    for line in watch.seed():
        say(out, watch, line)
    pump(inventory, watch, wait, out, lambda: watch.done() or (stop is not None and stop()))


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
