"""The status snapshot as Prometheus text exposition (version 0.0.4): every family with # HELP and
# TYPE, label values escaped, unknown values left out rather than reported as zero."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

from agent.inference.stats import PipelineStats, StageTimes
from agent.service.statuspage.snapshot import StatusSnapshot
from agent.transport.outbox import OutboxStats

Kind = Literal["counter", "gauge"]
Number = int | float | bool | None

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (metric, help, value); the pipeline label is added to each.
PIPELINE_COUNTERS: tuple[tuple[str, str, Callable[[PipelineStats], int]], ...] = (
    ("edge_agent_pipeline_frames_total", "frames the source delivered", lambda s: s["frames"]),
    (
        "edge_agent_pipeline_dropped_frames_total",
        "camera frames replaced by a newer one before inference",
        lambda s: s["dropped"],
    ),
    ("edge_agent_pipeline_skipped_frames_total", "frames skipped to keep the pipeline's rate", lambda s: s["skipped"]),
    ("edge_agent_pipeline_rejected_frames_total", "frames the preprocessor could not use", lambda s: s["rejected"]),
    ("edge_agent_pipeline_inferences_total", "inferences run", lambda s: s["inferences"]),
    ("edge_agent_pipeline_results_total", "results handed to the outbox", lambda s: s["results"]),
    ("edge_agent_pipeline_model_swaps_total", "model versions swapped in while running", lambda s: s["swaps"]),
)
# (kind label, value)
PIPELINE_ERRORS: tuple[tuple[str, Callable[[PipelineStats], int]], ...] = (
    ("inference", lambda s: s["inference_errors"]),
    ("post", lambda s: s["post_errors"]),
    ("sink", lambda s: s["sink_errors"]),
    ("source", lambda s: s["source_errors"]),
)
# (metric, help, value)
OUTBOX_GAUGES: tuple[tuple[str, str, Callable[[OutboxStats], Number]], ...] = (
    (
        "edge_agent_outbox_messages",
        "messages waiting in the outbox for the broker's acknowledgement",
        lambda o: o.depth,
    ),
    ("edge_agent_outbox_bytes", "disk the outbox uses", lambda o: o.bytes),
    ("edge_agent_outbox_max_bytes", "disk the outbox may use", lambda o: o.max_bytes),
    ("edge_agent_outbox_oldest_age_seconds", "age of the oldest message waiting", lambda o: o.oldest_age_s),
)
OUTBOX_COUNTERS: tuple[tuple[str, str, Callable[[OutboxStats], int]], ...] = (
    (
        "edge_agent_outbox_dropped_total",
        "messages dropped because the outbox was full or they were too old",
        lambda o: o.dropped,
    ),
    ("edge_agent_outbox_acked_total", "messages the broker acknowledged", lambda o: o.acked),
)
QUANTILES: tuple[tuple[str, Callable[[StageTimes], float | None]], ...] = (
    ("0.5", lambda q: q["p50"]),
    ("0.95", lambda q: q["p95"]),
)


class _Exposition:
    def __init__(self) -> None:
        self._families: dict[str, tuple[Kind, str, list[str]]] = {}

    def add(self, name: str, kind: Kind, help_text: str, value: Number, /, **labels: str | None) -> None:
        """One sample; the family is declared even when its value is unknown (None)."""
        family = self._families.setdefault(name, (kind, help_text, []))
        if value is None:
            return
        label_text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items() if v is not None)
        number = _number(value)
        family[2].append(f"{name}{{{label_text}}} {number}" if label_text else f"{name} {number}")

    def text(self) -> str:
        lines: list[str] = []
        for name, (kind, help_text, samples) in self._families.items():
            help_text = help_text.replace("\\", "\\\\").replace("\n", "\\n")
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]
        return "\n".join(lines) + "\n"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: int | float | bool) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def render_metrics(snapshot: StatusSnapshot) -> str:
    """The snapshot as Prometheus text."""
    out = _Exposition()
    out.add(
        "edge_agent_info",
        "gauge",
        "the agent: device id and agent version",
        1,
        device=snapshot.device,
        version=snapshot.agent_version,
    )
    out.add("edge_agent_uptime_seconds", "gauge", "seconds since the agent started", snapshot.uptime_s)
    connection = snapshot.connection
    if connection is not None:
        out.add(
            "edge_agent_mqtt_connected",
            "gauge",
            "1 while the broker connection is up",
            connection.up,
            state=connection.state,
        )
        out.add(
            "edge_agent_mqtt_connects_total", "counter", "successful connections to the broker", connection.connects
        )
    if snapshot.outbox is not None:
        _outbox(out, snapshot.outbox)
    for stats in snapshot.pipelines:
        _pipeline(out, stats)
    return out.text()


def _outbox(out: _Exposition, stats: OutboxStats) -> None:
    for name, help_text, gauge in OUTBOX_GAUGES:
        out.add(name, "gauge", help_text, gauge(stats))
    for name, help_text, counter in OUTBOX_COUNTERS:
        out.add(name, "counter", help_text, counter(stats))


def _pipeline(out: _Exposition, stats: PipelineStats) -> None:
    pipeline = stats["pipeline"]
    out.add(
        "edge_agent_pipeline_fps",
        "gauge",
        "results per second over the last few seconds",
        stats["results_per_s"],
        pipeline=pipeline,
    )
    out.add(
        "edge_agent_pipeline_up",
        "gauge",
        "1 while the pipeline is running",
        stats["state"] == "running",
        pipeline=pipeline,
        state=stats["state"],
    )
    for stage, latency in sorted(stats["latency_ms"].items()):
        for quantile, of in QUANTILES:
            ms = of(latency)
            out.add(
                "edge_agent_pipeline_latency_seconds",
                "gauge",
                "recent latency per stage (pre, infer, post, total)",
                None if ms is None else round(ms / 1000.0, 7),
                pipeline=pipeline,
                stage=stage,
                quantile=quantile,
            )
    for name, help_text, counter in PIPELINE_COUNTERS:
        out.add(name, "counter", help_text, counter(stats), pipeline=pipeline)
    for kind, errors in PIPELINE_ERRORS:
        out.add(
            "edge_agent_pipeline_errors_total",
            "counter",
            "errors per stage",
            errors(stats),
            pipeline=pipeline,
            kind=kind,
        )
    out.add(
        "edge_agent_model_info",
        "gauge",
        "the model each pipeline serves: name, version and execution provider",
        1,
        pipeline=pipeline,
        model=stats["model"],
        version=stats["model_version"],
        provider=stats["provider"],
    )
