"""The one progress bar: for a download (bytes, with a rate) and for work in phases (bench's steps).

On a terminal the bar is redrawn in place, at most ten times a second: a fast model or a fast link
would otherwise redraw thousands of times a second. On a pipe (systemd, CI, `2> log`) it writes a line
each time the phase or the quarter changes, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

DONE = "done"  # the phase a step producer names last (agent.device.autotune.measure does): it ends the line
WIDTH = 30
REDRAW_INTERVAL = 0.1


class ProgressBar:
    """Called as `bar(done, total)` (bytes, with `unit="MB"`) or `bar(done, total, phase)` (steps)."""

    def __init__(
        self,
        label: str,
        out: TextIO | None = None,
        *,
        unit: str | None = None,
        scale: float = 1e6,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.out = out if out is not None else sys.stderr
        self.tty = self.out.isatty()
        self.unit, self.scale = unit, scale
        self._clock = clock
        self._start = clock()
        self._drawn_at: float | None = None
        self._width = 0  # of the line on screen: a shorter one is padded to cover all of it
        self._logged: tuple[str, int] | None = None

    def __call__(self, done: int, total: int, phase: str = "") -> None:
        frac = min(done / total, 1.0) if total else 1.0
        final = done >= total and (self.unit is not None or phase == DONE)
        if self.tty:
            self._draw(done, total, frac, phase, final)
        else:
            self._log(total, frac, phase)

    def _draw(self, done: int, total: int, frac: float, phase: str, final: bool) -> None:
        now = self._clock()
        if not final and self._drawn_at is not None and now - self._drawn_at < REDRAW_INTERVAL:
            return
        self._drawn_at = now
        if self.unit is None:
            detail = f"{phase:.48}"
        else:
            rate = done / max(now - self._start, 1e-6)
            s, u = self.scale, self.unit
            detail = f"{done / s:.1f}/{total / s:.1f} {u} {rate / s:.1f} {u}/s"
        line = f"{self.label} [{'#' * int(frac * WIDTH):<{WIDTH}}] {frac:4.0%} {detail}"
        line = line.ljust(self._width)
        self.out.write("\r" + line + ("\n" if final else ""))
        self.out.flush()
        self._width = 0 if final else len(line)

    def _log(self, total: int, frac: float, phase: str) -> None:
        key = (phase.split(" ", 1)[0], int(frac * 4))  # warming/timing/..., and each quarter
        if key == self._logged:
            return
        self._logged = key
        detail = phase if self.unit is None else f"of {total / self.scale:.1f} {self.unit}"
        self.out.write(f"{self.label}: {frac:.0%} {detail}\n")
        self.out.flush()
