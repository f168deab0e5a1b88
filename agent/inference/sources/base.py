"""What every source hands to a pipeline, and the small contract a source plug-in implements.

A source plug-in module has `KEY`, `Config` and `Source` (a subclass of `BaseSource`). The pipeline
calls `frames(stop)` on its capture thread and reads items until the generator ends (a finite file) or
`stop` is set. Bad input never raises out of a source: it becomes an event and the source goes on,
waits and retries, or ends. An exception that does escape is caught by the pipeline, reported as
`source.error`, and the source is restarted with backoff.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from agent.transport.events import Event, EventSink, log_event

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class Frame:
    """One camera or video frame: `data` is an HxWx3 BGR uint8 image as OpenCV reads it."""

    data: np.ndarray
    ts: float  # capture time, seconds since the epoch (UTC)
    seq: int  # source sequence number, from 0, contiguous unless the source says it dropped
    t: float | None = None  # offset in seconds from the start of a file source
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Window(Frame):
    """One sensor sample (1-D values, one per channel) or one audio window (1-D samples, context first)."""


@dataclass(frozen=True)
class SourceContext:
    """What a source may need beyond its own config: who to tell, where state lives, the broker."""

    pipeline: str = "pipeline"
    emit: EventSink = log_event
    state_dir: Path | None = None
    mqtt: Any = None  # agent.profile.MqttConfig for the mqtt source
    connection: Any = None  # the daemon's agent.mqtt.Connection, shared by mqtt sources when given
    device: str = "device"
    clock: Callable[[], float] = time.time


class SourceFailed(Exception):
    """The source cannot work with this configuration (not a passing fault): reported once, not retried."""


class BaseSource:
    """Base of every source plug-in.

    `live` sources (cameras) produce frames whether or not anyone keeps up: the pipeline keeps the
    newest and counts the rest as dropped. Other sources wait for the pipeline (backpressure).
    """

    live: ClassVar[bool] = False
    # Sensor samples are small: deep queues let each stage work through a burst per wake-up, where
    # a hand-off per sample between threads would cost more than the sample's whole processing.
    sensor: ClassVar[bool] = False

    def __init__(self, config: Any, ctx: SourceContext | None = None) -> None:
        self.config = config
        self.ctx = ctx or SourceContext()
        self.seq = 0

    @staticmethod
    def example(config: Any) -> np.ndarray | None:
        """A blank item shaped like what this source will produce, for warm-up; None when unknown."""
        return None

    def frames(self, stop: threading.Event) -> Iterator[Frame]:  # pragma: no cover - interface
        raise NotImplementedError

    def emit(self, type_: str, **fields: Any) -> None:
        self.ctx.emit(Event(type_, {"pipeline": self.ctx.pipeline, "source": self.config.type, **fields}))

    def next_seq(self) -> int:
        seq = self.seq
        self.seq += 1
        return seq

    def close(self) -> None:
        """Release devices and files; called once, from the capture thread, when it ends."""


class Pacer:
    """Sleeps between items to hold a rate, without drift, waking early when `stop` is set."""

    def __init__(self, rate: float | None) -> None:
        self.period = 1.0 / rate if rate else 0.0
        self.next = time.monotonic()

    def wait(self, stop: threading.Event) -> bool:
        """False when stopped while waiting."""
        if not self.period:
            return not stop.is_set()
        now = time.monotonic()
        if self.next > now:
            if stop.wait(self.next - now):
                return False
        else:
            self.next = max(self.next, now - self.period)  # after a stall, do not burst to catch up
        self.next += self.period
        return not stop.is_set()


class Backoff:
    """Random, capped exponential delays between reconnect attempts (0.5 s, 1 s, 2 s ... `cap`)."""

    def __init__(self, cap: float = 30.0, first: float = 0.5) -> None:
        self.cap = cap
        self.first = first
        self.attempt = 0

    def next_delay(self) -> float:
        base = min(self.cap, self.first * (2**self.attempt))
        self.attempt += 1
        return base * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.attempt = 0


def source_class(config: Any) -> type[BaseSource]:
    from agent.inference.sources import SOURCES

    return SOURCES[config.type].Source


def make_source(config: Any, ctx: SourceContext | None = None) -> BaseSource:
    """The plug-in registered for `config.type`, built from its config."""
    return source_class(config)(config, ctx)
