"""The gates of a rollout: how one device's signed report is judged, and when the rollout aborts.

A device passes when its report says the version is active and its vitals, once it ran
`min_inferences` on it, stay within the spec's limits against the same device's previous version: the
inference p95 ratio (once the version is also `min_p95_increase_ms` slower: on a tiny model a 0.2 ms
p95 that doubles is scheduling jitter, not a regression), no fall back to a lesser provider, the error and NaN rates, the drop rate. It fails
when it refused the version, rolled it back (its own probation, its crash guard), or its vitals break a
limit; until then it is waited for, up to the per-device timeout. A device that passed may still fail
later (a rollback during the soak): the latest report decides.

The rollout aborts when the failures (refused, rolled back, unhealthy, timed out) are at least
`abort_min` and more than `abort_percent` of the devices ordered so far, or reach `abort_count`.
"""

from __future__ import annotations

from typing import Literal

from agent.cloud.fleet.plan import RolloutSpec
from agent.transport.contract.report import FAILED_STATES, DeviceReport

Verdict = Literal["pass", "fail", "wait"]


def judge(report: DeviceReport, spec: RolloutSpec) -> tuple[Verdict, str]:
    """(verdict, why) for a report that answers this rollout's order."""
    if report.state in FAILED_STATES:
        return "fail", f"{report.state}: {report.reason or 'no reason given'}"
    if report.state != "active":
        return "wait", report.state + (f": {report.reason}" if report.reason else "")
    if report.running != spec.version:
        return "fail", f"runs {report.running or 'nothing'} instead of {spec.version}"
    if report.fallback and not spec.allow_fallback:
        return "fail", f"provider fell back from {report.previous_provider} to {report.provider}"
    vitals = report.vitals
    if vitals is None or vitals.inferences < spec.min_inferences:
        ran = 0 if vitals is None else vitals.inferences
        return "wait", f"active, {ran} of {spec.min_inferences} inferences for its vitals"
    tried, frames = vitals.inferences + vitals.errors, vitals.inferences + vitals.drops
    if min(vitals.inferences, tried, frames) <= 0:  # ruled out by the contract and check_spec, not by old rollouts
        return "wait", f"active, {vitals.inferences} inferences: no rate to judge yet"
    if vitals.errors / tried > spec.max_error_rate:
        return "fail", f"error rate {vitals.errors / tried:.1%} is above {spec.max_error_rate:.1%}"
    if vitals.nan / vitals.inferences > spec.max_error_rate:
        return "fail", f"NaN outputs in {vitals.nan / vitals.inferences:.1%} of inferences"
    if vitals.drops / frames > spec.max_drop_rate:
        return "fail", f"drop rate {vitals.drops / frames:.1%} is above {spec.max_drop_rate:.1%}"
    if vitals.p95_ms and vitals.baseline_p95_ms:
        ratio = vitals.p95_ms / vitals.baseline_p95_ms
        if ratio > spec.max_p95_ratio and vitals.p95_ms - vitals.baseline_p95_ms >= spec.min_p95_increase_ms:
            return "fail", (
                f"inference p95 {vitals.p95_ms:.1f} ms is {ratio:.1f}x the previous version's "
                f"{vitals.baseline_p95_ms:.1f} ms (allowed {spec.max_p95_ratio}x)"
            )
    return "pass", "active and healthy"


def abort_reason(failed: int, ordered: int, spec: RolloutSpec) -> str | None:
    """Why the rollout must abort now, or None. `ordered`: the devices sent the order so far. Judged at
    every step: once the failures are more than the share allows of every device ordered, no outcome of
    the others can save the rollout (and when a wave has settled, the devices ordered are those reached)."""
    if spec.abort_count is not None and failed >= spec.abort_count:
        return f"{failed} device(s) failed (the limit is {spec.abort_count})"
    if ordered and failed >= spec.abort_min and failed > spec.abort_percent / 100 * ordered:
        return f"{failed} of {ordered} device(s) failed (more than {spec.abort_percent:g}%)"
    return None
