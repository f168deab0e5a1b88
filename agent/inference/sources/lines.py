"""Shared by the line-based sensor sources (csv, jsonl, serial): reading lines, parsing times, and the
policy for values that are not finite numbers (`invalid: reject|pass`, docs/sources.md).

Rows come from outside: a line is bounded in length, a time must be a real date, and NaN, infinity
and numbers beyond float range are refused by default with the value and line named, because a model
fed them answers with garbage nobody can trace back.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from datetime import timezone
from pathlib import Path

from agent.util.printable import quoted
from agent.util.timefmt import from_iso

FOLLOW_POLL_S = 0.1
MAX_LINE = 64 * 1024  # bytes; a sensor row is tens of bytes, a line beyond this is refused unread
MIN_EPOCH = -62135596800.0  # 0001-01-01T00:00:00Z and
MAX_EPOCH = 253402300799.0  # 9999-12-31T23:59:59Z: the times a result's `ts` can be written


def passes(path: Path, follow: bool, stop: threading.Event) -> Iterator[Iterator[tuple[int, str | None]]]:
    """The file's lines once; with `follow`, again from the top after each rotation or truncation. A
    missing file raises, so that the pipeline reports it and tries again with backoff."""
    while not stop.is_set():
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        yield read_lines(path, follow, stop)
        if not follow:
            return


def read_lines(path: Path, follow: bool, stop: threading.Event) -> Iterator[tuple[int, str | None]]:
    """(line number, text) of each complete line, text None for a line longer than MAX_LINE (read past
    without keeping it); with `follow`, wait for more like `tail -f`, and start again from the top when
    the file is truncated or replaced (log rotation)."""
    number = 0
    with open(path, "rb") as f:
        inode = Path(path).stat().st_ino
        partial = b""
        overlong = False
        while not stop.is_set():
            chunk = f.readline(MAX_LINE + 1 - len(partial))
            if chunk:
                partial += chunk
                if not partial.endswith(b"\n"):
                    if len(partial) > MAX_LINE:
                        overlong, partial = True, b""  # the rest of this line is read and dropped
                        continue
                    if follow:
                        continue  # the writer has not finished this line yet
                number += 1
                yield number, None if overlong else partial.decode("utf-8", "replace").rstrip("\r\n")
                partial, overlong = b"", False
                continue
            if not follow:
                if partial or overlong:
                    number += 1
                    yield number, None if overlong else partial.decode("utf-8", "replace").rstrip("\r\n")
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
        return _epoch(value)
    text = str(value).strip()[:64]
    try:
        return _epoch(float(text))
    except ValueError as exc:
        if "time" in str(exc):
            raise
    try:
        dt = from_iso(text)
    except ValueError:
        raise ValueError(f"time {text!r} is neither epoch seconds nor ISO 8601") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return _epoch(dt.timestamp())  # an offset can carry a date of year 9999 (or 1) out of range


def _epoch(value: float) -> float:
    """`value` as epoch seconds a result can carry (ValueError for NaN, infinity or beyond year 9999)."""
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf
    if not MIN_EPOCH <= seconds <= MAX_EPOCH:  # False for NaN as well
        raise ValueError(f"time {value!r} is not a date between year 1 and 9999")
    return seconds


def invalid_value(value: object, policy: str) -> str | None:
    """Why `value` (a parsed number) is not a finite float64 under `policy` ("reject" or "pass"), else None.

    Under "pass" only what float64 cannot hold at all (an integer beyond its range) is refused."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except OverflowError:
        return f"{quoted(value, 40)} is beyond the range of a float"
    if policy == "pass" or math.isfinite(number):
        return None
    return f"{quoted(value, 40)} is not a finite number (invalid: pass lets it through)"


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
