"""Repeats of one event folded into a count, so that a camera of the wrong size does not send an
event per frame."""

from __future__ import annotations

import re
import threading
import time

from agent.transport.events import Event, EventSink

EVENT_REPEAT_S = 10.0
_NUMBER = re.compile(r"\d+")


class EventThrottle:
    """The first event of a kind at once, then one per interval carrying how many were folded."""

    def __init__(self, emit: EventSink, interval: float = EVENT_REPEAT_S) -> None:
        self.emit = emit
        self.interval = interval
        self._last: dict[str, float] = {}
        self._folded: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        now = time.monotonic()
        # Repeats are the same kind and reason, line numbers and counts aside.
        key = event.type + ":" + _NUMBER.sub("#", str(event.fields.get("reason", "")))
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._folded[key] = self._folded.get(key, 0) + 1
                return
            folded = self._folded.pop(key, 0)
            self._last[key] = now
        if folded:
            event = Event(event.type, {**event.fields, "repeated": folded}, event.ts)
        self.emit(event)
