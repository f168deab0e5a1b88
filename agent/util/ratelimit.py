"""At most N events (and B bytes) in any window of one second, on an injectable clock.

A sliding window, not a token bucket: a bucket that refills at N per second and holds N lets 2N through
in one second (a full bucket, then its refill), which a broker that counts per second punishes. What is
recorded is never refused (`record`); `allow` asks first and records only when the window has room.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

WINDOW = 1.0


class RateLimit:
    """`count` events and `size` bytes per `window` seconds at most (None: no bound of that kind)."""

    def __init__(
        self,
        count: float | None,
        size: float | None = None,
        *,
        window: float = WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.count, self.size, self.window = count, size, window
        self._clock = clock
        self._sent: deque[tuple[float, int]] = deque()  # (when, bytes), oldest first
        self._bytes = 0
        self._lock = threading.Lock()

    def allow(self, nbytes: int = 0) -> bool:
        """Record one event of `nbytes` if the window has room for it; False (nothing recorded) if not."""
        with self._lock:
            now = self._expire()
            if self.count is not None and len(self._sent) + 1 > self.count:
                return False
            # One event larger than the whole byte budget still goes, alone in its window.
            if self.size is not None and self._sent and self._bytes + nbytes > self.size:
                return False
            self._add(now, nbytes)
            return True

    def record(self, nbytes: int = 0) -> None:
        """Record an event that is sent anyway (what `allow` then holds back for)."""
        with self._lock:
            self._add(self._expire(), nbytes)

    def _expire(self) -> float:
        now = self._clock()
        while self._sent and now - self._sent[0][0] >= self.window:
            self._bytes -= self._sent.popleft()[1]
        return now

    def _add(self, now: float, nbytes: int) -> None:
        self._sent.append((now, nbytes))
        self._bytes += nbytes
