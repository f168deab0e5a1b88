"""Sensor values arriving on an MQTT topic of the agent's own broker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agent.config.base import INVALID_VALUES_DOC, Field, InvalidValues, Strict

KEY = "mqtt"


@dataclass(frozen=True, kw_only=True)
class Config(Strict):
    type: Literal["mqtt"]
    topic: str = Field(min_length=1, description="the topic filter to subscribe to")
    fields: tuple[str, ...] = Field(
        min_length=1, description="numeric fields of each JSON payload, in model input order"
    )
    invalid: InvalidValues = Field("reject", description=INVALID_VALUES_DOC)


import queue
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from agent.inference.processing.lazy import np
from agent.inference.sources.base import BaseSource, Message, SourceFailedError, Window
from agent.inference.sources.jsonl import values_from_object
from agent.util.jsonlimits import loads

if TYPE_CHECKING:
    import paho.mqtt.client as paho
    from paho.mqtt.client import ConnectFlags, DisconnectFlags
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode

INBOX = 10000  # messages held between the network thread and the pipeline
# (arrival time, payload); a payload over MAX_PAYLOAD is held as its size only: a full inbox of payloads as
# large as the broker allows (Mosquitto: 256 MB) would hold gigabytes.
Inbox = queue.Queue[tuple[float, bytes | bytearray | int]]
INBOX_POLL_S = 0.25
MAX_PAYLOAD = 64 * 1024  # bytes; a sensor reading is tens of bytes


class Source(BaseSource[Config]):
    """Values from JSON payloads on a topic of the profile's broker (a bare number works for one
    field). On the daemon's shared connection when it hands one in; otherwise on its own client
    (`<client_id>-src-<pipeline>`), whose network thread can wait for the pipeline (backpressure).
    A payload that does not parse is `frame.rejected`."""

    sensor = True

    @staticmethod
    def example(config: Config) -> np.ndarray | None:
        return np.zeros(len(config.fields))

    def frames(self, stop: threading.Event) -> Iterator[Window]:
        if self.ctx.connection is not None:
            yield from self._shared(stop)
            return
        yield from self._own(stop)

    def _shared(self, stop: threading.Event) -> Iterator[Window]:
        """On the daemon's connection: its network thread serves commands and acknowledgements too,
        so the handler never blocks; a full inbox drops the message, counted in a source.overflow event."""
        connection = self.ctx.connection
        assert connection is not None
        inbox: Inbox = queue.Queue(INBOX)
        dropped = [0]
        reported = [0]

        def handler(msg: Message) -> None:
            if stop.is_set():
                return  # subscriptions outlive a stopped pipeline until the daemon reconnects
            try:
                inbox.put_nowait((time.time(), _held(msg.payload)))
            except queue.Full:
                dropped[0] += 1

        def report_overflow() -> None:
            if dropped[0] != reported[0]:
                self.emit(
                    "source.overflow",
                    reason=f"{dropped[0] - reported[0]} message(s) on {self.config.topic} dropped: the pipeline fell behind",
                )
                reported[0] = dropped[0]

        connection.subscribe(self.config.topic, handler, qos=1)
        yield from self._drain(inbox, stop, report_overflow)

    def _drain(self, inbox: Inbox, stop: threading.Event, idle: Callable[[], None] | None = None) -> Iterator[Window]:
        """The inbox's payloads as windows until `stop`; `idle` runs before each wait."""
        while not stop.is_set():
            if idle is not None:
                idle()
            try:
                ts, payload = inbox.get(timeout=INBOX_POLL_S)
            except queue.Empty:
                continue
            window = self._parse(ts, payload)
            if window is not None:
                yield window

    def _parse(self, ts: float, payload: bytes | bytearray | int) -> Window | None:
        if isinstance(payload, int):
            self.emit(
                "frame.rejected",
                reason=f"payload on {self.config.topic}: {payload} bytes, more than the {MAX_PAYLOAD} allowed",
            )
            return None
        try:
            obj = loads(bytes(payload), max_bytes=MAX_PAYLOAD)
            if isinstance(obj, (int, float)) and not isinstance(obj, bool) and len(self.config.fields) == 1:
                obj = {self.config.fields[0]: obj}
            values = values_from_object(obj, self.config.fields, self.config.invalid)
        except (ValueError, UnicodeDecodeError) as exc:
            self.emit("frame.rejected", reason=f"payload on {self.config.topic}: {exc}")
            return None
        return Window(values, ts, self.next_seq())

    def _own(self, stop: threading.Event) -> Iterator[Window]:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        settings = self.ctx.mqtt
        if settings is None:
            raise SourceFailedError("an mqtt source needs the profile's mqtt section")
        inbox: Inbox = queue.Queue(INBOX)
        client_id = f"{settings.client_id or self.ctx.device}-src-{self.ctx.pipeline}"
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        if settings.username:
            client.username_pw_set(settings.username, settings.secret())
        if settings.secure and settings.tls is not None:
            tls = settings.tls
            client.tls_set(
                ca_certs=str(tls.ca),
                certfile=str(tls.cert) if tls.cert else None,
                keyfile=str(tls.key) if tls.key else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        topic = self.config.topic

        def on_connect(
            c: paho.Client, userdata: Any, flags: ConnectFlags, reason: ReasonCode, props: Properties | None = None
        ) -> None:
            if not reason.is_failure:
                c.subscribe(topic, qos=1)
                self.emit("source.connected", topic=topic)

        def on_disconnect(
            c: paho.Client, userdata: Any, flags: DisconnectFlags, reason: ReasonCode, props: Properties | None = None
        ) -> None:
            if not stop.is_set():
                self.emit("source.lost", reason=f"broker connection lost ({reason})", topic=topic)

        def on_message(c: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
            # Blocking here stalls reading from the socket: the broker holds the rest (backpressure).
            while not stop.is_set():
                try:
                    inbox.put((time.time(), _held(msg.payload)), timeout=0.5)
                    return
                except queue.Full:
                    continue

        client.on_connect, client.on_disconnect, client.on_message = on_connect, on_disconnect, on_message
        client.reconnect_delay_set(1, 30)
        client.connect_async(settings.host, settings.port, keepalive=int(settings.keepalive))
        client.loop_start()
        try:
            yield from self._drain(inbox, stop)
        finally:
            client.disconnect()
            client.loop_stop()


def _held(payload: bytes | bytearray) -> bytes | bytearray | int:
    """What the inbox keeps of a payload: the payload, or its size alone when it is over the limit."""
    return payload if len(payload) <= MAX_PAYLOAD else len(payload)
