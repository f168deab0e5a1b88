"""The `Sink` that pipelines and the rest of the agent write to when a broker is configured.

Every result and event becomes one message in the durable outbox (an event serialized through its
contract, `agent.transport.contract`); `OutboxPump` (agent.transport.pump) takes it
from there. `seq` is assigned here, per pipeline (and one sequence for events), in the same transaction
that stores the message, so it rises across restarts and a subscriber detects loss or duplicates from it.

Batching (pipeline `batch: {size: N, max_delay: T}`) gathers up to N results, or what arrived within T,
into one message; results waiting for their batch live in memory, so a process crash can lose at most
one unfinished batch per pipeline (T seconds). The default, size 1, writes each result through at once.

Under a managed broker's limits (`mqtt.preset`, agent/config/presets.py) every pipeline is batched, so that
results stay under the broker's publish rate however fast they come (several results to a message), and
no message exceeds its payload limit: an oversized batch is split, a single oversized result refused with
a `sink.error` event (before it takes a seq, so `seq` shows no gap for it).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from agent.config.presets import PRESETS
from agent.config.units import format_size
from agent.transport.events import Event
from agent.transport.limits import RATE_SAFETY
from agent.transport.outbox import Outbox
from agent.transport.topics import Topics
from agent.util.timefmt import utc_iso
from agent.util.worker import Worker

if TYPE_CHECKING:
    from agent.config.profile import MqttConfig, PipelineConfig

log = logging.getLogger(__name__)

# How often the flusher looks at batch deadlines and outbox drops.
TICK = 0.02
# Drops are reported as an event at most this often, so a full outbox is not flooded with its own news.
DROP_REPORT_INTERVAL = 10.0
EVENTS_STREAM = "events"
# Under a preset's publish rate: the share of the rate results may take (events, health and replies have
# the rest), and the most results in one message (the payload limit splits it further).
RESULTS_SHARE = 0.5 * RATE_SAFETY
PRESET_BATCH = 1000


class PayloadTooLargeError(ValueError):
    """A message over the broker's payload limit: refused before it is stored."""


# One encoder for every message: json.dumps with any option builds a new JSONEncoder per call (a
# tenth of the producing thread's samples went to that and to dumps itself). Same output.
_ENCODE = json.JSONEncoder(separators=(",", ":"), default=str).encode


def _dumps(obj: Any) -> bytes:
    return _ENCODE(obj).encode()


def _ts(value: Any) -> Any:
    return utc_iso(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


class OutboxSink:
    """Results and events into the outbox. `batches` maps a pipeline to (size, max_delay seconds)."""

    def __init__(
        self,
        outbox: Outbox,
        topics: Topics,
        *,
        qos: int = 1,
        batches: dict[str, tuple[int, float]] | None = None,
        max_payload: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.outbox, self.topics, self.default_qos = outbox, topics, qos
        self.max_payload = max_payload
        self.batches = {name: (size, delay) for name, (size, delay) in (batches or {}).items() if size > 1}
        self._clock = clock
        self._routes: dict[str, tuple[str, str]] = {}  # pipeline -> (seq stream, topic)
        self._pending: dict[str, list[dict[str, Any]]] = {}
        self._deadline: dict[str, float] = {}
        self._pending_qos: dict[str, int] = {}
        self._lock = threading.Lock()
        self._worker = Worker("outbox-sink", self._run)
        self._last_drop_report = 0.0

    @classmethod
    def for_profile(
        cls, outbox: Outbox, topics: Topics, mqtt: MqttConfig, pipelines: Iterable[PipelineConfig]
    ) -> OutboxSink:
        """Batch sizes from each pipeline's `batch` (or the preset's rate), the default QoS from `mqtt.qos`."""
        preset = PRESETS.get(mqtt.preset) if mqtt.preset else None
        batches = {p.name: (p.batch.size, p.batch.max_delay) for p in pipelines}
        if preset is None:
            return cls(outbox, topics, qos=mqtt.qos, batches=batches)
        # One message per pipeline every `delay` at most: together, their share of the rate.
        delay = len(batches) / (preset.publish_rate * RESULTS_SHARE)
        batches = {name: (max(size, PRESET_BATCH), max(wait, delay)) for name, (size, wait) in batches.items()}
        return cls(outbox, topics, qos=mqtt.qos, batches=batches, max_payload=preset.max_payload)

    # ---- the Sink protocol -------------------------------------------------------------------

    def result(self, pipeline: str, payload: dict[str, Any], qos: int | None = None) -> None:
        qos = self.default_qos if qos is None else qos
        batch = self.batches.get(pipeline)
        if batch is None:
            route = self._routes.get(pipeline)
            if route is None:
                route = self._routes[pipeline] = (f"results/{pipeline}", self.topics.results(pipeline))
            self.outbox.put_sequenced(
                route[0], route[1], lambda seq: self._fit(_dumps(self._stamp(pipeline, payload, seq))), qos=qos
            )
            return
        size, delay = batch
        with self._lock:
            items = self._pending.setdefault(pipeline, [])
            if not items:
                self._deadline[pipeline] = time.monotonic() + delay
            items.append(payload)
            self._pending_qos[pipeline] = max(self._pending_qos.get(pipeline, 0), qos)
            full = len(items) >= size
        if full:
            self._flush_pipeline(pipeline)

    def event(self, event: Event) -> None:
        self._put_event(event)

    def _put_event(self, event: Event) -> int:
        """The event into the outbox; its message id, 0 when the disk had no room for it."""

        # The contract (pydantic) is imported with the first event, which a start sends after its first results.
        from agent.transport.contract.wire import event_payload

        def build(seq: int) -> bytes:
            return _dumps(event_payload(self.topics.device, seq, utc_iso(event.ts), event.body))

        return self.outbox.put_sequenced(EVENTS_STREAM, self.topics.events, build, qos=1)[0]

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> OutboxSink:
        self._worker.start()
        return self

    def stop(self) -> None:
        self._worker.stop()
        self.flush()

    def flush(self) -> None:
        """Write every unfinished batch now (on shutdown, or before a test reads the outbox)."""
        with self._lock:
            names = [n for n, items in self._pending.items() if items]
        for name in names:
            self._flush_pipeline(name)

    def report_drops(self, force: bool = False) -> None:
        """Queue an `outbox.dropped` event when the bound or a full disk dropped messages since the last
        report, in this run or an earlier one (the outbox keeps what was reported); for a full disk only
        once there is room again, and the drops count as reported only once the event is stored."""
        now = time.monotonic()
        if self.outbox.disk_full or not (force or now - self._last_drop_report >= DROP_REPORT_INTERVAL):
            return
        count, disk, dropped = self.outbox.unreported_drops()
        if count <= 0:
            return
        self._last_drop_report = now
        reason = "the outbox reached its bound; the oldest messages were dropped"
        if disk:
            reason = f"the disk was full: {disk} message(s) could not be kept (their seq numbers are missing)" + (
                f"; {count - disk} more dropped at the outbox bound" if count > disk else ""
            )
        body = {"count": count, "total": dropped, "max_bytes": self.outbox.max_bytes, "reason": reason, "disk": disk}
        if self._put_event(Event("outbox.dropped", body)):
            self.outbox.mark_reported(count, disk)

    # ---- internals ---------------------------------------------------------------------------

    def _stamp(self, pipeline: str, payload: dict[str, Any], seq: int) -> dict[str, Any]:
        # Hot path (one call per result): no per-key Python loop.
        body: dict[str, Any] = {"device": self.topics.device, "pipeline": pipeline, "seq": seq}
        body.update(payload)
        body["device"], body["pipeline"], body["seq"] = self.topics.device, pipeline, seq
        ts = body.get("ts")
        if ts is None:
            body["ts"] = utc_iso(self._clock())
        elif not isinstance(ts, str):
            body["ts"] = _ts(ts)
        return body

    def _fit(self, data: bytes) -> bytes:
        if self.max_payload is not None and len(data) > self.max_payload:
            raise PayloadTooLargeError(
                f"a result of {len(data)} bytes is over the {format_size(self.max_payload)} payloads the broker "
                "takes (mqtt.preset); it is dropped"
            )
        return data

    def _flush_pipeline(self, pipeline: str) -> None:
        with self._lock:
            items = self._pending.pop(pipeline, [])
            qos = self._pending_qos.pop(pipeline, self.default_qos)
            self._deadline.pop(pipeline, None)
        if items:
            self._put_batch(pipeline, items, qos)

    def _put_batch(self, pipeline: str, items: list[dict[str, Any]], qos: int) -> None:
        """One message of `items`; halves of it, each its own message, when that is over the payload limit."""

        def build(first: int) -> bytes:
            results = []
            for i, item in enumerate(items):
                body: dict[str, Any] = {"seq": first + i}
                body.update(
                    {k: (_ts(v) if k == "ts" else v) for k, v in item.items() if k not in ("seq", "device", "pipeline")}
                )
                body.setdefault("ts", utc_iso(self._clock()))
                results.append(body)
            return self._fit(
                _dumps(
                    {
                        "device": self.topics.device,
                        "pipeline": pipeline,
                        "seq": first,
                        "count": len(items),
                        "results": results,
                    }
                )
            )

        try:
            self.outbox.put_sequenced(
                f"results/{pipeline}", self.topics.results(pipeline), build, count=len(items), qos=qos
            )
        except PayloadTooLargeError as exc:
            if len(items) == 1:
                self.event(Event("sink.error", {"pipeline": pipeline, "reason": str(exc)}))
                return
            half = len(items) // 2
            self._put_batch(pipeline, items[:half], qos)
            self._put_batch(pipeline, items[half:], qos)

    def _run(self) -> None:
        while not self._worker.stopping.wait(TICK):
            try:
                now = time.monotonic()
                with self._lock:
                    due = [name for name, deadline in self._deadline.items() if deadline <= now]
                for name in due:
                    self._flush_pipeline(name)
                self.report_drops()
            except Exception:  # keep flushing after a bad moment, e.g. a full disk
                log.exception("outbox sink: flush failed")
                self._worker.stopping.wait(1.0)
