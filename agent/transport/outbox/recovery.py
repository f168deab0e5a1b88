"""Reading an outbox directory back after a restart or a crash: its segments, seqs and counters.

A record that a crash cut short (or damaged) ends its segment: the file is cut there and what precedes it
is kept. The preallocated, never written tail of the segment that was active is cut the same way. After
a power cut at a roll, the new segment's first records may be on the device while the old one's last
records (inside the fsync window) are not: the ids missing between segments are returned, to be counted
as gone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from agent.transport.outbox.record import CHECKPOINT, parse, read_checkpoint
from agent.transport.outbox.segments import Segment

log = logging.getLogger(__name__)


@dataclass
class Recovered:
    segments: list[Segment] = field(default_factory=list)
    seq: dict[str, int] = field(default_factory=dict)  # the highest seq of every stream
    counters: dict[str, int] = field(default_factory=dict)  # the highest count in any checkpoint
    gaps: list[range] = field(default_factory=list)  # ids missing between segments

    def lost(self, ack_ptr: int) -> list[int]:
        """The missing ids that were not acknowledged: gone in a power cut."""
        return [i for gap in self.gaps for i in gap if i > ack_ptr]


def recover(directory: Path) -> Recovered:
    """Read the segments back (cutting torn tails); spares preallocated and never written are removed."""
    for stale in directory.glob(".spare-*"):
        stale.unlink()
    found = Recovered()
    for path in sorted(directory.glob("seg-*.log")):
        try:
            first_id = int(path.stem[4:])
        except ValueError:
            continue
        found.segments.append(_read_segment(path, first_id, found))
    return found


def _read_segment(path: Path, first_id: int, found: Recovered) -> Segment:
    seg = Segment(path, first_id)
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
        rec = parse(data, pos)
        if rec is None:
            if data[pos:].strip(b"\0"):
                log.warning(
                    "outbox: %s is damaged or cut short at byte %d of %d (a crash while writing); "
                    "keeping what precedes it",
                    path.name,
                    pos,
                    len(data),
                )
            # (else: the preallocated, never written tail of a segment that was active in a crash)
            with open(path, "r+b") as f:
                f.truncate(pos)
            break
        if rec.qos == CHECKPOINT:
            state = read_checkpoint(rec)
            for name, value in state.seq.items():
                found.seq[name] = max(found.seq.get(name, 0), value)
            for name, value in state.counters.items():
                found.counters[name] = max(found.counters.get(name, 0), value)
        else:
            if seg.empty:
                seg.oldest_ts = rec.ts
                before = next((s.last_id for s in reversed(found.segments) if not s.empty), rec.id - 1)
                if rec.id > before + 1:
                    found.gaps.append(range(before + 1, rec.id))
            seg.last_id, seg.newest_ts = rec.id, max(seg.newest_ts, rec.ts)
            if rec.stream:
                found.seq[rec.stream] = max(found.seq.get(rec.stream, 0), rec.seq)
        pos = rec.end
    seg.size = pos
    return seg
