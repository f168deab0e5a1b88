"""Probation: a new version is watched against the one it replaced, and rolled back when it does worse.

Judged from the counters of the pipelines that serve it, counted from the swap: the share of failed
inferences, the share of inferences with a NaN or an infinity in an output (each against
`max_error_rate`), and the inference p95 against the previous version's. Each version's latency window
starts at its swap (`agent.inference.stats.Timings.restart`), so the baseline is the previous version's
own p95 and never a window that mixes versions.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.config.profile import ProbationConfig
    from agent.inference.stats import PipelineStats

MIN_RUNS = 5  # inferences before a share of failures means anything


@dataclass(frozen=True)
class Marks:
    """A pipeline's counters at the swap, so that only the new version's inferences are judged."""

    inferences: int
    errors: int
    nan: int

    @staticmethod
    def of(stats: PipelineStats) -> Marks:
        return Marks(stats["inferences"], stats["inference_errors"], stats["nan_outputs"])


@dataclass(frozen=True)
class Probation:
    model: str
    version: str
    previous: str | None
    until: float  # time.monotonic() when it may pass
    baseline_p95: float | None  # the previous version's own inference p95, ms
    marks: dict[str, Marks]  # pipeline -> counters at the swap
    order: str | None = None  # the deployment order that brought the version

    @staticmethod
    def begin(
        model: str,
        version: str,
        previous: str | None,
        duration: float,
        stats: Mapping[str, PipelineStats],
        order: str | None,
    ) -> Probation:
        """Taken just before the swap: the previous version's p95 and every pipeline's counters."""
        marks = {name: Marks.of(s) for name, s in stats.items()}
        return Probation(model, version, previous, time.monotonic() + duration, p95(stats), marks, order)

    def verdict(self, stats: Mapping[str, PipelineStats], limits: ProbationConfig) -> tuple[str | None, bool]:
        """(why the version fails, or None; whether it has run enough to pass once its time is up)."""
        runs_total = 0
        for name, s in stats.items():
            mark = self.marks.get(name, Marks(0, 0, 0))
            runs, errors, nan = (
                s["inferences"] - mark.inferences,
                s["inference_errors"] - mark.errors,
                s["nan_outputs"] - mark.nan,
            )
            runs_total += runs
            tried = runs + errors
            if tried >= MIN_RUNS and errors / tried > limits.max_error_rate:
                return f"pipeline {name}: error rate {errors / tried:.0%} is above {limits.max_error_rate:.0%}", True
            if runs >= MIN_RUNS and nan / runs > limits.max_error_rate:
                return (
                    f"pipeline {name}: {nan} of {runs} inferences gave NaN or infinite outputs "
                    f"({nan / runs:.0%}; allowed {limits.max_error_rate:.0%})"
                ), True
        enough = runs_total >= limits.min_inferences
        now_p95 = p95(stats)
        if (
            enough
            and self.baseline_p95
            and now_p95
            and now_p95 > self.baseline_p95 * limits.max_latency_ratio
            and now_p95 - self.baseline_p95 >= limits.min_latency_increase
        ):
            return (
                f"inference p95 {now_p95:.1f} ms is {now_p95 / self.baseline_p95:.1f}x the previous version's "
                f"{self.baseline_p95:.1f} ms (allowed {limits.max_latency_ratio}x)"
            ), True
        return None, enough


def p95(stats: Mapping[str, PipelineStats]) -> float | None:
    """The worst inference p95 among the pipelines (ms), or None before any inference."""
    stages = [s["latency_ms"].get("infer") for s in stats.values()]
    values = [t["p95"] for t in stages if t is not None and t["p95"]]
    return max(values) if values else None
