"""The status snapshot as Prometheus metrics, written by prometheus_client: latency as histograms,
states as state sets (every state a series of its own, 0 or 1), counters that never carry a rate beside
them, the process collector's `process_start_time_seconds` instead of an uptime, and unknown values
left out rather than reported as zero.

A scrape renders the snapshot it is handed; nothing is kept between scrapes, so a pipeline that goes
away takes its series with it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import get_args

from prometheus_client import ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    StateSetMetricFamily,
)
from prometheus_client.metrics_core import Metric

from agent.inference.stats import LATENCY_BUCKETS_MS, LatencyHistogram, PipelineState, PipelineStats
from agent.service.endpoint.stats import EndpointFigures
from agent.service.statuspage.snapshot import CONNECTION_STATES, StatusSnapshot
from agent.transport.outbox import OutboxStats

# The text format generate_latest writes; Prometheus asks for it by this name.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

PIPELINE_STATES: tuple[PipelineState, ...] = get_args(PipelineState)
LATENCY_BUCKETS_S = tuple(ms / 1000.0 for ms in LATENCY_BUCKETS_MS)
# Without a registry of its own: the collector is read by render_metrics alone, never by a global one.
PROCESS = ProcessCollector(registry=None)

# (metric without _total, help, value); the pipeline label is added to each.
PIPELINE_COUNTERS: tuple[tuple[str, str, Callable[[PipelineStats], int]], ...] = (
    ("edge_agent_pipeline_frames", "frames (or sensor windows) the source delivered", lambda s: s["frames"]),
    (
        "edge_agent_pipeline_dropped_frames",
        "camera frames replaced by a newer one before inference",
        lambda s: s["dropped"],
    ),
    ("edge_agent_pipeline_skipped_frames", "frames skipped to keep the pipeline's rate", lambda s: s["skipped"]),
    ("edge_agent_pipeline_rejected_frames", "frames the preprocessor could not use", lambda s: s["rejected"]),
    ("edge_agent_pipeline_inferences", "inferences run", lambda s: s["inferences"]),
    ("edge_agent_pipeline_results", "results handed to the outbox", lambda s: s["results"]),
    ("edge_agent_pipeline_model_swaps", "model versions swapped in while running", lambda s: s["swaps"]),
    (
        "edge_agent_pipeline_nan_outputs",
        "inferences with a NaN or an infinity in an output (probation rolls such a version back)",
        lambda s: s["nan_outputs"],
    ),
)
# (kind label, value)
PIPELINE_ERRORS: tuple[tuple[str, Callable[[PipelineStats], int]], ...] = (
    ("inference", lambda s: s["inference_errors"]),
    ("post", lambda s: s["post_errors"]),
    ("sink", lambda s: s["sink_errors"]),
    ("source", lambda s: s["source_errors"]),
)
# (metric, help, value); None (unknown) leaves the sample out.
OUTBOX_GAUGES: tuple[tuple[str, str, Callable[[OutboxStats], float | None]], ...] = (
    (
        "edge_agent_outbox_messages",
        "messages waiting in the outbox for the broker's acknowledgement",
        lambda o: o.depth,
    ),
    ("edge_agent_outbox_bytes", "disk the outbox uses", lambda o: o.bytes),
    ("edge_agent_outbox_max_bytes", "disk the outbox may use", lambda o: o.max_bytes),
    ("edge_agent_outbox_oldest_age_seconds", "age of the oldest message waiting", lambda o: o.oldest_age_s),
)
# Every way a message leaves the outbox without reaching a subscriber: (reason label, count).
OUTBOX_DROPS: tuple[tuple[str, Callable[[OutboxStats], int]], ...] = (
    ("full", lambda o: o.dropped_full),  # the outbox reached mqtt.outbox.max_bytes: the oldest went
    ("age", lambda o: o.dropped_age),  # older than mqtt.outbox.max_age
    ("rejected", lambda o: o.rejected),  # the broker refused it (a PUBACK with a failure reason code)
)


def render_metrics(snapshot: StatusSnapshot) -> str:
    """The snapshot (and this process) as Prometheus text."""
    return generate_latest(_Families([*_agent(snapshot), *PROCESS.collect()])).decode()


class _Families:
    """What generate_latest reads: anything with collect()."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> list[Metric]:
        return self._families


def _agent(snapshot: StatusSnapshot) -> list[Metric]:
    info = InfoMetricFamily("edge_agent", "the agent: device id and agent version")
    info.add_metric([], {"device": snapshot.device, "version": snapshot.agent_version})
    families: list[Metric] = [info]
    connection = snapshot.connection
    if connection is not None:
        state = StateSetMetricFamily(
            "edge_agent_mqtt_state", "the broker connection's state: 1 for the current one, 0 for the others"
        )
        state.add_metric([], {s: s == connection.state for s in CONNECTION_STATES})
        connects = CounterMetricFamily("edge_agent_mqtt_connects", "successful connections to the broker")
        connects.add_metric([], connection.connects)
        families += [state, connects]
    if snapshot.outbox is not None:
        families += _outbox(snapshot.outbox)
    families += _pipelines(snapshot.pipelines, snapshot.latency)
    if snapshot.endpoint is not None:
        families += _endpoint(snapshot.endpoint)
    return families


def _endpoint(figures: EndpointFigures) -> list[Metric]:
    """The inference endpoint: requests by model and status (an unknown model's name is the empty label),
    and how long the answered ones took, from arrival to answer."""
    requests = CounterMetricFamily(
        "edge_agent_endpoint_requests",
        "inference requests to the KServe endpoint, by model and HTTP status",
        labels=["model", "code"],
    )
    for (model, code), count in sorted(figures.requests.items()):
        requests.add_metric([model, code], count)
    seconds = HistogramMetricFamily(
        "edge_agent_endpoint_request_seconds",
        "duration of the inference requests the endpoint answered, from arrival to answer",
        labels=["model"],
    )
    for model, histogram in sorted(figures.latency.items()):
        seconds.add_metric([model], _buckets(histogram), histogram.sum_ms / 1000.0)
    return [requests, seconds]


def _outbox(stats: OutboxStats) -> list[Metric]:
    families: list[Metric] = []
    for name, help_text, gauge in OUTBOX_GAUGES:
        family = GaugeMetricFamily(name, help_text)
        value = gauge(stats)
        if value is not None:
            family.add_metric([], value)
        families.append(family)
    dropped = CounterMetricFamily(
        "edge_agent_outbox_dropped",
        "messages that left the outbox without reaching the broker, by reason",
        labels=["reason"],
    )
    for reason, count in OUTBOX_DROPS:
        dropped.add_metric([reason], count(stats))
    acked = CounterMetricFamily("edge_agent_outbox_acked", "messages the broker acknowledged")
    acked.add_metric([], stats.acked)
    return [*families, dropped, acked]


def _pipelines(
    pipelines: Iterable[PipelineStats], latency: Mapping[str, Mapping[str, LatencyHistogram]]
) -> list[Metric]:
    state = StateSetMetricFamily(
        "edge_agent_pipeline_state",
        "each pipeline's state: 1 for the current one, 0 for the others",
        labels=["pipeline"],
    )
    counters = [(CounterMetricFamily(n, h, labels=["pipeline"]), of) for n, h, of in PIPELINE_COUNTERS]
    errors = CounterMetricFamily("edge_agent_pipeline_errors", "errors per stage", labels=["pipeline", "kind"])
    seconds = HistogramMetricFamily(
        "edge_agent_pipeline_latency_seconds",
        "latency per stage (pre, infer, post, total) since the pipeline started",
        labels=["pipeline", "stage"],
    )
    model = InfoMetricFamily(
        "edge_agent_model", "the model each pipeline serves: name, version and execution provider", labels=["pipeline"]
    )
    for stats in pipelines:
        name = stats["pipeline"]
        state.add_metric([name], {s: s == stats["state"] for s in PIPELINE_STATES})
        for family, of in counters:
            family.add_metric([name], of(stats))
        for kind, count in PIPELINE_ERRORS:
            errors.add_metric([name, kind], count(stats))
        for stage, histogram in sorted(latency.get(name, {}).items()):
            if histogram.count:  # no duration yet: left out, not a histogram of zeros
                seconds.add_metric([name, stage], _buckets(histogram), histogram.sum_ms / 1000.0)
        model.add_metric(
            [name], {"model": stats["model"], "version": stats["model_version"], "provider": stats["provider"]}
        )
    return [state, *(family for family, _ in counters), errors, seconds, model]


def _buckets(histogram: LatencyHistogram) -> list[tuple[str, float]]:
    """Cumulative counts per upper bound, as the exposition format has them, ending with +Inf."""
    out: list[tuple[str, float]] = []
    total = 0
    for bound, count in zip((*LATENCY_BUCKETS_S, float("inf")), histogram.counts, strict=True):
        total += count
        out.append(("+Inf" if bound == float("inf") else repr(bound), total))
    return out
