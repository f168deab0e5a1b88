"""What every source hands to a pipeline, and the small contract a source plug-in implements.

A source plug-in module has `KEY`, `Config` and `Source` (a subclass of `BaseSource`). The pipeline
calls `frames(stop)` on its capture thread and reads items until the generator ends (a finite file) or
`stop` is set. Bad input never raises out of a source: it becomes an event and the source goes on,
waits and retries, or ends. An exception that does escape is caught by the pipeline, reported as
`source.error`, and the source is restarted with backoff.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

from agent.config.base import MAX_SIDE, PluginConfig
from agent.transport.events import Event, EventSink, log_event

if TYPE_CHECKING:
    import numpy as np

    from agent.config.profile import MqttConfig


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


class Message(Protocol):
    """What a source reads of a message from the broker."""

    @property
    def payload(self) -> bytes: ...


class Subscriptions(Protocol):
    """The daemon's broker connection as a source sees it: subscriptions that survive reconnects."""

    def subscribe(self, topic_filter: str, handler: Callable[[Message], None], qos: int = 1) -> None: ...


@dataclass(frozen=True)
class SourceContext:
    """What a source may need beyond its own config: who to tell, which device and pipeline, the broker."""

    pipeline: str = "pipeline"
    emit: EventSink = log_event
    mqtt: MqttConfig | None = None  # the profile's broker, for an mqtt source with a client of its own
    connection: Subscriptions | None = None  # the daemon's connection, shared by mqtt sources when given
    device: str = "device"


class SourceFailedError(Exception):
    """The source cannot work with this configuration (not a passing fault): reported once, not retried."""


ConfigT = TypeVar("ConfigT", bound=PluginConfig)


class BaseSource(Generic[ConfigT]):
    """Base of every source plug-in.

    `live` sources (cameras) produce frames whether or not anyone keeps up: the pipeline keeps the
    newest and counts the rest as dropped. Other sources wait for the pipeline (backpressure).
    """

    live: ClassVar[bool] = False
    # Sensor samples are small: deep queues let each stage work through a burst per wake-up, where
    # a hand-off per sample between threads would cost more than the sample's whole processing.
    sensor: ClassVar[bool] = False

    def __init__(self, config: ConfigT, ctx: SourceContext | None = None) -> None:
        self.config = config
        self.ctx = ctx or SourceContext()
        self.seq = 0

    @staticmethod
    def example(config: ConfigT) -> np.ndarray | None:
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


def too_large(width: float, height: float) -> str:
    """Why a frame of this size is refused ("WxH pixels, more than ..."), or "" when it may pass. OpenCV's
    FFmpeg backend converts every frame to the size a stream or file opens with: the size is checked then."""
    if width <= MAX_SIDE and height <= MAX_SIDE:
        return ""
    return f"{width:.0f}x{height:.0f} pixels, more than the {MAX_SIDE}x{MAX_SIDE} a frame may have"


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
