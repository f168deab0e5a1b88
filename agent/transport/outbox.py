"""The durable outbox: every message bound for the broker waits here, on disk, until the broker acks it.

An append-only log of segment files (`<state_dir>/outbox/seg-<first id>.log`), chosen over SQLite in
WAL mode because it measured better for this access pattern (append at the tail, consume at the head):
SQLite wrote 13.8 KB to disk per 259-byte result (whole WAL pages per commit) and committed 9,000
results/s alone, 1,900/s end to end; the log stores the record (payload + 46 bytes + topic) once.
The active segment is preallocated (fallocate: a full disk is an error at segment start, never a
SIGBUS) and written through a shared memory mapping, which needs no system call per record.

- Order: ids rise by one per message; the publisher reads them in id order.
- A message stops counting once its PUBACK arrives (`ack`). The ack pointer (every id at or below it is
  acknowledged) is written to `acked` at each sync, and a segment file whose messages are all
  acknowledged is deleted. After a crash, messages acknowledged since the last sync are sent again:
  duplicates, as QoS 1 allows, which `seq` makes visible. Nothing unacknowledged is ever skipped.
- Bound: the files never exceed `max_bytes`; to make room the oldest segment (an eighth of the bound)
  is deleted and its unacknowledged messages counted as dropped. A segment also ends once its first
  message is older than max_age/8, and segments whose newest message is older than `max_age` are
  dropped and counted (a message goes at most max_age/8 after it expired). Counters persist in
  `counters.json`.
- `seq` per stream (a pipeline's results, the events) is written inside the record that uses it, and
  every segment starts with a checkpoint of all streams, so numbers keep rising across restarts even
  when every message has been delivered and deleted.

Durability (the fsync policy, see docs/mqtt.md): `put` returns once the record is in the shared
mapping, that is in the kernel's page cache, so a process that dies (kill -9, OOM, crash) loses nothing
it was handed. The log is flushed to the device (msync) every `fsync_interval` seconds (default 1 s) by
`sync_if_due`, which the publisher's maintenance thread calls: a power cut loses at most that window.
`fsync_interval=0` flushes every record, at a measured cost (bench/bench_outbox.py).
"""

from __future__ import annotations

import fcntl
import json
import logging
import mmap
import os
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from agent.config.profile import OutboxConfig

log = logging.getLogger(__name__)

DIRNAME = "outbox"
# len, crc32, id, ts, seq, qos, retain, topic length, stream length. `len` counts what follows the
# first 8 bytes; the crc covers the same bytes.
_HEAD = struct.Struct("<IIQdQBBHH")
HEADER_BYTES = _HEAD.size
_CHECKPOINT = 255  # qos value of a checkpoint record (seq and counters), never published
_READ_CHUNK = 256 * 1024
# A segment is this share of the bound (a drop at the bound frees one segment), within limits.
SEGMENT_SHARE = 8
SEGMENT_MIN, SEGMENT_MAX = 16 * 1024, 16 * 1024**2
# A full outbox logs at most this often (the count is in health and events anyway).
FULL_LOG_INTERVAL = 60.0
# Room kept under the bound for the small files beside the segments (acked, counters.json).
RESERVE = 16 * 1024  # also covers block rounding of the segment files


class Message(NamedTuple):
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    ts: float


@dataclass(frozen=True)
class OutboxStats:
    depth: int
    bytes: int
    max_bytes: int
    oldest_age_s: float | None
    dropped: int
    dropped_full: int
    dropped_age: int
    rejected: int
    acked: int

    def as_dict(self) -> dict[str, int | float | None]:
        return dict(self.__dict__)


@dataclass
class _Segment:
    path: Path
    first_id: int  # the first message id this segment may hold
    last_id: int = 0  # the last message id written to it (0: none yet)
    size: int = 0
    newest_ts: float = 0.0
    oldest_ts: float = 0.0
    fd: int | None = None  # only the active segment is open for writing
    map: mmap.mmap | None = None  # ... through this shared mapping of its preallocated length
    capacity: int = 0

    @property
    def empty(self) -> bool:
        return self.last_id < self.first_id


def _encode(
    msg_id: int, ts: float, seq: int, qos: int, retain: bool, topic: bytes, stream: bytes, payload: bytes
) -> bytes:
    body = _HEAD.pack(0, 0, msg_id, ts, seq, qos, int(retain), len(topic), len(stream))[8:] + topic + stream + payload
    return struct.pack("<II", len(body), zlib.crc32(body)) + body


@dataclass
class _Record:
    id: int
    ts: float
    seq: int
    qos: int
    retain: bool
    topic: str
    stream: str
    payload: bytes
    end: int  # offset just past the record


def _parse(buf: bytes, pos: int, check: bool = True) -> _Record | None:
    """The record at `pos`, or None if the bytes there are incomplete or damaged.

    `check=False` skips the crc: for bytes this process wrote and has just read back (the crc guards
    against a crash cutting a record short, which recovery checks).
    """
    if len(buf) - pos < HEADER_BYTES:
        return None
    length, crc = struct.unpack_from("<II", buf, pos)
    end = pos + 8 + length
    if length < HEADER_BYTES - 8 or end > len(buf):
        return None
    if check and zlib.crc32(buf[pos + 8 : end]) != crc:
        return None
    _l, _c, msg_id, ts, seq, qos, retain, tlen, slen = _HEAD.unpack_from(buf, pos)
    at = pos + HEADER_BYTES
    topic = buf[at : at + tlen].decode()
    stream = buf[at + tlen : at + tlen + slen].decode()
    return _Record(msg_id, ts, seq, qos, bool(retain), topic, stream, buf[at + tlen + slen : end], end)


@dataclass
class _Reader:
    """Where the publisher's last peek stopped, so the next one continues without a search."""

    last_id: int = -1
    segment: int = 0  # the first_id of the segment
    fd: int | None = None  # read-only descriptor of one segment, kept between peeks
    fd_segment: int = -1
    offset: int = 0
    pending: deque[Message] = field(default_factory=deque)


class Outbox:
    """A bounded, ordered, durable queue of MQTT messages. Thread-safe; one process per directory."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_bytes: int = 256 * 1024**2,
        max_age: float = 7 * 86400.0,
        fsync_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.dir = Path(path)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        if self.max_bytes < 4 * SEGMENT_MIN:
            raise ValueError(f"outbox max_bytes {self.max_bytes} is too small (at least {4 * SEGMENT_MIN // 1024}KiB)")
        self.max_age = float(max_age)
        self.fsync_interval = float(fsync_interval)
        self.segment_bytes = max(SEGMENT_MIN, min(SEGMENT_MAX, self.max_bytes // SEGMENT_SHARE))
        self._clock = clock
        self._lock = threading.RLock()
        self._listeners: list[Callable[[], None]] = []
        self._closed = False
        self._dirty = False
        self._dir_dirty = True
        self._last_sync = time.monotonic()
        self._last_full_log = float("-inf")
        self._acked_above: set[int] = set()
        self._acked = 0
        self._reader = _Reader()
        self._topic_cache: dict[bytes, str] = {}
        self.bytes_written = 0  # everything this outbox wrote to its files, for the bench
        self._seq: dict[str, int] = {}
        self._counters: dict[str, int] = self._read_json("counters.json")
        self._ack_ptr = int(self._read_text("acked") or 0)
        self._segments: list[_Segment] = []
        self._lock_fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise RuntimeError(
                f"outbox {self.dir} is in use by another process (two agents with one state_dir?)"
            ) from None
        self._recover()
        self._total = sum(s.size for s in self._segments)  # bytes in segment files, kept up to date
        holding = [s for s in self._segments if not s.empty]
        if holding:
            # Segments before the first one left were acknowledged and deleted, perhaps after the last
            # write of the ack pointer.
            self._ack_ptr = max(self._ack_ptr, holding[0].first_id - 1)
        self._next_id = max([self._ack_ptr] + [s.last_id for s in self._segments]) + 1
        self._roll()
        self._release_acked()
        self.prune()

    # ---- producers -------------------------------------------------------------------------

    def put(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Store one message; returns its id. Safe from a process crash on return."""
        return self.put_sequenced(None, topic, lambda _seq: payload, qos=qos, retain=retain)[0]

    def put_sequenced(
        self,
        stream: str | None,
        topic: str,
        build: Callable[[int], bytes],
        *,
        count: int = 1,
        qos: int = 1,
        retain: bool = False,
    ) -> tuple[int, int]:
        """Number `count` items of `stream` and store the message `build(first_seq)`, in one write.

        Returns (message id, first seq); seq is 0 without a stream.
        """
        with self._lock:
            self._check_open()
            first = self._seq.get(stream, 0) + 1 if stream is not None else 0
            last = first + count - 1 if stream is not None else 0
            payload = build(first)
            msg_id = self._next_id
            now = self._clock()
            record = _encode(msg_id, now, last, qos, retain, topic.encode(), (stream or "").encode(), payload)
            if len(record) > self.max_bytes // 2:
                raise ValueError(f"a message of {len(record)} bytes does not fit an outbox of {self.max_bytes} bytes")
            self._make_room(len(record), now)
            seg = self._segments[-1]
            assert seg.map is not None
            # A store into a shared file mapping: in the page cache, so it outlives this process like
            # write(2) would, without a system call (measured: write(2) per result cost a fifth of the
            # throughput, mostly in handing the interpreter lock to the network thread and back).
            seg.map[seg.size : seg.size + len(record)] = record
            if self.fsync_interval <= 0:
                start = seg.size - seg.size % mmap.PAGESIZE
                seg.map.flush(start, seg.size + len(record) - start)
            seg.size += len(record)
            self._total += len(record)
            self.bytes_written += len(record)
            if seg.empty:
                seg.oldest_ts = now
            seg.last_id, seg.newest_ts = msg_id, now
            self._next_id += 1
            if stream is not None:
                self._seq[stream] = last
            self._dirty = True
        for listener in self._listeners:
            listener()
        return msg_id, first

    def last_seq(self, stream: str) -> int:
        with self._lock:
            return self._seq.get(stream, 0)

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Called (outside the lock) after every put: the publisher wakes up on it."""
        self._listeners.append(callback)

    # ---- the publisher -----------------------------------------------------------------------

    def peek(self, after_id: int = 0, limit: int = 100) -> list[Message]:
        """Up to `limit` unacknowledged messages with an id above `after_id`, oldest first."""
        with self._lock:
            self._check_open()
            reader = self._reader
            if after_id != reader.last_id:
                self._seek(max(after_id, self._ack_ptr))
            out: list[Message] = []
            while len(out) < limit:
                if not reader.pending and not self._read_more():
                    break
                msg = reader.pending.popleft()
                reader.last_id = msg.id
                if msg.id > after_id and msg.id not in self._acked_above and msg.id > self._ack_ptr:
                    out.append(msg)
            if out:
                reader.last_id = out[-1].id
            return out

    def ack(self, ids: Iterable[int], rejected: int = 0) -> int:
        """Mark messages acknowledged; returns how many were still waiting."""
        with self._lock:
            self._check_open()
            removed = 0
            for msg_id in ids:
                if msg_id > self._ack_ptr and msg_id < self._next_id and msg_id not in self._acked_above:
                    self._acked_above.add(msg_id)
                    removed += 1
            while self._ack_ptr + 1 in self._acked_above:
                self._ack_ptr += 1
                self._acked_above.discard(self._ack_ptr)
            if rejected:
                self._count("rejected", rejected)
            self._acked += removed - rejected
            self._release_acked()
            self._dirty = True
            return removed

    def prune(self) -> int:
        """Drop segments whose newest message is older than max_age; returns how many messages."""
        with self._lock:
            self._check_open()
            cutoff = self._clock() - self.max_age
            dropped = 0
            while len(self._segments) > 1 and self._segments[0].newest_ts < cutoff and not self._segments[0].empty:
                dropped += self._drop_segment(self._segments[0])
            active = self._segments[-1]
            if not active.empty and active.newest_ts < cutoff and self._unacked_in(active):
                self._roll()
                dropped += self._drop_segment(active)
            if dropped:
                self._count("dropped", dropped)
                self._count("dropped_age", dropped)
                log.warning("outbox: dropped %d message(s) older than %.0f s", dropped, self.max_age)
            return dropped

    def sync_if_due(self, force: bool = False) -> bool:
        """fsync the log and write the ack pointer when fsync_interval has passed (and something changed)."""
        now = time.monotonic()
        with self._lock:
            if (
                self._closed
                or not self._dirty
                or (not force and now - self._last_sync < max(self.fsync_interval, 0.05))
            ):
                return False
            self._dirty = False
            self._last_sync = now
            seg = self._segments[-1]
            if seg.map is not None and self.fsync_interval > 0:
                seg.map.flush()
            self._write_text("acked", str(self._ack_ptr))
            if self._dir_dirty:
                self._fsync_dir()
        return True

    # ---- reporting ---------------------------------------------------------------------------

    @property
    def last_id(self) -> int:
        """The id of the newest message put (0 when none yet)."""
        return self._next_id - 1

    @property
    def depth(self) -> int:
        return self._next_id - 1 - self._ack_ptr - len(self._acked_above)

    @property
    def dropped(self) -> int:
        return int(self._counters.get("dropped", 0))

    def stats(self) -> OutboxStats:
        with self._lock:
            oldest = None
            if self.depth and not self._closed:
                # The first message of the oldest segment still holding unacknowledged ones: exact when
                # the broker has been away, a little older than the truth while the head is draining.
                holding = next((s for s in self._segments if self._unacked_in(s)), None)
                oldest = round(max(0.0, self._clock() - holding.oldest_ts), 3) if holding else None
            c = self._counters
            return OutboxStats(
                depth=self.depth,
                bytes=self._total,
                max_bytes=self.max_bytes,
                oldest_age_s=oldest,
                dropped=int(c.get("dropped", 0)),
                dropped_full=int(c.get("dropped_full", 0)),
                dropped_age=int(c.get("dropped_age", 0)),
                rejected=int(c.get("rejected", 0)),
                acked=self._acked,
            )

    def disk_bytes(self) -> int:
        """What the outbox occupies on disk: every file in its directory, the active segment at its
        preallocated length."""
        return sum(p.stat().st_size for p in self.dir.iterdir() if p.is_file())

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._dirty = True
            self.sync_if_due(force=True)
            self._write_json("counters.json", self._counters)
            for seg in self._segments:
                if seg.fd is not None:
                    self._unmap(seg, sync=self.fsync_interval > 0)
            if self._reader.fd is not None:
                os.close(self._reader.fd)
                self._reader.fd = None
            os.close(self._lock_fd)  # also releases the lock
            self._closed = True

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals: segments -----------------------------------------------------------------

    def _recover(self) -> None:
        for path in sorted(self.dir.glob("seg-*.log")):
            try:
                first_id = int(path.stem[4:])
            except ValueError:
                continue
            seg = _Segment(path, first_id)
            data = path.read_bytes()
            pos = 0
            while pos < len(data):
                rec = _parse(data, pos)
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
                if rec.qos == _CHECKPOINT:
                    state = json.loads(rec.payload)
                    for name, value in state.get("seq", {}).items():
                        self._seq[name] = max(self._seq.get(name, 0), int(value))
                    for name, value in state.get("counters", {}).items():
                        self._counters[name] = max(self._counters.get(name, 0), int(value))
                else:
                    if seg.empty:
                        seg.oldest_ts = rec.ts
                    seg.last_id, seg.newest_ts = rec.id, max(seg.newest_ts, rec.ts)
                    if rec.stream:
                        self._seq[rec.stream] = max(self._seq.get(rec.stream, 0), rec.seq)
                pos = rec.end
            seg.size = pos
            self._segments.append(seg)

    def _roll(self, need: int = 0) -> None:
        """Start a new active segment, opened by a checkpoint of every seq and counter."""
        if self._segments and self._segments[-1].fd is not None:
            self._unmap(self._segments[-1], sync=True)
        path = self.dir / f"seg-{self._next_id:020d}.log"
        if self._segments and self._segments[-1].path == path:
            # The active segment has no message yet (a restart with nothing written): reuse its name.
            seg = self._segments[-1]
        else:
            seg = _Segment(path, self._next_id)
            self._segments.append(seg)
        seg.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        checkpoint = json.dumps({"seq": self._seq, "counters": self._counters}).encode()
        record = _encode(0, self._clock(), 0, _CHECKPOINT, False, b"", b"", checkpoint)
        size = os.fstat(seg.fd).st_size
        os.pwrite(seg.fd, record, size)
        self.bytes_written += len(record)
        size += len(record)
        self._total += size - seg.size
        seg.size = size
        # Blocks are allocated now, not as records land: on a full disk a store into a sparse mapping
        # is SIGBUS (the process dies), where fallocate is an OSError here.
        seg.capacity = max(self.segment_bytes, size + need)
        try:
            os.posix_fallocate(seg.fd, 0, seg.capacity)
        except OSError as exc:
            wanted, seg.capacity = seg.capacity, 0
            os.ftruncate(seg.fd, size)
            raise OSError(
                exc.errno, f"outbox {self.dir}: cannot reserve {wanted} bytes for a segment: {exc.strerror}"
            ) from None
        seg.map = mmap.mmap(seg.fd, seg.capacity)
        self._dir_dirty = True

    def _unmap(self, seg: _Segment, sync: bool) -> None:
        """Close the active segment: flush, cut the preallocated tail, close."""
        if seg.map is not None:
            if sync:
                seg.map.flush()
            seg.map.close()
            seg.map = None
        if seg.fd is not None:
            os.ftruncate(seg.fd, seg.size)
            if sync:
                os.fsync(seg.fd)
            os.close(seg.fd)
            seg.fd = None
        seg.capacity = 0

    def _make_room(self, need: int, now: float) -> None:
        active = self._segments[-1]
        # Segments also end by age, so that max_age drops whole segments at most max_age/8 late.
        if (
            not active.empty
            and (active.size + need > self.segment_bytes or now - active.oldest_ts > self.max_age / SEGMENT_SHARE)
        ) or active.size + need > active.capacity:
            self._roll(need)
        dropped = 0
        # On disk: closed segments by size, the active one by its preallocated capacity.
        while (
            len(self._segments) > 1
            and self._total - self._segments[-1].size + self._segments[-1].capacity + RESERVE > self.max_bytes
        ):
            dropped += self._drop_segment(self._segments[0])
        if dropped:
            self._count("dropped", dropped)
            self._count("dropped_full", dropped)
            now_m = time.monotonic()
            if now_m - self._last_full_log >= FULL_LOG_INTERVAL:
                self._last_full_log = now_m
                log.warning(
                    "outbox full (%d bytes): dropping the oldest messages (%d so far)", self.max_bytes, self.dropped
                )

    def _unacked_in(self, seg: _Segment) -> int:
        if seg.empty:
            return 0
        low = max(seg.first_id, self._ack_ptr + 1)
        if low > seg.last_id:
            return 0
        acked = sum(1 for i in self._acked_above if low <= i <= seg.last_id)
        return seg.last_id - low + 1 - acked

    def _drop_segment(self, seg: _Segment) -> int:
        """Delete a segment that is not the active one; returns the unacknowledged messages it held."""
        lost = self._unacked_in(seg)
        if not seg.empty and seg.last_id > self._ack_ptr:
            self._ack_ptr = seg.last_id
            self._acked_above = {i for i in self._acked_above if i > self._ack_ptr}
            while self._ack_ptr + 1 in self._acked_above:
                self._ack_ptr += 1
                self._acked_above.discard(self._ack_ptr)
        self._delete(seg)
        if lost:
            self._write_text("acked", str(self._ack_ptr))
        return lost

    def _release_acked(self) -> None:
        while len(self._segments) > 1 and self._segments[0].last_id <= self._ack_ptr:
            self._delete(self._segments[0])

    def _delete(self, seg: _Segment) -> None:
        if seg.fd is not None:
            self._unmap(seg, sync=False)
        if self._reader.fd is not None and self._reader.fd_segment == seg.first_id:
            os.close(self._reader.fd)
            self._reader.fd, self._reader.fd_segment = None, -1
        try:
            seg.path.unlink()
        except FileNotFoundError:
            pass
        self._segments.remove(seg)
        self._total -= seg.size
        self._dir_dirty = True
        if self._reader.segment == seg.first_id:
            # Whatever the reader holds from this segment is gone with it; the next read starts at the
            # segment after it, whose ids are all higher.
            self._reader.pending = deque()
            self._reader.offset = 0

    # ---- internals: reading ------------------------------------------------------------------

    def _seek(self, after_id: int) -> None:
        reader = self._reader
        reader.pending = deque()
        reader.last_id = after_id
        target = self._segments[0]
        for seg in self._segments:
            if seg.first_id <= after_id + 1:
                target = seg
        reader.segment, reader.offset = target.first_id, 0
        # Skip records up to after_id inside the segment.
        while self._read_more():
            keep = deque(m for m in reader.pending if m.id > after_id)
            if keep:
                reader.pending = keep
                break
            reader.pending = deque()
        reader.last_id = after_id

    def _read_more(self) -> bool:
        """Append the next chunk of records to reader.pending; False at the end of the log."""
        reader = self._reader
        index = next((i for i, s in enumerate(self._segments) if s.first_id == reader.segment), None)
        if index is None:
            # The segment was deleted (acked or dropped): go on with the oldest remaining one after it.
            later = [s for s in self._segments if s.first_id > reader.segment]
            if not later:
                return False
            index = self._segments.index(later[0])
            reader.segment, reader.offset = later[0].first_id, 0
        while True:
            seg = self._segments[index]
            if reader.offset < seg.size:
                data = self._pread(seg, min(_READ_CHUNK, seg.size - reader.offset), reader.offset)
                pos = self._scan(data, reader.pending)
                if pos == 0:
                    # One record larger than the chunk: read exactly it.
                    (length,) = struct.unpack_from("<I", data, 0)
                    data = self._pread(seg, 8 + length, reader.offset)
                    pos = self._scan(data, reader.pending)
                    if pos == 0:
                        raise RuntimeError(f"outbox {seg.path.name}: unreadable record at byte {reader.offset}")
                reader.offset += pos
                if reader.pending:
                    return True
                continue
            if index + 1 >= len(self._segments):
                return False
            index += 1
            reader.segment, reader.offset = self._segments[index].first_id, 0

    def _pread(self, seg: _Segment, size: int, offset: int) -> bytes:
        reader = self._reader
        if reader.fd is None or reader.fd_segment != seg.first_id:
            if reader.fd is not None:
                os.close(reader.fd)
            reader.fd, reader.fd_segment = os.open(seg.path, os.O_RDONLY), seg.first_id
        return os.pread(reader.fd, size, offset)

    def _scan(self, data: bytes, out: deque[Message]) -> int:
        """Append the messages of the whole records in `data` to `out`; returns the bytes used.

        The publisher's hot path: one unpack per record and no crc (these bytes were written by this
        process and read back whole; recovery checks the crc after a crash).
        """
        pos, end, unpack, topics = 0, len(data), _HEAD.unpack_from, self._topic_cache
        while end - pos >= HEADER_BYTES:
            length, _crc, msg_id, ts, _seq, qos, retain, tlen, slen = unpack(data, pos)
            stop = pos + 8 + length
            if stop > end:
                break
            if qos != _CHECKPOINT:
                at = pos + HEADER_BYTES
                raw = data[at : at + tlen]
                topic = topics.get(raw)
                if topic is None:
                    topic = topics[raw] = raw.decode()
                out.append(Message(msg_id, topic, data[at + tlen + slen : stop], qos, bool(retain), ts))
            pos = stop
        return pos

    # ---- internals: small files --------------------------------------------------------------

    def _count(self, name: str, n: int) -> None:
        self._counters[name] = int(self._counters.get(name, 0)) + n
        self._write_json("counters.json", self._counters)

    def _read_text(self, name: str) -> str | None:
        try:
            return (self.dir / name).read_text().strip()
        except (OSError, ValueError):
            return None

    def _read_json(self, name: str) -> dict[str, int]:
        text = self._read_text(name)
        try:
            data = json.loads(text) if text else {}
        except ValueError:
            data = {}
        return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _write_text(self, name: str, text: str) -> None:
        tmp = self.dir / f".{name}.tmp"
        tmp.write_text(text)
        self.bytes_written += len(text)
        os.replace(tmp, self.dir / name)

    def _write_json(self, name: str, data: dict[str, int]) -> None:
        self._write_text(name, json.dumps(data))

    def _fsync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._dir_dirty = False

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"outbox {self.dir} is closed")


def open_outbox(state_dir: str | Path, config: OutboxConfig | None = None) -> Outbox:
    """The outbox of a profile: `<state_dir>/outbox/`, bounded by `mqtt.outbox`."""
    path = Path(state_dir) / DIRNAME
    if config is None:
        return Outbox(path)
    return Outbox(path, max_bytes=config.max_bytes, max_age=config.max_age)
