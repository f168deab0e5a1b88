"""The deployment orders a device follows: recorded once carried out, dropped on withdrawal and on expiry.

A device hears orders on two retained topics, its own and its group's (agent.models.deploy). An order is
recorded in `state_dir/orders.json` only once the device has carried it out (the version it names runs
here), so a refused order, or an old one published again, never changes what the device follows; a
restart keeps following what was recorded, even before the broker answers. For each model the newest
recorded order that applies wins (the device's own order on a tie, as `deploy.effective_order`
decides); a model with no order follows the profile's channel or pin. An empty retained payload
withdraws the topic's order, and an order past its expiry is dropped.

Replays: `state_dir/orders-seen.json` keeps, per topic, the newest verified order seen on it (its issue
time and id) and whether it was withdrawn. On a retained topic a newer order always replaces an older
one, so an order issued before that one, or the withdrawn order itself published again, is a replay and
is refused. The marks being per topic, an order is followed only from its own topic (a group's order from
its group's, a device's from the device's): copied onto the other topic, which holds no mark of it, a
withdrawn order was followed again.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import TypedDict

from agent.models.deploy import DeployOrder, target_applies
from agent.util.files import write_atomic

log = logging.getLogger(__name__)

FILE_NAME = "orders.json"
SEEN_FILE = "orders-seen.json"


class SavedOrder(TypedDict):
    """What a device keeps of an order it carried out (it is not verified again when read back)."""

    id: str
    model: str
    version: str
    target: str
    issued: str  # UTC ISO 8601; "" for an order saved by an older agent (it sorts first)
    expires: str  # UTC ISO 8601; "" for an order saved by an older agent (kept until withdrawn or replaced)
    allow_older: bool


class Seen(TypedDict):
    """The newest verified order seen on a topic: what an older one arriving there is measured against."""

    id: str
    model: str
    version: str
    issued: str
    withdrawn: bool


def _rank(order: SavedOrder) -> tuple[str, bool]:
    return order["issued"], order["target"].startswith("device:")


class OrderBook:
    """orders.json (topic -> the order carried out from it) and orders-seen.json. Callers hold the
    updater's lock."""

    def __init__(self, state_dir: str | Path, device: str, group: str) -> None:
        self.path = Path(state_dir) / FILE_NAME
        self.seen_path = Path(state_dir) / SEEN_FILE
        self.device, self.group = device, group
        self._orders = self._load()
        self._seen = self._load_seen()

    def get(self, topic: str) -> SavedOrder | None:
        return self._orders.get(topic)

    def topics(self) -> list[str]:
        return sorted(self._orders)

    def live_topics(self) -> list[str]:
        """The topics whose last order is not withdrawn: carried out from, or seen there."""
        return sorted({*self._orders, *(t for t, seen in self._seen.items() if not seen["withdrawn"])})

    def put(self, topic: str, order: DeployOrder) -> None:
        """Record `order`, carried out, as the one followed from `topic` (an agent's older file named no
        topic: such a record of the same model is dropped, the new order supersedes it)."""
        saved = _saved(order)
        legacy = [t for t, o in self._orders.items() if not o["target"] and o["model"] == order.model]
        for old in legacy:
            del self._orders[old]
        if self._orders.get(topic) != saved or legacy:
            self._orders[topic] = saved
            self._save()

    def withdraw(self, topic: str) -> tuple[SavedOrder | None, Seen | None]:
        """Forget the order on `topic` (an empty retained payload). Returns the order recorded from it (None
        when none was carried out) and the order last seen there, if this withdraws it: published again,
        that one is a replay."""
        seen = self._seen.get(topic)
        if seen is not None and not seen["withdrawn"]:
            seen = self._seen[topic] = {**seen, "withdrawn": True}
            self._save_seen()
        else:
            seen = None
        gone = self._orders.pop(topic, None)
        if gone is not None:
            self._save()
        return gone, seen

    def expire(self, now: datetime | None = None) -> list[tuple[str, SavedOrder]]:
        """Drop the recorded orders that have expired; (topic, order) of each dropped."""
        gone = [(t, o) for t, o in self._orders.items() if _expired(o, now)]
        for topic, _ in gone:
            del self._orders[topic]
        if gone:
            self._save()
        return gone

    def effective(self, model: str, now: datetime | None = None) -> SavedOrder | None:
        """The order to follow for `model`: the newest unexpired one that applies to this device, or None."""
        live = [o for o in self._orders.values() if o["model"] == model and self._applies(o) and not _expired(o, now)]
        return max(live, key=_rank, default=None)

    def superseded_by(self, order: DeployOrder, now: datetime | None = None) -> SavedOrder | None:
        """A recorded order that wins over `order` (newer, or the device's own on a tie), if any."""
        followed = self.effective(order.model, now)
        if followed is None or followed["id"] == order.id:
            return None
        return followed if _rank(followed) > _rank(_saved(order)) else None

    # ---- replays ------------------------------------------------------------------------------------

    def replay(self, topic: str, order: DeployOrder) -> str | None:
        """Why `order`, verified and for this device, is a replay on `topic` (None when it is not)."""
        # The device hears `<prefix>/<device>/deploy` and `<prefix>/fleet/<group>/deploy`. (Only a device named
        # as its group, under a prefix whose last level is `fleet`, hears two topics that end alike; there a
        # group order is taken from either, as before.)
        home = f"/fleet/{order.target_name}/deploy" if order.target_kind == "group" else f"/{order.target_name}/deploy"
        if not topic.endswith(home):
            return (
                f"deployment order {order.id} is for {order.target} but came on {topic}, not on its own topic; "
                "an order copied onto another topic is not followed (replay refused)"
            )
        seen = self._seen.get(topic)
        if seen is None:
            return None
        issued = _utc(order.issued)
        if issued < seen["issued"]:
            return (
                f"deployment order {order.id} was issued before order {seen['id']} already seen on {topic}; "
                "an older order published again is not followed (replay refused)"
            )
        if seen["withdrawn"] and (issued, order.id) == (seen["issued"], seen["id"]):
            return f"deployment order {order.id} was withdrawn from {topic}; published again, it is not followed (replay refused)"
        return None

    def saw(self, topic: str, order: DeployOrder) -> None:
        """`order` is the newest verified order on `topic` (call after `replay` said it is not one)."""
        mark: Seen = {
            "id": order.id,
            "model": order.model,
            "version": order.version,
            "issued": _utc(order.issued),
            "withdrawn": False,
        }
        current = self._seen.get(topic)
        if current is not None and (current["id"], current["issued"]) == (mark["id"], mark["issued"]):
            return  # the retained order delivered again at a reconnect
        self._seen[topic] = mark
        self._save_seen()

    # ---- files --------------------------------------------------------------------------------------

    def _applies(self, order: SavedOrder) -> bool:
        # An order saved by an older agent has no target: it kept only orders that applied.
        return not order["target"] or target_applies(order["target"], self.device, self.group)

    def _load(self) -> dict[str, SavedOrder]:
        doc = _read(self.path)
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
                "expires": str(raw.get("expires", "")),
                "allow_older": bool(raw.get("allow_older", False)),
            }
        return out

    def _load_seen(self) -> dict[str, Seen]:
        return {
            topic: {
                "id": str(raw["id"]),
                "model": str(raw.get("model", "")),
                "version": str(raw.get("version", "")),
                "issued": str(raw["issued"]),
                "withdrawn": bool(raw.get("withdrawn")),
            }
            for topic, raw in _read(self.seen_path).items()
            if isinstance(raw, dict) and {"id", "issued"} <= raw.keys()
        }

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(self._orders, indent=1, sort_keys=True).encode())

    def _save_seen(self) -> None:
        self.seen_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.seen_path, json.dumps(self._seen, indent=1, sort_keys=True).encode())


def _saved(order: DeployOrder) -> SavedOrder:
    return {
        "id": order.id,
        "model": order.model,
        "version": order.version,
        "target": order.target,
        "issued": _utc(order.issued),
        "expires": _utc(order.expires),
        "allow_older": order.allow_older,
    }


def _utc(ts: datetime) -> str:
    return ts.astimezone(timezone.utc).isoformat()


def _expired(order: SavedOrder, now: datetime | None) -> bool:
    if not order["expires"]:
        return False
    try:
        expires = datetime.fromisoformat(order["expires"])
    except ValueError:
        return True  # unreadable: not something to keep following
    return expires <= (now or datetime.now(timezone.utc))


def _read(path: Path) -> dict[str, object]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s (%s); following the profile until orders arrive", path, exc)
        return {}
    return doc if isinstance(doc, dict) else {}
