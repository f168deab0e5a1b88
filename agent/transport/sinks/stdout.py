"""Results as JSON lines on stdout: how a user tries a model before any broker exists.

`seq` is per pipeline, monotonic, and survives restarts: the last value handed out is written to
`<state_dir>/seq/<pipeline>` on every result, through a memory mapping of the file (a kill -9 loses nothing;
a power cut may lose what the page cache held, so the file is fsynced every `FSYNC_EVERY` results and on
close).
Events go to the log on stderr so that stdout holds only results, with their fields as the wire contract
serializes them (`Event.payload()`).
"""

from __future__ import annotations

import io
import json
import mmap
import os
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

from agent.transport.events import Event

FSYNC_EVERY = 1000
_WIDTH = 20  # digits in the seq file: fixed width, so each value replaces the last in place
_SIZE = _WIDTH + 1  # and a newline


class SeqCounter:
    """A per-pipeline counter persisted in one small file, written through a shared memory mapping as the
    outbox writes its records (agent.transport.outbox.segments): a store into the page cache, no system
    call. A pwrite per result let go of the interpreter lock and waited to take it back from the
    pipeline's other stages: sensor results went from 15,000/s to 22,000/s without it
    (bench/bench_pipeline.py). A kill -9 loses nothing: the page is the kernel's."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            raw = os.pread(self.fd, 64, 0).strip()
            self.value = int(raw) if raw.isdigit() else 0  # the last seq handed out; the next is value + 1
            os.ftruncate(self.fd, _SIZE)  # no longer than the mapping: a longer tail would be read back
            # Blocks allocated now: a full disk is an OSError here, never a SIGBUS at a store.
            os.posix_fallocate(self.fd, 0, _SIZE)
            os.pwrite(self.fd, b"%0*d\n" % (_WIDTH, self.value), 0)
            self._map = mmap.mmap(self.fd, _SIZE)
        except BaseException:
            os.close(self.fd)
            raise
        self._since_sync = 0

    def next(self) -> int:
        self.value += 1
        # The digits land front to back: a store cut short reads back between the old value and this one,
        # whose result is not out yet, so a restart never hands out a seq twice.
        self._map[:_WIDTH] = b"%0*d" % (_WIDTH, self.value)
        self._since_sync += 1
        if self._since_sync >= FSYNC_EVERY:
            os.fsync(self.fd)  # not mmap.flush: msync holds the interpreter lock throughout
            self._since_sync = 0
        return self.value

    def close(self) -> None:
        try:
            self._map.close()
            os.fsync(self.fd)
        finally:
            os.close(self.fd)


class StdoutSink:
    """The `Sink` used when the profile has no mqtt section."""

    def __init__(self, state_dir: Path, stream: TextIO | None = None) -> None:
        self.seq_dir = Path(state_dir) / "seq"
        self.stream = stream if stream is not None else sys.stdout
        self._counters: dict[str, SeqCounter] = {}
        self._lock = threading.Lock()
        self.broken = threading.Event()

    def _silence(self) -> None:
        """Point stdout at /dev/null so that the interpreter's last flush does not fail again."""
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, io.UnsupportedOperation):
            pass

    def result(self, pipeline: str, payload: dict[str, Any], qos: int) -> None:
        with self._lock:
            counter = self._counters.get(pipeline)
            if counter is None:
                counter = self._counters[pipeline] = SeqCounter(self.seq_dir / pipeline)
            seq = counter.next()
            # seq right after the pipeline's name, as in the documented result.
            line = {"device": payload.get("device"), "pipeline": pipeline, "seq": seq, **payload}
            try:
                self.stream.write(json.dumps(line, separators=(",", ":"), default=_plain) + "\n")
                self.stream.flush()
            except BrokenPipeError:
                # The reader went away (`edge-agent run ... | head`): nothing more can be delivered.
                self.broken.set()
                self._silence()
                raise

    def event(self, event: Event) -> None:
        """Nothing to do: stdout carries results only, and the daemon logs every event it emits."""

    def close(self) -> None:
        with self._lock:
            for counter in self._counters.values():
                counter.close()
            self._counters.clear()
            try:
                self.stream.flush()
            except (OSError, ValueError):
                pass


def _plain(value: Any) -> Any:
    """numpy values a post-processor plug-in left in its output, as plain JSON."""
    from agent.inference.processing.jsonvalues import to_json

    converted = to_json(value, None)
    if converted is value:
        raise TypeError(f"{type(value).__name__} is not JSON serialisable")
    return converted
