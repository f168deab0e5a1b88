"""Events and the sink every producer writes to.

Producers (pipelines, the model store, provider selection, commands) never talk to MQTT or stdout
directly: they hand results and events to a `Sink`. The daemon wires the sink: the durable outbox when a
broker is configured, JSON lines on stdout otherwise.

An event is checked against its type's model in `agent.transport.contract` when it is made: a
producer cannot emit an event the contract does not have (ContractError names the type and the field).
The contract (pydantic) is imported by the first event made, not by this module: the daemon's start
makes its first events once the first results are out (issue 15).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from agent.transport.contract import EventBody

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """Something a fleet operator wants to know: `type` is dotted, e.g. model.activated, source.lost."""

    type: str
    fields: dict[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)
    body: EventBody = field(init=False, repr=False, compare=False)  # `fields`, validated

    def __post_init__(self) -> None:
        from agent.transport.contract import event_body

        object.__setattr__(self, "body", event_body(self.type, self.fields))

    def payload(self) -> dict[str, object]:
        """The event's own fields as the wire carries them (the sink adds the envelope)."""
        from agent.transport.contract.wire import fields_of

        return fields_of(self.body)


EventSink = Callable[[Event], None]


class Sink(Protocol):
    def result(self, pipeline: str, payload: dict[str, Any], qos: int) -> None:
        """Queue one result; the sink assigns `seq` (per pipeline, monotonic across restarts)."""

    def event(self, event: Event) -> None:
        """Queue one event for edge/<device>/events."""


def log_event(event: Event) -> None:
    """The fallback event sink: events still reach the journal when nothing else listens."""
    log.info("event type=%s %s", event.type, " ".join(f"{k}={v!r}" for k, v in event.payload().items()))
