"""The start's timeline: what each step on the way to the first result cost, logged at debug level.

`edge-agent run --log-level debug` prints one line per step, with the time since the process started
(the kernel's start time, so the interpreter's own start and the imports count too) and the step's
own cost; the first result ends the timeline with a summary line. Steps marked after that are the
parts that could wait (health, commands, updates) and are logged as such.
"""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger(__name__)


def process_start() -> float:
    """When this process started (epoch seconds, to the kernel's clock tick), or now when unknown.

    /proc/self/stat counts the start in ticks since boot; the time since boot comes from CLOCK_BOOTTIME
    (/proc/stat's `btime` is whole seconds: a second of error)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat(5), counted after the name
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - started
        return time.time() - max(0.0, age)
    except (OSError, ValueError, IndexError, AttributeError):  # no /proc, or no CLOCK_BOOTTIME (not Linux)
        return time.time()


class Timeline:
    """Steps since `origin`, each logged once as it happens; `first_result` closes the start."""

    def __init__(self, origin: float | None = None) -> None:
        self.origin = origin if origin is not None else process_start()
        self.steps: list[tuple[float, str]] = []  # (seconds since origin, what)
        self.first_result_s: float | None = None
        self._last = 0.0
        self._lock = threading.Lock()

    def mark(self, what: str) -> None:
        self._add(what, closes=False)

    def first_result(self, pipeline: str) -> None:
        """The first result of any pipeline: the end of the cold start (once per process)."""
        if self._add(f"first result ({pipeline})", closes=True):
            log.debug("start: first result %.3f s after the process started", self.first_result_s)

    def _add(self, what: str, closes: bool) -> bool:
        with self._lock:
            if closes and self.first_result_s is not None:
                return False
            after = " (after the first result)" if self.first_result_s is not None else ""
            at = time.time() - self.origin
            self.steps.append((at, what))
            step, self._last = at - self._last, at
            if closes:
                self.first_result_s = at
        log.debug("start +%.3f s (%+.3f s) %s%s", at, step, what, after)
        return True


START = Timeline()  # the process's own start
