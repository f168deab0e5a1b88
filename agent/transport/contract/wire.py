"""Messages as bytes: an event's envelope around its fields, and one parser per kind of device message.

Producers serialize through `event_payload`; the fleet side and the tests read through the parsers,
so that both sides hold the same shapes, and anything else a device sends is a ContractError.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, TypeAdapter

from agent.transport.contract.base import Text, Timestamp, Wire, check, decode
from agent.transport.contract.events import EventBody, event_body
from agent.transport.contract.health import HealthReport
from agent.transport.contract.replies import CommandReply, check_reply
from agent.transport.contract.status import StatusMessage


class Envelope(Wire):
    """What the sink puts around every event's fields."""

    device: Text
    seq: int = Field(ge=1)  # one sequence for a device's events, rising across restarts
    ts: Timestamp
    type: Text


ENVELOPE = frozenset(Envelope.model_fields)
_ENVELOPE = TypeAdapter(Envelope)
_HEALTH = TypeAdapter(HealthReport)
_STATUS = TypeAdapter(StatusMessage)


@dataclass(frozen=True)
class WireEvent:
    """An event as a subscriber reads it."""

    envelope: Envelope
    body: EventBody

    @property
    def type(self) -> str:
        return self.envelope.type


def fields_of(body: EventBody) -> dict[str, object]:
    """An event's own fields as JSON values, as its producer gave them (unset optional fields left out)."""
    return body.model_dump(mode="json", exclude_unset=True)


def event_payload(device: str, seq: int, ts: str, body: EventBody) -> dict[str, object]:
    """The message an event is on the wire: the envelope, then the type's fields."""
    head = check(_ENVELOPE, {"device": device, "seq": seq, "ts": ts, "type": body.TYPE}, f"event {body.TYPE}")
    return {**head.model_dump(), **fields_of(body)}


def parse_event(raw: bytes | str) -> WireEvent:
    doc = decode(raw, "event")
    head = check(_ENVELOPE, {k: v for k, v in doc.items() if k in ENVELOPE}, "event")
    body = event_body(head.type, {k: v for k, v in doc.items() if k not in ENVELOPE})
    return WireEvent(head, body)


def parse_health(raw: bytes | str) -> HealthReport:
    return check(_HEALTH, decode(raw, "health"), "health")


def parse_status(raw: bytes | str) -> StatusMessage:
    return check(_STATUS, decode(raw, "status"), "status")


def parse_reply(raw: bytes | str) -> CommandReply:
    return check_reply(decode(raw, "reply"))


Kind = Literal["events", "health", "status", "reply"]
PARSERS: dict[Kind, Callable[[bytes | str], object]] = {
    "events": parse_event,
    "health": parse_health,
    "status": parse_status,
    "reply": parse_reply,
}
