"""The small files beside the outbox's segments: the ack pointer (`acked`), the drop counters
(`counters.json`) and the lock that keeps the directory to one process.

Each file is replaced whole by a rename: no flush of its own (the segments' flush covers the
directory). counters.json is padded to a fixed size, so that on a disk without a free block for the
new copy it is overwritten in place, in the blocks it already has: the drops a run counts on a full
disk outlive its end, to be reported after the restart.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path

COUNTERS = "counters.json"
ACKED = "acked"
COUNTERS_SLOT = 512  # counters.json's size (padded with spaces): one sector, overwritten in place when full


def lock_directory(directory: Path) -> int:
    """Hold the directory's lock file for this process (the kernel lets go when it dies); its descriptor."""
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(
            f"outbox {directory} is in use by another process (two agents with one state_dir?)"
        ) from None
    return fd


class StateFiles:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.written = 0  # everything written to these files, for the bench

    def read_text(self, name: str) -> str | None:
        try:
            return (self.dir / name).read_text().strip()
        except (OSError, ValueError):
            return None

    def read_json(self, name: str) -> dict[str, int]:
        text = self.read_text(name)
        try:
            data = json.loads(text) if text else {}
        except ValueError:
            data = {}
        return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def write_text(self, name: str, text: str) -> None:
        """Replace a small state file. On a full disk a file of the same size is overwritten in place;
        otherwise the old one stays (a stale ack pointer or count is safe: recovery reads both back from
        the segments' checkpoints too) and the next write tries again."""
        tmp = self.dir / f".{name}.tmp"
        try:
            tmp.write_text(text)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            tmp.unlink(missing_ok=True)
            self._overwrite(name, text.encode())
            return
        self.written += len(text)
        os.replace(tmp, self.dir / name)

    def write_json(self, name: str, data: dict[str, int]) -> None:
        text = json.dumps(data)
        self.write_text(name, text.ljust(-(-len(text) // COUNTERS_SLOT) * COUNTERS_SLOT))

    def _overwrite(self, name: str, data: bytes) -> None:
        """Write `data` over a file of exactly its size, in the blocks it has (one write of at most a
        sector or two: a crash leaves the old or the new content)."""
        try:
            fd = os.open(self.dir / name, os.O_WRONLY)
        except OSError:
            return
        try:
            if os.fstat(fd).st_size == len(data):
                os.pwrite(fd, data, 0)
                self.written += len(data)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
        finally:
            os.close(fd)


class Counters:
    """What the outbox dropped or the broker rejected: `dropped`, `dropped_full`, `dropped_age`,
    `dropped_disk` (messages the disk had no room for), `rejected`; and how many drops an `outbox.dropped`
    event has reported (`reported`, `reported_disk`), so that drops a run could not report (the disk was
    full until it ended) are reported after the restart. Kept in counters.json, and in every segment's
    checkpoint."""

    def __init__(self, files: StateFiles) -> None:
        self.files = files
        self.values = files.read_json(COUNTERS)

    def get(self, name: str) -> int:
        return int(self.values.get(name, 0))

    def add(self, name: str, n: int) -> None:
        self.values[name] = self.get(name) + n
        self.save()

    def merge(self, found: dict[str, int]) -> None:
        """Counts read back from checkpoints: the higher of each wins."""
        for name, value in found.items():
            self.values[name] = max(self.values.get(name, 0), value)

    def start_reporting(self) -> None:
        """Counters from before `reported` was kept count as reported: an upgrade does not announce every
        drop a device ever had."""
        if "reported" not in self.values:
            self.values["reported"] = self.get("dropped")
            self.values["reported_disk"] = self.get("dropped_disk")

    def save(self) -> None:
        self.files.write_json(COUNTERS, self.values)
