"""Timestamps as every payload writes them: UTC ISO 8601 with milliseconds."""

from __future__ import annotations

import time
from datetime import datetime, timezone

# The formatted second of the last call: results come many per second, strftime is the costly part.
_cache: tuple[int, str] = (-1, "")


def utc_iso(ts: float) -> str:
    """Seconds since the epoch as `2026-11-25T10:31:02.417Z` (rounded to the millisecond)."""
    global _cache
    secs, ms = divmod(int(round(ts * 1000)), 1000)
    cached_secs, text = _cache  # one tuple read: safe across threads
    if cached_secs != secs:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
        _cache = (secs, text)
    return f"{text}.{ms:03d}Z"


def from_iso(text: str) -> datetime:
    """An ISO 8601 time as written (naive when it names no offset); ValueError when it is not one. Python
    3.10's `fromisoformat` does not read the `Z` that `utc_iso` writes, hence the replace."""
    return datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)


def parse_utc_iso(text: str) -> datetime | None:
    """The time a payload's stamp names (`Z`, an offset, or none for UTC); None when it is not ISO 8601."""
    try:
        value = from_iso(text)
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
