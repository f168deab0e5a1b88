"""Durations and sizes as people write them in profiles (`30s`, `5min`, `64MiB`).

Both parse to plain numbers (seconds as float, bytes as int) so that code past the profile never sees
a unit string again.
"""

from __future__ import annotations

import re
from typing import Annotated

from agent.config.base import Check, JsonSchema

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_NUMBER_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")

# Bounds that keep every duration a valid thread wait and every size a sane count (threading refuses
# waits beyond ~292 years with OverflowError, deep in a worker thread).
MAX_DURATION = 100 * 365 * 86400.0
MAX_SIZE = 1 << 50

DURATION_PATTERN = r"^\s*\d+(\.\d+)?\s*(ms|s|sec|m|min|h|d)?\s*$"
SIZE_PATTERN = r"^\s*\d+(\.\d+)?\s*([kKmMgGtT]i?[bB]|[bB])?\s*$"


def parse_duration(value: object) -> float:
    """Seconds from a number (seconds) or a string such as `250ms`, `30s`, `5min`, `2h`, `7d`."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s or 5min")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _NUMBER_UNIT.match(str(value))
        unit = match.group(2).lower() if match else None
        if not match or (unit and unit not in _DURATION_UNITS):
            raise ValueError("expected a duration like 30s or 5min")
        seconds = float(match.group(1)) * _DURATION_UNITS.get(unit or "s", 1.0)
    if not 0 <= seconds <= MAX_DURATION:  # NaN fails too
        raise ValueError("expected a duration >= 0" if seconds < 0 else "expected a duration up to 100 years")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from an integer or a string such as `64MiB`, `1GB`, `512kib`."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 64MiB or 1GB")
    if isinstance(value, (int, float)):
        if not 0 <= value <= MAX_SIZE:  # before int(): infinity would raise OverflowError
            raise ValueError("expected a size >= 0" if value < 0 else "expected a size up to 1 PiB")
        size = int(value)
    else:
        match = _NUMBER_UNIT.match(str(value))
        unit = match.group(2).lower() if match else None
        if not match or (unit and unit not in _SIZE_UNITS):
            raise ValueError("expected a size like 64MiB or 1GB")
        size_f = float(match.group(1)) * _SIZE_UNITS.get(unit or "b", 1)
        if size_f > MAX_SIZE:
            raise ValueError("expected a size up to 1 PiB")
        size = int(size_f)
    if size < 0:
        raise ValueError("expected a size >= 0")
    return size


def format_duration(seconds: float) -> str:
    """The shortest exact spelling, for reports and the effective profile."""
    for unit, factor in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= factor and seconds % factor == 0:
            return f"{int(seconds // factor)}{unit}"
    return f"{seconds * 1000:g}ms"


def format_size(size: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


Duration = Annotated[
    float,
    Check(parse_duration, mode="before"),
    JsonSchema(
        {
            "anyOf": [{"type": "number", "minimum": 0}, {"type": "string", "pattern": DURATION_PATTERN}],
            "description": "seconds, or a number with a unit: ms, s, min, h, d (e.g. 30s, 5min)",
        }
    ),
]
Size = Annotated[
    int,
    Check(parse_size, mode="before"),
    JsonSchema(
        {
            "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": SIZE_PATTERN}],
            "description": "bytes, or a number with a unit: KB, MB, GB, KiB, MiB, GiB (e.g. 256MiB)",
        }
    ),
]
