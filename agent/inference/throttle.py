"""Repeats of one event folded into a count, so that a camera of the wrong size does not send an
event per frame."""

from __future__ import annotations

import re
import threading
import time

from agent.transport.events import Event, EventSink

EVENT_REPEAT_S = 10.0
# Kinds remembered before those whose interval has passed are forgotten: reasons quote what came from outside
# (a file's name, a row's value), so every distinct bad row was a kind kept for ever.
MAX_KINDS = 1024
_NUMBER = re.compile(r"\d+")


class EventThrottle:
    """The first event of a kind at once, then one per interval carrying how many were folded."""

    def __init__(self, emit: EventSink, interval: float = EVENT_REPEAT_S) -> None:
        self.emit = emit
        self.interval = interval
        self._last: dict[str, float] = {}
        self._folded: dict[str, int] = {}
        self._limit = MAX_KINDS  # kinds kept before the next `_forget` (doubling: a flood costs no scan each)
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
            if len(self._last) > self._limit:
                self._forget(now)
                self._limit = max(MAX_KINDS, 2 * len(self._last))
        if folded:
            event = Event(event.type, {**event.fields, "repeated": folded}, event.ts)
        self.emit(event)

    def _forget(self, now: float) -> None:
        """Drop the kinds whose interval has passed: their next event goes out at once either way. Repeats
        folded into one of them were waiting for a next event of that kind, which may never come; they are
        lost, as they would have been."""
        for key in [k for k, last in self._last.items() if now - last >= self.interval]:
            del self._last[key]
            self._folded.pop(key, None)
