"""The small files beside the outbox's segments: the ack pointer (`acked`), the drop counters
(`counters.json`) and the lock that keeps the directory to one process.

Each file is replaced whole by a rename: no flush of its own (the segments' flush covers the
directory).
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

COUNTERS = "counters.json"
ACKED = "acked"


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
        tmp = self.dir / f".{name}.tmp"
        tmp.write_text(text)
        self.written += len(text)
        os.replace(tmp, self.dir / name)

    def write_json(self, name: str, data: dict[str, int]) -> None:
        self.write_text(name, json.dumps(data))


class Counters:
    """What the outbox dropped or the broker rejected: `dropped`, `dropped_full`, `dropped_age`,
    `rejected`. Kept in counters.json, and in every segment's checkpoint."""

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

    def save(self) -> None:
        self.files.write_json(COUNTERS, self.values)
