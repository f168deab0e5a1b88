"""Shared by the line-based sensor sources (csv, jsonl, serial): reading lines, parsing times."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

FOLLOW_POLL_S = 0.1


def passes(path: Path, follow: bool, stop: threading.Event) -> Iterator[Iterator[tuple[int, str]]]:
    """The file's lines once; with `follow`, again from the top after each rotation or truncation. A
    missing file raises, so that the pipeline reports it and tries again with backoff."""
    while not stop.is_set():
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        yield read_lines(path, follow, stop)
        if not follow:
            return


def read_lines(path: Path, follow: bool, stop: threading.Event) -> Iterator[tuple[int, str]]:
    """(line number, text) of each complete line; with `follow`, wait for more like `tail -f`, and
    start again from the top when the file is truncated or replaced (log rotation)."""
    number = 0
    with open(path, "rb") as f:
        inode = Path(path).stat().st_ino
        partial = b""
        while not stop.is_set():
            chunk = f.readline()
            if chunk:
                partial += chunk
                if not partial.endswith(b"\n") and follow:
                    continue  # the writer has not finished this line yet
                number += 1
                text, partial = partial.decode("utf-8", "replace").rstrip("\r\n"), b""
                yield number, text
                continue
            if not follow:
                if partial:
                    number += 1
                    yield number, partial.decode("utf-8", "replace").rstrip("\r\n")
                return
            try:
                st = Path(path).stat()
            except FileNotFoundError:
                st = None
            if st is not None and (st.st_ino != inode or st.st_size < f.tell()):
                return  # rotated or truncated: the caller reopens from the top
            stop.wait(FOLLOW_POLL_S)


def parse_time(value: object) -> float:
    """Epoch seconds from a number or an ISO 8601 string (a trailing Z means UTC; naive means UTC)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def now() -> float:
    return time.time()


class Offsets:
    """`t` of each row: seconds since the first row's own timestamp, None for rows stamped on arrival."""

    def __init__(self, timed: bool) -> None:
        self.timed = timed
        self.first: float | None = None

    def __call__(self, ts: float) -> float | None:
        if not self.timed:
            return None
        if self.first is None:
            self.first = ts
        return ts - self.first
