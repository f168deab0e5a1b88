"""Capped exponential backoff with "equal jitter", for every reconnect and retry.

The delay for attempt n is uniform(0.5, 1.0) x min(cap, first x 2^n): the random half keeps a fleet that
lost its broker or registry at once from coming back at once, the fixed half keeps a floor so that a
peer that fails at once is not hammered.
"""

from __future__ import annotations

import random
from collections.abc import Callable


def delay(attempt: int, first: float, cap: float, rng: Callable[[], float] = random.random) -> float:
    """The wait before retry number `attempt` (0-based)."""
    return min(cap, first * (2.0 ** min(attempt, 30))) * (0.5 + 0.5 * rng())


class Backoff:
    """The attempt counter for one peer: `next_delay()` after each failure, `reset()` after a success."""

    def __init__(self, cap: float = 30.0, first: float = 0.5, rng: Callable[[], float] = random.random) -> None:
        self.cap = cap
        self.first = first
        self.attempt = 0
        self._rng = rng

    def next_delay(self) -> float:
        wait = delay(self.attempt, self.first, self.cap, self._rng)
        self.attempt += 1
        return wait

    def reset(self) -> None:
        self.attempt = 0
