"""The health report, retained on `<prefix>/<device>/health`: what the device and the agent are doing.

`ts`, `agent` and `system` come from the health module itself; the other sections are handed in by
the daemon, and a section whose source failed reads `{"error": "..."}` in its place. A section that
is not wired (a health reporter without a model store, say) is absent.
"""

from __future__ import annotations

from typing import Literal

from agent.transport.contract.base import Text, Timestamp, Wire


class SectionError(Wire):
    """A section whose source raised: the error in its place, the rest of the report intact."""

    error: Text


class AgentHealth(Wire):
    uptime_s: float
    version: str | None = None
    rss_mb: float | None = None  # the whole process; absent where it cannot be read


class Memory(Wire):
    total_mb: int
    available_mb: int
    percent: float


class DiskUsage(Wire):
    path: Text
    total_mb: int
    free_mb: int
    percent: float


class DiskError(Wire):
    path: Text
    error: Text


class SystemHealth(Wire):
    cpu_percent: float
    cpu_count: int | None
    memory: Memory
    uptime_s: int
    load: list[float] | None = None  # 1, 5 and 15 minutes; absent where the OS has none
    temperatures_c: dict[str, float] | None = None  # absent without sensors
    disk: DiskUsage | DiskError | None = None  # of the state folder


class ConnectionHealth(Wire):
    state: Literal["online", "offline", "connecting", "refused", "stopped"]
    error: str | None
    protocol: Literal["5", "3.1.1"] | None
    broker: Text
    connected_for_s: float | None
    connects: int


class OutboxHealth(Wire):
    depth: int
    bytes: int
    max_bytes: int
    oldest_age_s: float | None
    dropped: int
    dropped_full: int
    dropped_age: int
    rejected: int
    acked: int
    dropped_disk: int = 0  # messages lost because the disk had no room (their seq is used up)
    disk_full: bool = False  # the disk has no room now: results are published only while the broker is up
    memory_only: bool = False  # the disk had no room at start: the outbox is in memory (lost on a reboot)


class StageTimes(Wire):
    """Recent latency of one stage in ms; p50 and p95 are null before its first measure."""

    p50: float | None
    p95: float | None
    n: int


class PipelineHealth(Wire):
    """`Pipeline.stats()`: counters, stage latency, rate, model and state."""

    pipeline: Text
    state: Literal["created", "running", "stopped", "finished", "failed"]
    source: Text
    model: Text
    model_version: Text
    provider: Text
    frames: int
    skipped: int
    rejected: int
    inferences: int
    results: int
    inference_errors: int
    post_errors: int
    sink_errors: int
    source_errors: int
    swaps: int
    nan_outputs: int  # inferences with a NaN or an infinity in an output
    dropped: int
    results_per_s: float
    inference_running_s: float
    latency_ms: dict[str, StageTimes]
    last_error: str | None
    memory_mb: float | None = None  # this pipeline's share of its model's shared session
    memory_basis: str | None = None  # how memory_mb was apportioned between the pipelines sharing the session


class HeldVersion(Wire):
    """A version the device will not install again until an operator overrides the hold by name."""

    version: Text
    reason: Text  # why it was refused or rolled back
    since: str  # UTC ISO 8601; empty for a hold an older agent recorded


class ModelHealth(Wire):
    """The version really serving, the provider really running it, and the pipelines it serves."""

    version: Text
    provider: Text
    pipelines: list[str]
    digest: str | None = None  # registry models only
    held: list[HeldVersion] | None = None  # registry models only


class HardwareHealth(Wire):
    arch: Text
    fingerprint: Text


class HealthReport(Wire):
    ts: Timestamp
    device: str | None = None
    agent: AgentHealth
    system: SystemHealth | SectionError
    group: str | SectionError | None = None
    pipelines: dict[str, PipelineHealth] | SectionError | None = None
    models: dict[str, ModelHealth] | SectionError | None = None
    outbox: OutboxHealth | SectionError | None = None
    connection: ConnectionHealth | SectionError | None = None
    hardware: HardwareHealth | SectionError | None = None

    def model_versions(self) -> dict[str, ModelHealth]:
        """The models section, or nothing when it is absent or its source failed."""
        return self.models if isinstance(self.models, dict) else {}
