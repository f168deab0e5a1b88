"""This process's resident memory, read from /proc/self/statm as psutil reads it on Linux.

Not psutil itself: a model's load measures the memory its session takes (`agent.inference.sessions`), on
the way to a start's first result, where psutil's import costs 13 ms (issue 15); health reports the same
figure, so both read it here.
"""

from __future__ import annotations

import os

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int | None:
    """Resident bytes now; None where the kernel has no /proc (not Linux) or the file reads oddly."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read(256).split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None
