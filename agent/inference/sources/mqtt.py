"""Sensor values arriving on an MQTT topic of the agent's own broker."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from agent.config.base import Strict

KEY = "mqtt"


class Config(Strict):
    type: Literal["mqtt"]
    topic: str = Field(min_length=1, description="the topic filter to subscribe to")
    fields: tuple[str, ...] = Field(
        min_length=1, description="numeric fields of each JSON payload, in model input order"
    )


import json
import queue
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

from agent.inference.sources.base import BaseSource, SourceFailed, Window
from agent.inference.sources.jsonl import values_from_object

INBOX = 10000  # messages held between the network thread and the pipeline


class Source(BaseSource):
    """Values from JSON payloads on a topic of the profile's broker (a bare number works for one
    field). On the daemon's shared connection when it hands one in; otherwise on its own client
    (`<client_id>-src-<pipeline>`), whose network thread can wait for the pipeline (backpressure).
    A payload that does not parse is `frame.rejected`."""

    sensor = True

    @staticmethod
    def example(cfg: Config) -> Any:
        import numpy as np

        return np.zeros(len(cfg.fields))

    def __init__(self, config: Config, ctx: Any = None) -> None:
        super().__init__(config, ctx)
        self.client: Any = None

    def frames(self, stop: threading.Event) -> Iterator[Window]:
        if self.ctx.connection is not None:
            yield from self._shared(stop)
            return
        yield from self._own(stop)

    def _shared(self, stop: threading.Event) -> Iterator[Window]:
        """On the daemon's connection: its network thread serves commands and acknowledgements too,
        so the handler never blocks; a full inbox drops the message, counted in a source.overflow event."""
        inbox: queue.Queue[tuple[float, bytes]] = queue.Queue(INBOX)
        dropped = [0]

        def handler(msg: Any) -> None:
            if stop.is_set():
                return  # subscriptions outlive a stopped pipeline until the daemon reconnects
            try:
                inbox.put_nowait((time.time(), msg.payload))
            except queue.Full:
                dropped[0] += 1

        self.ctx.connection.subscribe(self.config.topic, handler, qos=1)
        reported = 0
        while not stop.is_set():
            if dropped[0] != reported:
                self.emit(
                    "source.overflow",
                    reason=f"{dropped[0] - reported} message(s) on {self.config.topic} dropped: the pipeline fell behind",
                )
                reported = dropped[0]
            try:
                ts, payload = inbox.get(timeout=0.25)
            except queue.Empty:
                continue
            window = self._parse(ts, payload)
            if window is not None:
                yield window

    def _parse(self, ts: float, payload: bytes) -> Window | None:
        try:
            obj = json.loads(payload)
            if isinstance(obj, (int, float)) and not isinstance(obj, bool) and len(self.config.fields) == 1:
                obj = {self.config.fields[0]: obj}
            values = values_from_object(obj, self.config.fields)
        except (ValueError, UnicodeDecodeError) as exc:
            self.emit("frame.rejected", reason=f"payload on {self.config.topic}: {exc}")
            return None
        return Window(values, ts, self.next_seq())

    def _own(self, stop: threading.Event) -> Iterator[Window]:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        settings = self.ctx.mqtt
        if settings is None:
            raise SourceFailed("an mqtt source needs the profile's mqtt section")
        inbox: queue.Queue[tuple[float, bytes]] = queue.Queue(INBOX)
        client_id = f"{settings.client_id or self.ctx.device}-src-{self.ctx.pipeline}"
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        if settings.username:
            client.username_pw_set(settings.username, settings.secret())
        if settings.secure:
            tls = settings.tls
            client.tls_set(
                ca_certs=str(tls.ca),
                certfile=str(tls.cert) if tls.cert else None,
                keyfile=str(tls.key) if tls.key else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        topic = self.config.topic

        def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any = None) -> None:
            if not reason.is_failure:
                c.subscribe(topic, qos=1)
                self.emit("source.connected", topic=topic)

        def on_disconnect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any = None) -> None:
            if not stop.is_set():
                self.emit("source.lost", reason=f"broker connection lost ({reason})", topic=topic)

        def on_message(c: Any, userdata: Any, msg: Any) -> None:
            # Blocking here stalls reading from the socket: the broker holds the rest (backpressure).
            while not stop.is_set():
                try:
                    inbox.put((time.time(), msg.payload), timeout=0.5)
                    return
                except queue.Full:
                    continue

        client.on_connect, client.on_disconnect, client.on_message = on_connect, on_disconnect, on_message
        client.reconnect_delay_set(1, 30)
        client.connect_async(settings.host, settings.port, keepalive=int(settings.keepalive))
        client.loop_start()
        self.client = client
        try:
            while not stop.is_set():
                try:
                    ts, payload = inbox.get(timeout=0.25)
                except queue.Empty:
                    continue
                window = self._parse(ts, payload)
                if window is not None:
                    yield window
        finally:
            client.disconnect()
            client.loop_stop()
