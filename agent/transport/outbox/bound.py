"""The outbox's bound: its files never exceed `max_bytes`, and messages older than `max_age` go.

To make room the oldest segment (an eighth of the bound) is deleted and its unacknowledged messages are
counted as dropped (`dropped_full`). A segment also ends once its first message is older than max_age/8,
and segments whose newest message is older than `max_age` are dropped and counted (`dropped_age`): a
message goes at most max_age/8 after it expired. Drops are counted in `counters.json`.
"""

from __future__ import annotations

import logging
import time

from agent.transport.outbox.acks import Acks
from agent.transport.outbox.segments import Segment, SegmentFiles
from agent.transport.outbox.state import ACKED, Counters, StateFiles

log = logging.getLogger(__name__)

# A segment is this share of the bound (a drop at the bound frees one segment), within limits.
SEGMENT_SHARE = 8
SEGMENT_MIN, SEGMENT_MAX = 16 * 1024, 16 * 1024**2
# A full outbox logs at most this often (the count is in health and events anyway).
FULL_LOG_INTERVAL = 60.0


def segment_bytes(max_bytes: int) -> int:
    """The size of one segment under a bound of `max_bytes`."""
    return max(SEGMENT_MIN, min(SEGMENT_MAX, max_bytes // SEGMENT_SHARE))


class Bound:
    """Drops at the bound and by age, under the outbox's lock."""

    def __init__(
        self,
        files: SegmentFiles,
        acks: Acks,
        state: StateFiles,
        counters: Counters,
        *,
        max_bytes: int,
        max_age: float,
    ) -> None:
        self.files, self.acks, self.state, self.counters = files, acks, state, counters
        self.max_bytes = max_bytes
        self.max_age = max_age
        self._last_full_log = float("-inf")

    def must_roll(self, need: int, now: float) -> bool:
        """Whether a record of `need` bytes, put at `now`, starts a new segment."""
        active = self.files.segments[-1]
        # Segments also end by age, so that max_age drops whole segments at most max_age/8 late.
        return (
            not active.empty
            and (active.size + need > self.files.segment_bytes or now - active.oldest_ts > self.max_age / SEGMENT_SHARE)
        ) or active.size + need > active.capacity

    def make_room(self) -> None:
        """Keep the files within the bound: the spare goes first, then the oldest segments."""
        files = self.files
        if files.spare is not None and files.disk_estimate() > self.max_bytes:
            files.drop_spare()
        dropped = 0
        while len(files.segments) > 1 and files.disk_estimate() > self.max_bytes:
            dropped += self.drop(files.segments[0])
        if dropped:
            self.counters.add("dropped", dropped)
            self.counters.add("dropped_full", dropped)
            now_m = time.monotonic()
            if now_m - self._last_full_log >= FULL_LOG_INTERVAL:
                self._last_full_log = now_m
                log.warning(
                    "outbox full (%d bytes): dropping the oldest messages (%d so far)",
                    self.max_bytes,
                    self.counters.get("dropped"),
                )

    def expired(self, seg: Segment, cutoff: float) -> bool:
        """Whether a segment holds unacknowledged messages that all came before `cutoff`."""
        return not seg.empty and seg.newest_ts < cutoff and self.acks.unacked_in(seg) > 0

    def drop_expired(self, cutoff: float) -> int:
        """Drop the closed segments whose newest message came before `cutoff`; returns how many messages."""
        files, dropped = self.files, 0
        while len(files.segments) > 1 and files.segments[0].newest_ts < cutoff and not files.segments[0].empty:
            dropped += self.drop(files.segments[0])
        return dropped

    def count_expired(self, dropped: int) -> None:
        self.counters.add("dropped", dropped)
        self.counters.add("dropped_age", dropped)
        log.warning("outbox: dropped %d message(s) older than %.0f s", dropped, self.max_age)

    def drop(self, seg: Segment) -> int:
        """Delete a segment that is not the active one; returns the unacknowledged messages it held."""
        lost = self.skip(seg)
        self.files.delete(seg)
        return lost

    def skip(self, seg: Segment) -> int:
        """Count every message of `seg` as done without deleting its file (the active segment, when a full
        disk has no room to roll it away); returns the unacknowledged messages it held."""
        lost = self.acks.unacked_in(seg)
        if not seg.empty:
            self.acks.skip_through(seg.last_id)
        if lost:
            self.state.write_text(ACKED, str(self.acks.ptr))
        return lost

    def release_acked(self) -> None:
        """Delete the segments whose every message is acknowledged."""
        files = self.files
        while len(files.segments) > 1 and files.segments[0].last_id <= self.acks.ptr:
            files.delete(files.segments[0])
