"""Messages as bytes: an event's envelope around its fields, and one parser per kind of device message.

Producers serialize through `event_payload`; the fleet side and the tests read through the parsers,
so that both sides hold the same shapes, and anything else a device sends is a ContractError.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from agent.transport.contract.base import Text, Timestamp, Wire, check_json, check_model, decode
from agent.transport.contract.events import EventBody, event_body
from agent.transport.contract.health import HealthReport
from agent.transport.contract.replies import CommandReply, check_reply
from agent.transport.contract.report import DeviceReport, parse_report_text, split_signed
from agent.transport.contract.status import StatusMessage


class Envelope(Wire):
    """What the sink puts around every event's fields."""

    device: Text
    seq: int = Field(ge=1)  # one sequence for a device's events, rising across restarts
    ts: Timestamp
    type: Text


ENVELOPE = frozenset(Envelope.model_fields)


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
    head = check_model(Envelope, {"device": device, "seq": seq, "ts": ts, "type": body.TYPE}, f"event {body.TYPE}")
    return {**head.model_dump(), **fields_of(body)}


def parse_event(raw: bytes | str) -> WireEvent:
    doc = decode(raw, "event")
    head = check_model(Envelope, {k: v for k, v in doc.items() if k in ENVELOPE}, "event")
    body = event_body(head.type, {k: v for k, v in doc.items() if k not in ENVELOPE})
    return WireEvent(head, body)


def parse_health(raw: bytes | str) -> HealthReport:
    return check_json(HealthReport, raw, "health")


def parse_status(raw: bytes | str) -> StatusMessage:
    return check_json(StatusMessage, raw, "status")


def parse_reply(raw: bytes | str) -> CommandReply:
    return check_reply(decode(raw, "reply"))


def parse_report(raw: bytes | str) -> DeviceReport:
    """A report as it travels (its text and signature; the signature is the reader's to check)."""
    text, _ = split_signed(raw.encode() if isinstance(raw, str) else raw)
    return parse_report_text(text)


Kind = Literal["events", "health", "status", "reply", "report"]
PARSERS: dict[Kind, Callable[[bytes | str], object]] = {
    "events": parse_event,
    "health": parse_health,
    "status": parse_status,
    "reply": parse_reply,
    "report": parse_report,
}
