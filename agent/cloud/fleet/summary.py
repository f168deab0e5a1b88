"""The fleet at a glance: per group and model, where the devices stand; per model version, how it behaves.

A device counts, for each model of its group, in exactly one column, first match wins: `offline` (its
retained status says so), `latest` (it runs the group's latest version: the version of the group's
retained order, else the newest any device of the group runs), `held` (it holds the latest back: it
refused it or rolled it back, and installs it again only on an operator's override), `failed` (its
last report on the latest says refused, rolled back or error), `in_progress` (downloading or
verifying it), else `behind`.

Per version, across the fleet: the devices running it, the hours it served them without an inference
error or NaN output (`error_free_h`: from each device's report of the version's time active, or the
agent's uptime when it started on that version), the median and the 95th percentile of the devices'
own inference p95, the devices whose report says the provider fell back, and the frames dropped.

The figures are the devices' word, bounded where they are read (`agent.cloud.fleet.inventory` refuses a
health whose counts or times are not finite, are negative or reach 2^63); a report's time active, finite
by the contract, counts only below that bound too, or two devices' 1e308 summed to `Infinity`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import TypedDict

from agent.cloud.fleet.inventory import MAX_FIGURE, Device
from agent.models.manifest import version_key
from agent.transport.contract.health import PipelineHealth
from agent.transport.contract.report import FAILED_STATES

COLUMNS = ("latest", "in_progress", "held", "failed", "offline", "behind")


class GroupModel(TypedDict):
    group: str
    model: str
    latest: str
    devices: int
    on_latest: int
    in_progress: int
    held: int
    failed: int
    offline: int
    behind: int


class VersionVitals(TypedDict):
    model: str
    version: str
    devices: int
    error_free_h: float
    p95_ms_median: float | None
    p95_ms_p95: float | None
    fallbacks: int
    drops: int
    errors: int


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) by the nearest rank, or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _pipelines(dev: Device, model: str) -> list[PipelineHealth]:
    pipelines = dev.health.pipelines if dev.health is not None else None
    return [p for p in pipelines.values() if p.model == model] if isinstance(pipelines, dict) else []


def column(dev: Device, model: str, latest: str) -> str:
    """Which column of the group table this device counts in for `model`."""
    if dev.state == "offline":
        return "offline"
    served = dev.models().get(model)
    if served is not None and served.version == latest:
        return "latest"
    if served is not None and any(h.version == latest for h in served.held or ()):
        return "held"
    report = dev.report.report if dev.report is not None else None
    if report is not None and report.model == model and report.version == latest:
        if report.state in FAILED_STATES or report.state == "error":
            return "failed"
        if report.state in ("downloading", "verifying"):
            return "in_progress"
    return "behind"


def group_table(devices: Iterable[Device], group_orders: dict[tuple[str, str], str]) -> list[GroupModel]:
    """One row per (group, model); `group_orders` maps (group, model) to the version its retained order names."""
    members: dict[tuple[str, str], list[Device]] = defaultdict(list)
    for dev in devices:
        for model in dev.models():
            members[(dev.group or "?", model)].append(dev)
    rows: list[GroupModel] = []
    for (group, model), devs in sorted(members.items()):
        latest = group_orders.get((group, model)) or max({dev.models()[model].version for dev in devs}, key=version_key)
        counts = dict.fromkeys(COLUMNS, 0)
        for dev in devs:
            counts[column(dev, model, latest)] += 1
        rows.append(
            {
                "group": group,
                "model": model,
                "latest": latest,
                "devices": len(devs),
                "on_latest": counts["latest"],
                "in_progress": counts["in_progress"],
                "held": counts["held"],
                "failed": counts["failed"],
                "offline": counts["offline"],
                "behind": counts["behind"],
            }
        )
    return rows


def version_table(devices: Iterable[Device]) -> list[VersionVitals]:
    """One row per (model, version) that some device runs."""
    acc: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    p95s: dict[tuple[str, str], list[float]] = defaultdict(list)
    for dev in devices:
        report = dev.report.report if dev.report is not None else None
        for model, served in dev.models().items():
            key = (model, served.version)
            row = acc[key]
            row["devices"] += 1
            pipelines = _pipelines(dev, model)
            errors = sum(p.inference_errors + p.nan_outputs for p in pipelines)
            row["errors"] += errors
            row["drops"] += sum(p.dropped for p in pipelines)
            infer = [p.latency_ms["infer"].p95 for p in pipelines if "infer" in p.latency_ms]
            if any(v is not None for v in infer):
                p95s[key].append(max(v for v in infer if v is not None))
            mine = report is not None and report.model == model and report.running == served.version
            if mine and report is not None and report.fallback:
                row["fallbacks"] += 1
            if errors == 0:
                row["error_free_s"] += _active_s(dev, model, served.version, pipelines)
    return [
        {
            "model": model,
            "version": version,
            "devices": int(row["devices"]),
            "error_free_h": round(row["error_free_s"] / 3600, 2),
            "p95_ms_median": percentile(p95s[(model, version)], 0.5),
            "p95_ms_p95": percentile(p95s[(model, version)], 0.95),
            "fallbacks": int(row["fallbacks"]),
            "drops": int(row["drops"]),
            "errors": int(row["errors"]),
        }
        for (model, version), row in sorted(acc.items(), key=lambda kv: (kv[0][0], version_key(kv[0][1])))
    ]


def _active_s(dev: Device, model: str, version: str, pipelines: list[PipelineHealth]) -> float:
    """How long this version has served here: the report's figure, or the uptime when it never swapped."""
    report = dev.report.report if dev.report is not None else None
    if report is not None and report.model == model and report.running == version and report.vitals is not None:
        return report.vitals.active_s if report.vitals.active_s < MAX_FIGURE else 0.0
    if dev.health is not None and pipelines and all(p.swaps == 0 for p in pipelines):
        return dev.health.agent.uptime_s
    return 0.0
