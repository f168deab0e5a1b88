"""The outbox's segment files: the active one (preallocated, written through a shared mapping), the
spare preallocated ahead, and the rolled and deleted ones, finished off the lock.

The active segment is preallocated (fallocate: a full disk is an error at segment start, never a
SIGBUS) and written through a shared memory mapping, which needs no system call per record. The next
segment is preallocated ahead under a hidden name (`.spare-N`), when the active one is half full, on the
producer's thread outside the lock; a roll only renames it in, and the finished segment is cut to its
length and fsynced after the lock is released. Deleted segments' files (acknowledged or dropped) are
removed off the lock too, by the next flush or put: an unlink can wait on the file system's journal.

Locks: `lock` guards the state in memory and is never held across a flush or an allocation, so the
MQTT network thread never waits on the disk. `io_lock` is held by whoever flushes, finishes rolled
segments or removes files (their descriptors outlive the lock); `spare_lock` by whoever prepares the
spare. Order: spare_lock, then io_lock, then lock.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from agent.util.files import fsync_path

# Room kept under the bound for the small files beside the segments (acked, counters.json).
RESERVE = 16 * 1024  # also covers block rounding of the segment files


@dataclass
class Segment:
    path: Path
    first_id: int  # the first message id this segment may hold
    last_id: int = 0  # the last message id written to it (0: none yet)
    size: int = 0
    newest_ts: float = 0.0
    oldest_ts: float = 0.0
    fd: int | None = None  # the active segment (and a rolled one until `finish`) is open for writing
    map: mmap.mmap | None = None  # ... through this shared mapping of its preallocated length
    capacity: int = 0
    dead: bool = False  # deleted or replaced after its roll: closed without being cut or flushed

    @property
    def empty(self) -> bool:
        return self.last_id < self.first_id


class NoSpareError(Exception):
    """A roll found no preallocated segment of `capacity` bytes ready; raised before anything changed."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.capacity = capacity


class WriteBack(NamedTuple):
    """What one flush covers, taken under the lock so that no other flush does it again."""

    retired: list[Segment]
    active_fd: int | None
    dir_dirty: bool
    unlink: list[Path]


def segment_path(directory: Path, first_id: int) -> Path:
    return directory / f"seg-{first_id:020d}.log"


def reserve(fd: int, capacity: int, directory: Path) -> None:
    # Blocks are allocated now, not as records land: on a full disk a store into a sparse mapping
    # is SIGBUS (the process dies), where fallocate is an OSError here.
    try:
        os.posix_fallocate(fd, 0, capacity)
    except OSError as exc:
        raise OSError(
            exc.errno, f"outbox {directory}: cannot reserve {capacity} bytes for a segment: {exc.strerror}"
        ) from None


def finish(seg: Segment, sync: bool) -> None:
    """Close a segment that takes no more records: cut the preallocated tail, flush, close.

    Off the lock (with io_lock held): nothing writes to it any more, and only this closes it.
    """
    if seg.map is not None:
        seg.map.close()
        seg.map = None
    if seg.fd is None:
        return
    try:
        if not seg.dead:
            os.ftruncate(seg.fd, seg.size)
            if sync:
                os.fsync(seg.fd)
    finally:
        os.close(seg.fd)
        seg.fd = None
        seg.capacity = 0


class SegmentFiles:
    """The segment files of one outbox directory, oldest first (the last one is active), and their locks."""

    def __init__(
        self, directory: Path, segment_bytes: int, segments: list[Segment], forget: Callable[[Segment], None]
    ) -> None:
        self.dir = directory
        self.segment_bytes = segment_bytes
        self.segments = segments
        self.forget = forget  # the reader lets go of a segment that is deleted or replaced
        self.lock = threading.RLock()  # the state in memory: never held across a flush or an allocation
        self.io_lock = threading.Lock()
        self.spare_lock = threading.Lock()
        self.total = sum(s.size for s in segments)  # bytes in segment files, kept up to date
        self.written = 0  # everything written to segment files, for the bench
        self.spare: Segment | None = None  # the next segment, preallocated ahead under a hidden name
        self.spare_busy = False  # a producer is preparing one
        self._spare_n = 0
        self.retired: list[Segment] = []  # rolled segments still to be cut, flushed and closed
        self.unlink: list[Path] = []  # files of deleted segments, removed off the lock (the journal can stall)
        self.dir_dirty = True
        self.closed = False  # from then on no thread writes to a segment

    # ---- under the lock ----------------------------------------------------------------------

    def append(self, msg_id: int, ts: float, record: bytes) -> None:
        seg = self.segments[-1]
        assert seg.map is not None
        # A store into a shared file mapping: in the page cache, so it outlives this process like
        # write(2) would, without a system call (measured: write(2) per result cost a fifth of the
        # throughput, mostly in handing the interpreter lock to the network thread and back).
        seg.map[seg.size : seg.size + len(record)] = record
        seg.size += len(record)
        self.total += len(record)
        self.written += len(record)
        if seg.empty:
            seg.oldest_ts = ts
        seg.last_id, seg.newest_ts = msg_id, ts

    def resume(self, seg: Segment, record: bytes) -> None:
        """Go on in the last segment after a restart with nothing written since it started (opened by
        `record`, a checkpoint). At start-up, before any other thread has this outbox, so it allocates
        here."""
        capacity = max(self.segment_bytes, seg.size + len(record))
        fd = os.open(seg.path, os.O_RDWR)
        try:
            reserve(fd, capacity, self.dir)
        except OSError:
            os.close(fd)
            raise
        seg.fd, seg.capacity, seg.map = fd, capacity, mmap.mmap(fd, capacity)
        seg.map[seg.size : seg.size + len(record)] = record
        seg.size += len(record)
        self.total += len(record)
        self.written += len(record)

    def roll(self, first_id: int, record: bytes, need: int = 0) -> None:
        """Make the spare the active segment, for ids from `first_id`, opened by `record` (a checkpoint).

        Under the lock this is memory and a rename: the old segment is retired, to be cut and flushed by
        `finish` off the lock. Without a spare of the size needed, raises NoSpareError before any change.
        """
        spare = self.spare
        if spare is None or spare.fd is None or spare.capacity < max(self.segment_bytes, len(record) + need):
            raise NoSpareError(max(self.segment_bytes, len(record) + need))
        os.pwrite(spare.fd, record, 0)  # into the page cache, like the records
        self.spare = None
        path = segment_path(self.dir, first_id)
        if self.segments:
            old = self.segments[-1]
            if old.fd is not None:
                self.retired.append(old)
            if old.path == path:
                # No message since it started, and a record larger than its room: the new file takes
                # its name (and its checkpoint's place).
                old.dead = True
                self.segments.pop()
                self.total -= old.size
                self.forget(old)
        os.rename(spare.path, path)
        seg = Segment(path, first_id, size=len(record), fd=spare.fd, capacity=spare.capacity)
        seg.map = mmap.mmap(spare.fd, spare.capacity)
        self.segments.append(seg)
        self.written += len(record)
        self.total += len(record)
        self.dir_dirty = True

    def delete(self, seg: Segment) -> None:
        """Delete a segment that is not the active one. Its file goes off the lock, with the next flush or
        put (a rolled segment still open is closed by `finish`): new segments take higher names."""
        if seg in self.retired:
            seg.dead = True
        self.forget(seg)
        self.unlink.append(seg.path)
        self.segments.remove(seg)
        self.total -= seg.size
        self.dir_dirty = True

    def want_spare(self, limit: int) -> bool:
        """Whether this put should preallocate the next segment (off the lock): the active one is half
        full, no spare is ready or on its way, and one fits under `limit`. Marks it on its way."""
        active = self.segments[-1]
        if self.spare is not None or self.spare_busy or active.size * 2 < active.capacity:
            return False
        if self.disk_estimate() + self.segment_bytes > limit:
            return False  # a full outbox allocates at the roll, after dropping the oldest segment
        self.spare_busy = True
        return True

    def disk_estimate(self) -> int:
        """The directory's size as the bound counts it: closed segments by length, the active one and
        the spare by their preallocated capacity, and the reserve for the small files."""
        active = self.segments[-1]
        spare = self.spare.capacity if self.spare is not None else 0
        return self.total - active.size + active.capacity + spare + RESERVE

    def drop_spare(self) -> None:
        """The spare goes (under the bound it goes before any message does)."""
        if self.spare is not None:
            self.discard(self.spare)
            self.spare = None

    def discard(self, spare: Segment) -> None:
        """Let a spare go: it holds nothing to flush; its file is removed with the deleted segments'."""
        if spare.fd is not None:
            os.close(spare.fd)
            spare.fd = None
        self.unlink.append(spare.path)

    def pending(self) -> bool:
        """Rolled segments to finish or files to remove: work for `settle`, off the lock."""
        return bool(self.retired or self.unlink)

    def take_write_back(self, *, active: bool) -> WriteBack:
        """What one flush covers (with the active segment's data when `active`), taken so that no other
        flush does it again. The descriptors stay open until `write_back`: only a holder of io_lock
        closes them."""
        retired, self.retired = self.retired, []
        unlink, self.unlink = self.unlink, []
        dir_dirty, self.dir_dirty = self.dir_dirty, False
        return WriteBack(retired, self.segments[-1].fd if active else None, dir_dirty, unlink)

    # ---- off the lock ------------------------------------------------------------------------

    def prepare_spare(self, capacity: int, *, within: int | None) -> None:
        """Preallocate the spare segment (hidden name, no content) off the lock, unless one is ready.

        `within`: only if the directory stays within that many bytes; None for a roll that needs it now
        (which then drops the oldest).
        """
        with self.spare_lock:
            try:
                with self.lock:
                    spare = self.spare
                    if self.closed or (spare is not None and spare.capacity >= capacity):
                        return
                    if within is not None and self.disk_estimate() + capacity > within:
                        return
                    self.spare = None  # out while it grows: a roll meanwhile waits on spare_lock
                if spare is None:
                    self._spare_n += 1
                    path = self.dir / f".spare-{self._spare_n}"
                    spare = Segment(path, 0, fd=os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600))
                assert spare.fd is not None
                try:
                    reserve(spare.fd, capacity, self.dir)
                except OSError:
                    self.discard(spare)
                    spare.path.unlink(missing_ok=True)
                    raise
                spare.capacity = capacity
                with self.lock:
                    self.spare = spare  # (close waits for spare_lock: still open)
            finally:
                with self.lock:
                    self.spare_busy = False

    def write_back(self, work: WriteBack) -> None:
        """With io_lock held, not the lock: the rolled segments, the deleted files, the active one's
        data, the directory."""
        for path in work.unlink:
            path.unlink(missing_ok=True)
        try:
            error: OSError | None = None
            for seg in work.retired:
                try:
                    finish(seg, sync=not seg.dead)
                except OSError as exc:
                    error = error or exc
            if error is not None:
                raise error
            if work.active_fd is not None:
                # fdatasync, not mmap.flush: msync would hold the interpreter lock for the whole flush.
                os.fdatasync(work.active_fd)
            if work.dir_dirty:
                fsync_path(self.dir)
        except OSError:
            if work.dir_dirty:
                with self.lock:
                    self.dir_dirty = True
            raise

    def settle(self) -> None:
        """Off the lock, on the producer's (or maintenance) thread: finish the rolled segments (cut,
        flush, close) and remove the deleted files, so that the disk holds what the bound counts."""
        with self.io_lock:
            with self.lock:
                retired, self.retired = self.retired, []
                unlink, self.unlink = self.unlink, []
            self.write_back(WriteBack(retired, None, False, unlink))

    def close(self, *, sync: bool) -> None:
        """Finish every open segment and let the spare go; `closed` is set, spare_lock and io_lock held."""
        with self.lock:
            closing = self.retired + [s for s in self.segments if s.fd is not None]
            self.retired = []
            spare, self.spare = self.spare, None
        for seg in closing:
            finish(seg, sync=sync)
        if spare is not None:
            self.discard(spare)
        for path in self.unlink:
            path.unlink(missing_ok=True)
        self.unlink = []
