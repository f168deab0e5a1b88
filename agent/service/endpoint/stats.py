"""What the endpoint counts for `/metrics`: inference requests by model and HTTP status, and the
durations of the answered ones, in the pipelines' latency buckets."""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass

from agent.inference.stats import LATENCY_BUCKETS_MS, LatencyHistogram

# Requests for a model the endpoint does not serve share one label value: a client must not be able to
# create a series per name it makes up.
UNKNOWN_MODEL = ""


@dataclass(frozen=True)
class EndpointFigures:
    """A snapshot: (model, status code) -> requests, and per model the successful requests' durations."""

    requests: Mapping[tuple[str, str], int]
    latency: Mapping[str, LatencyHistogram]


class EndpointStats:
    """Thread-safe counters, written by the endpoint's request threads and read by a scrape."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str], int] = {}
        self._counts: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}

    def record(self, model: str, status: int, ms: float | None) -> None:
        """One inference request answered with `status`; `ms` for the ones that ran."""
        with self._lock:
            key = (model, str(status))
            self._requests[key] = self._requests.get(key, 0) + 1
            if ms is not None:
                counts = self._counts.setdefault(model, [0] * (len(LATENCY_BUCKETS_MS) + 1))
                counts[bisect_left(LATENCY_BUCKETS_MS, ms)] += 1
                self._sums[model] = self._sums.get(model, 0.0) + ms

    def figures(self) -> EndpointFigures:
        with self._lock:
            return EndpointFigures(
                requests=dict(self._requests),
                latency={m: LatencyHistogram(tuple(c), self._sums[m]) for m, c in self._counts.items()},
            )
