"""The status document: one typed snapshot that the daemon builds and every endpoint renders.

Pipelines and the outbox report typed values of their own (`PipelineStats`, `OutboxStats`); the broker
connection's `health()` is still a plain mapping, read here in one place (`ConnectionStatus.from_health`)
so that the page, the metrics and the JSON never guess at a key or a state.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, get_args

from agent.inference.stats import LatencyHistogram, PipelineStats
from agent.service.endpoint.stats import EndpointFigures
from agent.transport.connection import State as ConnectionState
from agent.transport.outbox import OutboxStats

CONNECTION_STATES: tuple[ConnectionState, ...] = get_args(ConnectionState)


@dataclass(frozen=True)
class ConnectionStatus:
    state: ConnectionState
    broker: str
    connects: int
    error: str | None
    protocol: str | None
    connected_for_s: float | None

    @property
    def up(self) -> bool:
        return self.state == "online"

    @classmethod
    def from_health(cls, health: Mapping[str, Any]) -> ConnectionStatus:
        """From `Connection.health()`; a state this page does not know is an error, not a guess."""
        state = next((s for s in CONNECTION_STATES if s == health["state"]), None)
        if state is None:
            raise ValueError(f"unknown connection state {health['state']!r} (known: {', '.join(CONNECTION_STATES)})")
        return cls(
            state=state,
            broker=health["broker"],
            connects=health["connects"],
            error=health["error"],
            protocol=health["protocol"],
            connected_for_s=health["connected_for_s"],
        )


@dataclass(frozen=True)
class StatusSnapshot:
    """What `/api/status` serves; `connection` and `outbox` are None when results go to stdout."""

    device: str
    agent_version: str
    uptime_s: float
    connection: ConnectionStatus | None
    outbox: OutboxStats | None
    pipelines: tuple[PipelineStats, ...]
    # Per pipeline and stage, every duration since it started (for /metrics; the page reads percentiles).
    latency: Mapping[str, Mapping[str, LatencyHistogram]] = field(default_factory=dict)
    # The inference endpoint's requests (for /metrics); None when the endpoint is off.
    endpoint: EndpointFigures | None = None

    def to_json(self) -> dict[str, Any]:
        """As plain JSON values; NaN and infinities become null (JSON has no spelling for them and
        browsers reject the document)."""
        doc: dict[str, Any] = _finite(
            {k: v for k, v in dataclasses.asdict(self).items() if k not in ("latency", "endpoint")}
        )
        return doc


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
