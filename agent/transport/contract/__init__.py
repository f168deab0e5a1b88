"""What crosses the wire, defined once: events, health, status and command replies as strict models.

The device builds its messages through these models (`agent.transport.events.Event` validates its
fields at construction, the sinks serialize through `wire.event_payload`), and the fleet side parses
what devices send with the same models (`wire.parse_*`), so neither side can use a field the other
does not have. docs/events.md and the payload examples of docs/mqtt.md are checked against them
(tests/test_contract.py).

base.py      the strict base model, the timestamp type, ContractError
events.py    one model per event type, and the registry `EVENTS` keyed by type
health.py    the retained health report
status.py    the retained online/offline status
replies.py   command replies and each command's result
wire.py      the event envelope, serialization, and a parser per kind of message
"""

from agent.transport.contract.base import ContractError
from agent.transport.contract.events import EVENTS, EventBody, event_body
from agent.transport.contract.wire import WireEvent, event_payload, parse_event, parse_health, parse_reply, parse_status

__all__ = [
    "EVENTS",
    "ContractError",
    "EventBody",
    "WireEvent",
    "event_body",
    "event_payload",
    "parse_event",
    "parse_health",
    "parse_reply",
    "parse_status",
]
