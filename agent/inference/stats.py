"""What a pipeline reports about itself for health and the status page: counters, stage latency, state."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Literal, TypedDict

import numpy as np

TIMINGS_KEPT = 2048  # per-stage timings kept for percentiles

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
    )


class PipelineStats(Counts):
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


class Timings:
    """Recent durations per stage, for p50/p95 in health."""

    def __init__(self, stages: Iterable[str]) -> None:
        self._data: dict[str, deque[float]] = {s: deque(maxlen=TIMINGS_KEPT) for s in stages}

    def add(self, stage: str, ms: float) -> None:
        self._data[stage].append(ms)

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
