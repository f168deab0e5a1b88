"""The deployment orders a device follows: the last one seen on each deploy topic, kept across restarts.

A device hears orders on two retained topics, its own and its group's (agent.models.deploy). It keeps
the last verified order of each topic in `state_dir/orders.json`, so that a restart keeps following an
order even before the broker answers. For each model the newest order that applies wins (the device's
own order on a tie, as `deploy.effective_order` decides); a model with no order follows the profile's
channel or pin. An empty retained payload withdraws the topic's order: it is removed from the file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TypedDict

from agent.models.deploy import DeployOrder, target_applies
from agent.models.store import write_atomic

log = logging.getLogger(__name__)

FILE_NAME = "orders.json"


class SavedOrder(TypedDict):
    """What a device keeps of a verified order (it is not verified again when read back)."""

    id: str
    model: str
    version: str
    target: str
    issued: str  # UTC ISO 8601; "" for an order saved by an older agent (it sorts first)
    allow_older: bool


class OrderBook:
    """orders.json: topic -> the order last seen on it. Callers hold the updater's lock."""

    def __init__(self, state_dir: str | Path, device: str, group: str) -> None:
        self.path = Path(state_dir) / FILE_NAME
        self.device, self.group = device, group
        self._orders = self._load()

    def get(self, topic: str) -> SavedOrder | None:
        return self._orders.get(topic)

    def topics(self) -> list[str]:
        return sorted(self._orders)

    def put(self, topic: str, order: DeployOrder) -> None:
        """Remember `order` as the one on `topic` (an agent's older file named no topic: such a record of
        the same model is dropped, the new order supersedes it)."""
        saved: SavedOrder = {
            "id": order.id,
            "model": order.model,
            "version": order.version,
            "target": order.target,
            "issued": order.issued.isoformat(),
            "allow_older": order.allow_older,
        }
        legacy = [t for t, o in self._orders.items() if not o["target"] and o["model"] == order.model]
        for old in legacy:
            del self._orders[old]
        if self._orders.get(topic) != saved or legacy:
            self._orders[topic] = saved
            self._save()

    def withdraw(self, topic: str) -> SavedOrder | None:
        """Forget the order on `topic`; the order withdrawn, or None when there was none."""
        gone = self._orders.pop(topic, None)
        if gone is not None:
            self._save()
        return gone

    def effective(self, model: str) -> SavedOrder | None:
        """The order to follow for `model`: the newest that applies to this device, or None."""
        live = [o for o in self._orders.values() if o["model"] == model and self._applies(o)]
        return max(live, key=lambda o: (o["issued"], o["target"].startswith("device:")), default=None)

    def _applies(self, order: SavedOrder) -> bool:
        # An order saved by an older agent has no target: it kept only orders that applied.
        return not order["target"] or target_applies(order["target"], self.device, self.group)

    def _load(self) -> dict[str, SavedOrder]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("cannot read %s (%s); following the profile until orders arrive", self.path, exc)
            return {}
        if not isinstance(doc, dict):
            return {}
        out: dict[str, SavedOrder] = {}
        for key, raw in doc.items():
            if not isinstance(raw, dict) or not {"id", "version"} <= raw.keys():
                continue
            # An older agent keyed its file by model, with the id and version only.
            out[key] = {
                "id": str(raw["id"]),
                "model": str(raw.get("model", key)),
                "version": str(raw["version"]),
                "target": str(raw.get("target", "")),
                "issued": str(raw.get("issued", "")),
                "allow_older": bool(raw.get("allow_older", False)),
            }
        return out

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(self._orders, indent=1, sort_keys=True).encode())
