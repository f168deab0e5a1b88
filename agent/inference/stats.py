"""What a pipeline reports about itself for health and the status page: counters, stage latency, state."""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, TypedDict

import numpy as np

TIMINGS_KEPT = 2048  # per-stage timings kept for percentiles
# Upper bounds (ms) of the latency histogram per stage, from a 1 ms post-step to a 10 s model on a slow
# CPU; cumulative counts in these buckets add up across a fleet, which recent percentiles cannot.
LATENCY_BUCKETS_MS = (1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0)

PipelineState = Literal["created", "running", "stopped", "finished", "failed"]


class StageTimes(TypedDict):
    """Recent latency of one stage in ms; p50 and p95 are None before its first measure."""

    p50: float | None
    p95: float | None
    n: int


class Counts(TypedDict):
    """Monotonic counters, each written by one pipeline thread only."""

    frames: int
    skipped: int  # live frames between two `rate` slots
    rejected: int  # frames or samples the model cannot take
    inferences: int
    results: int
    inference_errors: int
    post_errors: int
    sink_errors: int
    source_errors: int
    swaps: int
    nan_outputs: int  # inferences with a NaN or an infinity in an output (probation rolls such a version back)


def zero_counts() -> Counts:
    return Counts(
        frames=0,
        skipped=0,
        rejected=0,
        inferences=0,
        results=0,
        inference_errors=0,
        post_errors=0,
        sink_errors=0,
        source_errors=0,
        swaps=0,
        nan_outputs=0,
    )


def has_nan(outputs: Mapping[str, object]) -> bool:
    """Does any floating-point tensor among a model's outputs hold a NaN or an infinity?"""
    return any(
        isinstance(v, np.ndarray) and v.dtype.kind in "fc" and not np.isfinite(v).all() for v in outputs.values()
    )


class MemoryShare(TypedDict):
    """A pipeline's share of the memory its model's shared session took, and how it was apportioned."""

    memory_mb: float | None
    memory_basis: str  # a session shared by n pipelines is split evenly between them


class PipelineStats(Counts, MemoryShare):
    """`Pipeline.stats()`: a snapshot for health, metrics and the status page."""

    pipeline: str
    state: PipelineState
    source: str
    model: str
    model_version: str
    provider: str
    dropped: int  # live frames a newer one replaced before preprocessing took them
    results_per_s: float
    inference_running_s: float
    latency_ms: dict[str, StageTimes]
    last_error: str | None


@dataclass(frozen=True)
class LatencyHistogram:
    """Every duration of one stage since the pipeline started: a count per bucket of LATENCY_BUCKETS_MS
    (one more for the durations above the last bound), and their sum in ms."""

    counts: tuple[int, ...]
    sum_ms: float

    @property
    def count(self) -> int:
        return sum(self.counts)


class Timings:
    """Durations per stage: the recent ones for p50/p95 in health, and all of them in a histogram."""

    def __init__(self, stages: Iterable[str]) -> None:
        self._data: dict[str, deque[float]] = {s: deque(maxlen=TIMINGS_KEPT) for s in stages}
        self._counts: dict[str, list[int]] = {s: [0] * (len(LATENCY_BUCKETS_MS) + 1) for s in self._data}
        self._sums: dict[str, float] = dict.fromkeys(self._data, 0.0)

    def add(self, stage: str, ms: float) -> None:
        self._data[stage].append(ms)
        # Each stage is written by one thread only; a reader may see its counts and sum one duration apart.
        self._counts[stage][bisect_left(LATENCY_BUCKETS_MS, ms)] += 1
        self._sums[stage] += ms

    def restart(self, stage: str) -> None:
        """Forget the recent durations of `stage` (the histogram keeps counting): its percentiles start afresh."""
        self._data[stage].clear()

    def histograms(self) -> dict[str, LatencyHistogram]:
        return {s: LatencyHistogram(tuple(self._counts[s]), self._sums[s]) for s in self._data}

    def snapshot(self) -> dict[str, StageTimes]:
        out: dict[str, StageTimes] = {}
        for stage, values in self._data.items():
            arr = np.fromiter(list(values), dtype=np.float64)
            if arr.size:
                p50, p95 = np.percentile(arr, [50, 95])
                out[stage] = {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "n": int(arr.size)}
            else:
                out[stage] = {"p50": None, "p95": None, "n": 0}
        return out


class RateMeter:
    """Results per second over the last `kept` results."""

    def __init__(self, kept: int = 256) -> None:
        self._times: deque[float] = deque(maxlen=kept)

    def mark(self, now: float) -> None:
        self._times.append(now)

    def rate(self) -> float:
        times = list(self._times)
        return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
