"""The publisher's side of the outbox: messages read back in id order, from where the last peek stopped.

Reads go through a read-only descriptor kept between peeks, in chunks, decoded by `record.scan`; the
position survives between peeks so that the next one continues without a search.
"""

from __future__ import annotations

import os
from collections import deque
from typing import TYPE_CHECKING

from agent.transport.outbox.record import Message, record_length, scan

if TYPE_CHECKING:
    from agent.transport.outbox.acks import Acks
    from agent.transport.outbox.segments import Segment

READ_CHUNK = 256 * 1024


class Reader:
    """Where the publisher's last peek stopped. Used under the outbox's lock."""

    def __init__(self, segments: list[Segment]) -> None:
        self.segments = segments  # the outbox's list, oldest first
        self.last_id = -1
        self.segment = 0  # the first_id of the segment
        self.fd: int | None = None  # read-only descriptor of one segment, kept between peeks
        self.fd_segment = -1
        self.offset = 0
        self.pending: deque[Message] = deque()
        self.topics: dict[bytes, str] = {}

    def take(self, after_id: int, limit: int, acks: Acks) -> list[Message]:
        """Up to `limit` unacknowledged messages with an id above `after_id`, oldest first."""
        if after_id != self.last_id:
            self.seek(max(after_id, acks.ptr))
        out: list[Message] = []
        while len(out) < limit:
            if not self.pending and not self.read_more():
                break
            msg = self.pending.popleft()
            self.last_id = msg.id
            if msg.id > after_id and msg.id not in acks.above and msg.id > acks.ptr:
                out.append(msg)
        if out:
            self.last_id = out[-1].id
        return out

    def seek(self, after_id: int) -> None:
        self.pending = deque()
        self.last_id = after_id
        target = self.segments[0]
        for seg in self.segments:
            if seg.first_id <= after_id + 1:
                target = seg
        self.segment, self.offset = target.first_id, 0
        # Skip records up to after_id inside the segment.
        while self.read_more():
            keep = deque(m for m in self.pending if m.id > after_id)
            if keep:
                self.pending = keep
                break
            self.pending = deque()
        self.last_id = after_id

    def read_more(self) -> bool:
        """Append the next chunk of records to `pending`; False at the end of the log."""
        segments = self.segments
        index = next((i for i, s in enumerate(segments) if s.first_id == self.segment), None)
        if index is None:
            # The segment was deleted (acked or dropped): go on with the oldest remaining one after it.
            later = [s for s in segments if s.first_id > self.segment]
            if not later:
                return False
            index = segments.index(later[0])
            self.segment, self.offset = later[0].first_id, 0
        while True:
            seg = segments[index]
            if self.offset < seg.size:
                data = self._pread(seg, min(READ_CHUNK, seg.size - self.offset), self.offset)
                pos = scan(data, self.pending, self.topics)
                if pos == 0:
                    # One record larger than the chunk: read exactly it.
                    data = self._pread(seg, record_length(data), self.offset)
                    pos = scan(data, self.pending, self.topics)
                    if pos == 0:
                        raise RuntimeError(f"outbox {seg.path.name}: unreadable record at byte {self.offset}")
                self.offset += pos
                if self.pending:
                    return True
                continue
            if index + 1 >= len(segments):
                return False
            index += 1
            self.segment, self.offset = segments[index].first_id, 0

    def forget(self, seg: Segment) -> None:
        """Let go of a segment that is deleted or replaced."""
        if self.fd is not None and self.fd_segment == seg.first_id:
            os.close(self.fd)
            self.fd, self.fd_segment = None, -1
        if self.segment == seg.first_id:
            # Whatever is held from this segment is gone with it; the next read starts at the segment
            # after it, whose ids are all higher (or at its replacement's start).
            self.pending = deque()
            self.offset = 0

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _pread(self, seg: Segment, size: int, offset: int) -> bytes:
        if self.fd is None or self.fd_segment != seg.first_id:
            if self.fd is not None:
                os.close(self.fd)
            self.fd, self.fd_segment = os.open(seg.path, os.O_RDONLY), seg.first_id
        return os.pread(self.fd, size, offset)
