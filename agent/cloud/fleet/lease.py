"""Only one controller drives the rollouts: a lease in the state file, and one on the broker.

- Same host, same state file: a row in SQLite, taken and renewed in a `BEGIN IMMEDIATE` transaction
  (atomic: two processes cannot both win).
- Any host, one broker: a retained message on `<prefix>/fleet/controller/lease`, `{"owner", "expires"}`.
  MQTT has no compare-and-set, so the claim is confirmed: a controller that finds no live lease
  publishes its claim, then reads until its own marker comes back (`Inventory.sync`); the broker hands
  every subscriber the publishes to one topic in one order, so of two claims made at once both
  controllers see the same last one, and only its owner drives. A controller that later sees another
  owner's claim stops driving at once (`lost`). Leases expire unless renewed (every third of the TTL);
  expiry is wall-clock time, so controllers on different hosts need synchronised clocks (NTP).

Broker client-id exclusivity was the other way to get this: two connections with one client id make
the broker close the older one (MQTT 3.1.4-3). It is not used: the newcomer wins, so a second
controller started by mistake takes over from a healthy one and, reconnecting in turn, they take the
id from each other; and the old one learns it lost only when its connection drops, not before it
publishes again. The lease says who holds it and until when, and a restarted controller on the same
host takes its own dead predecessor's lease at once (the owner names host and pid).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass

from agent.cloud.fleet.inventory import Inventory
from agent.cloud.fleet.state import StateDB

log = logging.getLogger(__name__)

NAME = "controller"


def owner_id(name: str) -> str:
    return f"{name}@{socket.gethostname()}:{os.getpid()}"


def dead(owner: str) -> bool:
    """An owner on this host whose process is gone (killed): its lease need not be waited out."""
    head, _, pid = owner.rpartition(":")
    if not pid.isdigit() or head.rpartition("@")[2] != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


@dataclass
class Claim:
    owner: str
    expires: float


class Leases:
    def __init__(self, db: StateDB, inventory: Inventory, owner: str, ttl: float) -> None:
        self.db, self.inventory, self.owner, self.ttl = db, inventory, owner, ttl
        self.topic = f"{inventory.prefix}/fleet/controller/lease"
        self.seen: Claim | None = None  # the last claim on the broker
        self.lost = False
        self.renewed = 0.0

    def note(self, topic: str, raw: bytes) -> None:
        """Every message on the lease topic (from the controller's receive loop)."""
        if topic != self.topic:
            return
        try:
            doc = json.loads(raw) if raw else None
            claim = Claim(str(doc["owner"]), float(doc["expires"])) if isinstance(doc, dict) else None
        except (ValueError, KeyError, TypeError):
            claim = None
        self.seen = claim
        if claim is not None and claim.owner != self.owner and claim.expires > time.time():
            if not self.lost and self.renewed:
                log.warning("another controller claimed the lease owner=%s: no longer driving", claim.owner)
            self.lost = True

    def holder(self) -> str | None:
        """Whoever else holds a lease now (None: free, expired, ours, or held by a dead process here)."""
        other = self.db.take_lease(NAME, self.owner, self.ttl, dead)
        if other is not None:
            return other
        seen = self.seen
        if seen is not None and seen.owner != self.owner and seen.expires > time.time() and not dead(seen.owner):
            return seen.owner
        return None

    def acquire(self) -> str | None:
        """Claim both leases; None when this controller holds them now, else the other holder."""
        other = self.holder()
        if other is not None:
            return other
        self.lost = False
        self._publish()
        self.inventory.sync()  # our claim, and any claim made at the same time, are in: the last one wins
        if self.seen is None or self.seen.owner != self.owner:
            self.db.drop_lease(NAME, self.owner)
            return self.seen.owner if self.seen is not None else "unknown"
        self.lost = False
        return None

    def renew(self) -> bool:
        """Renew both leases when a third of the TTL has passed; False when this controller lost them."""
        if self.lost:
            return False
        if time.monotonic() - self.renewed < self.ttl / 3:
            return True
        if self.db.take_lease(NAME, self.owner, self.ttl, dead) is not None:
            self.lost = True
            return False
        self._publish()
        return True

    def release(self) -> None:
        self.db.drop_lease(NAME, self.owner)
        if not self.lost:
            self.inventory.client.publish_retained(self.topic, b"")

    def _publish(self) -> None:
        claim = {"owner": self.owner, "expires": round(time.time() + self.ttl, 3)}
        self.inventory.client.publish_retained(self.topic, json.dumps(claim).encode())
        self.renewed = time.monotonic()
