"""The Outbox: a bounded, ordered, durable queue of MQTT messages; producers put, the publisher peeks and
acks.

Durability (the fsync policy, see docs/mqtt.md): `put` returns once the record is in the shared
mapping, that is in the kernel's page cache, so a process that dies (kill -9, OOM, crash) loses nothing
it was handed. The log is flushed to the device (fdatasync) every `fsync_interval` seconds (default 1 s)
by `sync_if_due`, which the publisher's maintenance thread calls: a power cut loses at most that window.
`fsync_interval=0` flushes every record before `put` returns, at a measured cost (bench/bench_outbox.py).
Flushes use fsync/fdatasync, which release the interpreter lock (`mmap.flush`, msync, holds it: every
thread would stop), and run off the lock (see `segments`): the MQTT network thread (`peek`, `ack`) never
waits on the disk.

A full disk (the file system, not the bound) is not an error to the producer: the oldest segments make
room as they would at the bound, and when nothing is left to drop the message is lost, but counted
(`dropped_disk`) with its `seq` used up, so that a subscriber sees the gap and `outbox.dropped` explains
it once there is room again (docs/mqtt.md, "A full disk").
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.transport.outbox.acks import Acks
from agent.transport.outbox.bound import FULL_LOG_INTERVAL, SEGMENT_MIN, Bound, segment_bytes
from agent.transport.outbox.reader import Reader
from agent.transport.outbox.record import Message, encode, encode_checkpoint
from agent.transport.outbox.recovery import recover
from agent.transport.outbox.segments import NoSpareError, SegmentFiles
from agent.transport.outbox.state import ACKED, Counters, StateFiles, lock_directory

log = logging.getLogger(__name__)

DIRNAME = "outbox"


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
    dropped_disk: int = 0
    disk_full: bool = False  # the last put found no room on the disk: messages are being lost
    memory_only: bool = False  # the disk had no room at start: kept in memory, lost on a reboot

    def as_dict(self) -> dict[str, int | float | None]:
        return dict(self.__dict__)


class DiskFullError(OSError):
    """No room on the disk for even the smallest segment at start; `seq` is every stream's last seq, so
    that an outbox elsewhere can go on numbering (agent.transport.outbox.fallback)."""

    def __init__(self, exc: OSError, seq: dict[str, int]) -> None:
        super().__init__(exc.errno, exc.strerror)
        self.seq = seq
        self.reason = str(exc)


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
        seq_floor: Mapping[str, int] | None = None,
        memory_only: bool = False,
    ) -> None:
        """`seq_floor`: numbers already used elsewhere (an outbox in memory): seq goes on above them.
        `memory_only`: this directory is in memory (reported in stats)."""
        self.dir = Path(path)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        if self.max_bytes < 4 * SEGMENT_MIN:
            raise ValueError(f"outbox max_bytes {self.max_bytes} is too small (at least {4 * SEGMENT_MIN // 1024}KiB)")
        self.max_age = float(max_age)
        self.fsync_interval = float(fsync_interval)
        self.segment_bytes = segment_bytes(self.max_bytes)
        self._clock = clock
        self._durable_id = 0  # fsync_interval 0: every message up to this id is on the device
        self._listeners: list[Callable[[], None]] = []
        self._dirty = False
        self._last_sync = time.monotonic()
        self._acked = 0
        self.disk_full = False
        self._last_full_log = float("-inf")
        self._state = StateFiles(self.dir)
        self._counters = Counters(self._state)
        self._acks = Acks(int(self._state.read_text(ACKED) or 0))
        self._lock_fd = lock_directory(self.dir)
        found = recover(self.dir)
        self._seq = found.seq
        for stream, seq in (seq_floor or {}).items():
            self._seq[stream] = max(self._seq.get(stream, 0), seq)
        self.memory_only = memory_only
        self._counters.merge(found.counters)
        self._counters.start_reporting()
        self._counters.save()  # its blocks taken now, for a full disk to overwrite in place (`state`)
        segments = found.segments
        self._reader = Reader(segments)
        self._files = files = SegmentFiles(self.dir, self.segment_bytes, segments, self._reader.forget)
        self._lock = files.lock
        self._bound = Bound(
            files, self._acks, self._state, self._counters, max_bytes=self.max_bytes, max_age=self.max_age
        )
        holding = [s for s in segments if not s.empty]
        if holding:
            # Segments before the first one left were acknowledged and deleted, perhaps after the last
            # write of the ack pointer.
            self._acks.ptr = max(self._acks.ptr, holding[0].first_id - 1)
        lost = found.lost(self._acks.ptr)
        if lost:
            log.warning("outbox: %d message(s) before a segment roll were lost in a power cut; going on", len(lost))
            self._acks.above.update(lost)
            self._acks.advance()
        self._next_id = max([self._acks.ptr] + [s.last_id for s in segments]) + 1
        for seg in [s for s in segments if s.empty and s.first_id > self._next_id]:
            files.delete(seg)  # started by a roll whose first records a power cut took: nothing in it
        try:
            self._start_segment()
        except OSError as exc:
            os.close(self._lock_fd)
            if exc.errno == errno.ENOSPC:
                raise DiskFullError(exc, dict(self._seq)) from None
            raise
        self._bound.release_acked()
        self.prune()
        files.settle()

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

        `seq` per stream (a pipeline's results, the events) is written inside the record that uses it.
        Returns (message id, first seq); seq is 0 without a stream.
        """
        files = self._files
        built: tuple[int, bytes] | None = None
        while True:
            with self._lock:
                self._check_open()
                first = self._seq.get(stream, 0) + 1 if stream is not None else 0
                last = first + count - 1 if stream is not None else 0
                if built is None or built[0] != first:
                    built = (first, build(first))
                msg_id = self._next_id
                now = self._clock()
                record = encode(msg_id, now, last, qos, retain, topic.encode(), (stream or "").encode(), built[1])
                if len(record) > self.max_bytes // 2:
                    raise ValueError(
                        f"a message of {len(record)} bytes does not fit an outbox of {self.max_bytes} bytes"
                    )
                try:
                    if self._bound.must_roll(len(record), now):
                        self._roll(len(record))
                    self._bound.make_room()
                except NoSpareError as exc:
                    need = exc.capacity  # allocated below, off the lock; then this put starts again
                else:
                    files.append(msg_id, now, record)
                    self._next_id += 1
                    if stream is not None:
                        self._seq[stream] = last
                    self._dirty = True
                    pending = files.pending()
                    refill = files.want_spare(self.max_bytes)
                    break
            try:
                files.prepare_spare(need, within=None)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if not self._make_room():
                    return 0, self._lose(stream, count, exc)
        self.disk_full = False
        if self.fsync_interval <= 0:
            self._flush_through(msg_id)
        for listener in self._listeners:
            listener()
        if pending and self.fsync_interval > 0:
            files.settle()
        if refill:
            try:
                files.prepare_spare(files.segment_bytes, within=self.max_bytes)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    log.warning("outbox: cannot preallocate the next segment ahead (%s); the roll will try again", exc)
        return msg_id, first

    def last_seq(self, stream: str) -> int:
        with self._lock:
            return self._seq.get(stream, 0)

    def last_seqs(self) -> dict[str, int]:
        """Every stream's last seq."""
        with self._lock:
            return dict(self._seq)

    def count_lost(self, count: int) -> None:
        """Messages kept elsewhere that are gone (an outbox in memory left by a run on a full disk)."""
        with self._lock:
            self._counters.add("dropped", count)
            self._counters.add("dropped_disk", count)

    def unreported_drops(self) -> tuple[int, int, int]:
        """Drops no `outbox.dropped` event has reported yet, this run's or an earlier one's (what was
        reported is kept with the counters): (count, of them for lack of disk room, total dropped)."""
        with self._lock:
            c = self._counters
            dropped = c.get("dropped")
            return dropped - c.get("reported"), c.get("dropped_disk") - c.get("reported_disk"), dropped

    def mark_reported(self, count: int, disk: int) -> None:
        """An event reporting `count` drops (`disk` of them for lack of room) is stored."""
        with self._lock:
            self._counters.add("reported", count)
            self._counters.add("reported_disk", disk)

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Called (outside the lock) after every put: the publisher wakes up on it."""
        self._listeners.append(callback)

    # ---- the publisher -----------------------------------------------------------------------

    def peek(self, after_id: int = 0, limit: int = 100) -> list[Message]:
        """Up to `limit` unacknowledged messages with an id above `after_id`, oldest first (ids rise by
        one per message)."""
        with self._lock:
            self._check_open()
            return self._reader.take(after_id, limit, self._acks)

    def ack(self, ids: Iterable[int], rejected: int = 0) -> int:
        """Mark messages acknowledged; returns how many were still waiting."""
        with self._lock:
            self._check_open()
            removed = self._acks.add(ids, self._next_id)
            if rejected:
                self._counters.add("rejected", rejected)
            self._acked += removed - rejected
            self._bound.release_acked()
            self._dirty = True
            return removed

    def prune(self) -> int:
        """Drop segments whose newest message is older than max_age; returns how many messages.

        On a full disk with no room to roll the active segment away, its expired messages are skipped in
        place (counted as `dropped_age`, never sent) and its file goes with the next roll."""
        files = self._files
        with self._lock:
            self._check_open()
            expired = self._bound.expired(files.segments[-1], self._clock() - self.max_age)
        no_room: OSError | None = None
        if expired:
            try:
                files.prepare_spare(files.segment_bytes, within=None)  # to roll the active segment away
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                no_room = exc
        with self._lock:
            self._check_open()
            cutoff = self._clock() - self.max_age
            dropped = self._bound.drop_expired(cutoff)
            active = files.segments[-1]
            if self._bound.expired(active, cutoff):
                try:
                    self._roll()
                except NoSpareError:
                    if no_room is not None:  # its messages go all the same; its file once there is room
                        dropped += self._bound.skip(active)
                    # else a producer took the spare first: the next prune rolls it
                else:
                    dropped += self._bound.drop(active)
            if dropped:
                self._bound.count_expired(dropped)
            pending = files.pending()
        if no_room is not None:
            self._warn_full(f"expired messages dropped in place, their segment kept until a roll ({no_room.strerror})")
        if pending:
            files.settle()
        return dropped

    def sync_if_due(self, force: bool = False) -> bool:
        """fsync the log and write the ack pointer when fsync_interval has passed (and something changed).

        The flush runs off the lock: producers and the network thread go on meanwhile.
        """
        with self._files.io_lock:
            return self._sync_held(force)

    # ---- reporting ---------------------------------------------------------------------------

    @property
    def last_id(self) -> int:
        """The id of the newest message put (0 when none yet)."""
        return self._next_id - 1

    @property
    def depth(self) -> int:
        return self._acks.waiting(self._next_id)

    @property
    def dropped(self) -> int:
        return self._counters.get("dropped")

    @property
    def bytes_written(self) -> int:
        """Everything this outbox wrote to its files, for the bench."""
        return self._files.written + self._state.written

    def stats(self) -> OutboxStats:
        with self._lock:
            oldest = None
            if self.depth and not self._files.closed:
                # The first message of the oldest segment still holding unacknowledged ones: exact when
                # the broker has been away, a little older than the truth while the head is draining.
                holding = next((s for s in self._files.segments if self._acks.unacked_in(s)), None)
                oldest = round(max(0.0, self._clock() - holding.oldest_ts), 3) if holding else None
            c = self._counters
            return OutboxStats(
                depth=self.depth,
                bytes=self._files.total,
                max_bytes=self.max_bytes,
                oldest_age_s=oldest,
                dropped=c.get("dropped"),
                dropped_full=c.get("dropped_full"),
                dropped_age=c.get("dropped_age"),
                rejected=c.get("rejected"),
                acked=self._acked,
                dropped_disk=c.get("dropped_disk"),
                disk_full=self.disk_full,
                memory_only=self.memory_only,
            )

    def disk_bytes(self) -> int:
        """What the outbox occupies on disk: every file in its directory, the active segment at its
        preallocated length."""
        return sum(p.stat().st_size for p in self.dir.iterdir() if p.is_file())

    def close(self) -> None:
        files = self._files
        with files.spare_lock, files.io_lock:
            with self._lock:
                if files.closed:
                    return
                self._dirty = True
            self._sync_held(force=True)
            with self._lock:
                self._counters.save()
                files.closed = True  # from here no thread writes to a segment
                self._reader.close()
            files.close(sync=self.fsync_interval > 0)
            os.close(self._lock_fd)  # also releases the lock

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals -----------------------------------------------------------------------------

    def _checkpoint(self) -> bytes:
        """The record that opens a segment: every seq and counter, so that numbers survive deletions."""
        return encode_checkpoint(self._clock(), self._seq, self._counters.values)

    def _start_segment(self) -> None:
        """The active segment at start: the last one resumed, or a new one; on a full disk after making
        room (`_make_room`), so that the agent starts whatever the disk holds."""
        files = self._files
        while True:
            last = files.segments[-1] if files.segments else None
            try:
                if last is not None and last.empty and last.first_id == self._next_id:
                    files.resume(last, self._checkpoint())
                else:
                    files.prepare_spare(files.segment_bytes, within=None)
                    self._roll()
                return
            except OSError as exc:
                if exc.errno != errno.ENOSPC or not self._make_room(keep_active=False):
                    raise

    def _make_room(self, *, keep_active: bool = True) -> bool:
        """On a full disk: preallocate smaller segments first (down to SEGMENT_MIN, for the rest of this
        run), then drop the oldest segment (counted as `dropped_disk`). False when neither is left."""
        files = self._files
        if files.segment_bytes > SEGMENT_MIN:
            files.segment_bytes = max(SEGMENT_MIN, files.segment_bytes // 8)
            self._warn_full(f"preallocating segments of {files.segment_bytes} bytes")
            return True
        with self._lock:
            if len(files.segments) <= (1 if keep_active else 0):
                return False
            dropped = self._bound.drop(files.segments[0])
            if dropped:
                self._counters.add("dropped", dropped)
                self._counters.add("dropped_disk", dropped)
        self._warn_full(f"dropped the oldest {dropped} message(s) to make room")
        files.settle()
        return True

    def _lose(self, stream: str | None, count: int, exc: OSError) -> int:
        """A message the disk has no room for: its seq is used up (the gap shows), it is counted, and
        `disk_full` says so until a later put finds room. Returns the first seq it would have had."""
        with self._lock:
            first = self._seq.get(stream, 0) + 1 if stream is not None else 0
            if stream is not None:
                self._seq[stream] = first + count - 1
            self._counters.add("dropped", 1)
            self._counters.add("dropped_disk", 1)
            self.disk_full = True
        self._warn_full(f"messages are lost and counted ({exc.strerror})")
        return first

    def _warn_full(self, what: str) -> None:
        now = time.monotonic()
        if now - self._last_full_log >= FULL_LOG_INTERVAL:
            self._last_full_log = now
            log.warning(
                "outbox %s: the disk is full; %s (%d dropped for lack of room so far)",
                self.dir,
                what,
                self._counters.get("dropped_disk"),
            )

    def _roll(self, need: int = 0) -> None:
        """Start the next segment (under the lock); NoSpareError without a spare ready."""
        self._files.roll(self._next_id, self._checkpoint(), need)

    def _sync_held(self, force: bool) -> bool:
        """sync_if_due's work, with io_lock held."""
        now = time.monotonic()
        with self._lock:
            if (
                self._files.closed
                or not self._dirty
                or (not force and now - self._last_sync < max(self.fsync_interval, 0.05))
            ):
                return False
            self._dirty = False
            self._last_sync = now
            self._state.write_text(ACKED, str(self._acks.ptr))  # a small file replaced by a rename: no flush
            work = self._files.take_write_back(active=self.fsync_interval > 0)
        try:
            self._files.write_back(work)
        except OSError:
            with self._lock:
                self._dirty = True
            raise
        return True

    def _flush_through(self, msg_id: int) -> None:
        """fsync_interval 0: return once every message up to `msg_id` is on the device. One flush serves
        every producer waiting for it; the network thread goes on meanwhile."""
        with self._files.io_lock:
            with self._lock:
                if self._files.closed or self._durable_id >= msg_id:
                    return
                target = self._next_id - 1
                work = self._files.take_write_back(active=True)
            self._files.write_back(work)
            with self._lock:
                self._durable_id = max(self._durable_id, target)

    def _check_open(self) -> None:
        if self._files.closed:
            raise RuntimeError(f"outbox {self.dir} is closed")
