"""Which messages the broker has acknowledged: a pointer (every id at or below it) and the ids above it.

A message stops counting once its PUBACK arrives. The pointer is written to `acked` at each sync, and a
segment whose messages are all at or below it is deleted; after a crash, messages acknowledged since the
last sync are sent again: duplicates, as QoS 1 allows, which `seq` makes visible. Nothing
unacknowledged is ever skipped.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.transport.outbox.segments import Segment


class Acks:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr
        self.above: set[int] = set()

    def add(self, ids: Iterable[int], below: int) -> int:
        """Mark the ids under `below` acknowledged; returns how many were still waiting."""
        added = 0
        for msg_id in ids:
            if msg_id > self.ptr and msg_id < below and msg_id not in self.above:
                self.above.add(msg_id)
                added += 1
        self.advance()
        return added

    def advance(self) -> None:
        while self.ptr + 1 in self.above:
            self.ptr += 1
            self.above.discard(self.ptr)

    def skip_through(self, last_id: int) -> None:
        """Every id up to `last_id` counts as done (its segment was dropped)."""
        if last_id > self.ptr:
            self.ptr = last_id
            self.above = {i for i in self.above if i > self.ptr}
            self.advance()

    def waiting(self, next_id: int) -> int:
        """How many of the ids below `next_id` wait for their acknowledgement."""
        return next_id - 1 - self.ptr - len(self.above)

    def unacked_in(self, seg: Segment) -> int:
        if seg.empty:
            return 0
        low = max(seg.first_id, self.ptr + 1)
        if low > seg.last_id:
            return 0
        acked = sum(1 for i in self.above if low <= i <= seg.last_id)
        return seg.last_id - low + 1 - acked
