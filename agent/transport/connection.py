"""The daemon's one broker connection.

`Connection` owns a paho-mqtt 2 client (callback API version 2; the fenced fast one of
agent/transport/pahopatch.py when paho is what it expects): MQTT 5 with a fallback to 3.1.1, mqtt:// and
mqtts:// (CA, client certificate and key), a password read from its file at each connect, a retained
`offline` Last Will and a retained `online` birth message, reconnects with capped, jittered backoff
(agent.util.backoff), and re-subscribes on every connect (agent/transport/subscriptions.py). A refused
connection (bad credentials, not authorised, a certificate the other side rejects) sets the state
`refused` with one clear error (agent/transport/refusals.py), logged once. What the broker cannot do (MQTT
5, retained messages, QoS 1, large packets; a preset's rate) is read at connect and said in one line
(agent/transport/limits.py): a refused retained Will is sent again unretained, publishes keep to the
rest. Its network thread (agent/transport/netloop.py) is the only one that writes the socket; the pump
(agent/transport/pump.py) runs on it as a loop hook.
"""

from __future__ import annotations

import json
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config.presets import PRESETS
from agent.transport import pahopatch, refusals
from agent.transport.limits import Limits, Negotiation, connect_properties
from agent.transport.netloop import NetworkLoop
from agent.transport.subscriptions import Handler, Subscriptions
from agent.transport.topics import Topics
from agent.util.backoff import delay
from agent.util.timefmt import utc_iso
from agent.util.worker import Worker

if TYPE_CHECKING:
    from agent.config.profile import DeviceConfig, MqttConfig

log = logging.getLogger(__name__)

# Reconnect delay: agent.util.backoff's equal jitter between these, so that a fleet that lost its
# broker at once does not come back at once.
RECONNECT_MIN = 0.5
RECONNECT_MAX = 60.0
# The longest the network thread waits in select() before its hooks (the pump) run again (a put wakes
# it sooner when it is idle).
LOOP_TIMEOUT = 0.1
# TCP connect and TLS handshake timeout, and the longest wait for CONNACK after CONNECT.
CONNECT_TIMEOUT = 10.0
# How long stop() waits for the broker to acknowledge the `offline` status.
OFFLINE_TIMEOUT = 2.0

State = Literal["online", "offline", "connecting", "refused", "stopped"]
ONLINE: Final = "online"
OFFLINE: Final = "offline"
CONNECTING: Final = "connecting"
REFUSED: Final = "refused"
STOPPED: Final = "stopped"
# How one connection attempt ended.
Outcome = Literal["failed", "was_online", "stopped", "again"]


class MqttConfigError(Exception):
    """A configuration problem found before connecting (unreadable TLS files, password file)."""


AckListener = Callable[[int, bool], None]
StateListener = Callable[[State, "str | None"], None]


class Connection:
    """The daemon's one broker connection. `start()` returns at once; the state tells the rest."""

    def __init__(
        self,
        config: MqttConfig,
        device: DeviceConfig,
        *,
        agent_version: str | None = None,
        reconnect_min: float = RECONNECT_MIN,
        reconnect_max: float = RECONNECT_MAX,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.device_id = device.id
        self.topics = Topics(config.topic_prefix, device.id, device.group)
        self.client_id = config.client_id or device.id
        self.agent_version = agent_version
        self.reconnect_min, self.reconnect_max = reconnect_min, reconnect_max
        self._rng, self._clock = rng, clock
        self._neg = Negotiation(config.protocol, PRESETS.get(config.preset) if config.preset else None)
        self.rate = self.limits.rate_limit()  # publishes per second, shared with the pump
        self._lock = threading.RLock()
        self._netloop = NetworkLoop()
        self._worker = Worker("mqtt-connection", self._run, wake=self._netloop.wake)
        self._online = threading.Event()
        self._subscriptions = Subscriptions()
        self._latest: dict[str, bytes] = {}
        self._ack_listeners: list[AckListener] = []
        self._state_listeners: list[StateListener] = []
        self._loop_hooks: list[Callable[[], None]] = []
        self.state: State = STOPPED
        self.error: str | None = None
        self.generation = 0
        self.connected_since: float | None = None
        self.connects = 0
        self._attempt_log: str | None = None
        self._logged_error: str | None = None
        self._got_connack = False
        self._rebuild = False
        self._client = self._make_client()

    # ---- the API the daemon uses ---------------------------------------------------------------

    @property
    def protocol(self) -> Literal["5", "3.1.1"]:
        return self._neg.protocol

    @property
    def limits(self) -> Limits:
        """What the broker takes, as of the last CONNACK (and the preset)."""
        return self._neg.limits

    @property
    def inflight_limit(self) -> int:
        """paho's in-flight window: the broker's Receive Maximum once one was announced."""
        return self._neg.inflight

    @property
    def online(self) -> bool:
        return self._online.is_set()

    @property
    def alive(self) -> bool:
        """The network loop thread is running (what the systemd watchdog asks)."""
        return self._worker.alive

    def start(self) -> Connection:
        if not self._worker.started:
            self._netloop.open()
            self._set_state(CONNECTING, None)
            self._worker.start()
        return self

    def stop(self) -> None:
        """Publish `offline` ourselves (a clean disconnect suppresses the Will), then disconnect."""
        if not self._worker.started:
            return
        if self.online:
            info = self._publish_retained(self._client, self.topics.status, self._status_payload(OFFLINE, "stopped"))
            deadline = time.monotonic() + OFFLINE_TIMEOUT
            try:
                while self.online and not info.is_published() and time.monotonic() < deadline:
                    time.sleep(0.01)
            except RuntimeError:  # paho raises once the connection is gone; the Will covers it then
                pass
        self._worker.stop()
        # The network thread has ended: this thread owns the client now and writes the DISCONNECT itself.
        client = self._client
        try:
            if client.socket() is not None:
                client.disconnect()
                client.loop_write()
        except OSError as exc:  # the socket may already be gone; the Will covers a lost DISCONNECT
            log.debug("mqtt: disconnecting failed: %s", exc)
        self._netloop.close()
        self._online.clear()
        self._set_state(STOPPED, None)

    def wait_online(self, timeout: float) -> bool:
        """Connected, and every subscription acknowledged (commands sent after this reach us)."""
        deadline = time.monotonic() + timeout
        acknowledged = self._subscriptions.acknowledged
        return self._online.wait(timeout) and acknowledged.wait(max(0.0, deadline - time.monotonic()))

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Remembered and re-subscribed on every connect. `handler` runs on the network thread: keep it tiny."""
        self._subscriptions.add(topic_filter, handler, qos)
        if self.online:
            self._client.subscribe(topic_filter, qos)

    def publish(
        self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False, properties: Properties | None = None
    ) -> int | None:
        """Publish now if online and return the mid; None when offline (nothing is queued) or too large here."""
        if not self.online:
            return None
        data = payload.encode() if isinstance(payload, str) else payload
        too_large = self.limits.too_large(topic, len(data), qos)
        if too_large:
            log.warning("mqtt: not publishing to %s: %s", topic, too_large)
            return None
        if self.rate is not None:
            self.rate.record(len(data))
        info = self._client.publish(
            topic, data, qos=self.limits.qos(qos), retain=retain and self.limits.retain, properties=properties
        )
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.warning("publish to %s failed: %s", topic, paho.error_string(info.rc))
            return None
        return info.mid

    def publish_latest(self, topic: str, payload: bytes | str) -> None:
        """A retained value whose latest version is all that counts (health): sent now, and again on every connect."""
        data = payload.encode() if isinstance(payload, str) else payload
        with self._lock:
            self._latest[topic] = data
        self.publish(topic, data, qos=1, retain=True)

    def add_ack_listener(self, listener: AckListener) -> None:
        """`listener(mid, ok)` on every PUBACK (on the network thread)."""
        self._ack_listeners.append(listener)

    def add_loop_hook(self, hook: Callable[[], None]) -> None:
        """`hook()` on the network thread after every turn of its loop while a socket is open."""
        self._loop_hooks.append(hook)

    def wake(self) -> None:
        """Cut short the network thread's wait in select(), so that a hook runs now."""
        self._netloop.wake()

    def add_state_listener(self, listener: StateListener) -> None:
        """`listener(state, error)` on every state change."""
        self._state_listeners.append(listener)

    def publish_raw(self, topic: str, payload: bytes, qos: int, retain: bool) -> tuple[int, bool]:
        """For the pump: (mid, accepted). Offline publishes stay in paho's memory and go out on reconnect."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        return info.mid, info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN)

    def health(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "error": self.error,
            "protocol": self.protocol if self.connects else None,
            "broker": f"{self.config.host}:{self.config.port}",
            "connected_for_s": round(self._clock() - self.connected_since, 1)
            if self.connected_since and self.online
            else None,
            "connects": self.connects,
        }

    # ---- internals -----------------------------------------------------------------------------

    def _make_client(self) -> paho.Client:
        client = pahopatch.CLIENT_CLASS(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv5 if self._neg.mqtt5 else paho.MQTTv311,
            reconnect_on_failure=False,
            # MQTT 5 asks for a clean start at connect(); 3.1.1 sets it here.
            clean_session=None if self._neg.mqtt5 else True,
        )
        client.connect_timeout = CONNECT_TIMEOUT
        client.max_queued_messages_set(0)
        client.max_inflight_messages_set(self.inflight_limit)
        will_qos, will_retain = self._neg.will
        client.will_set(
            self.topics.status, self._status_payload(OFFLINE, "connection lost"), qos=will_qos, retain=will_retain
        )
        if self.config.secure:
            tls = self.config.tls
            try:
                client.tls_set(
                    ca_certs=str(tls.ca) if tls and tls.ca else None,
                    certfile=str(tls.cert) if tls and tls.cert else None,
                    keyfile=str(tls.key) if tls and tls.key else None,
                    cert_reqs=ssl.CERT_REQUIRED,
                )
            except (ssl.SSLError, OSError) as exc:
                raise MqttConfigError(f"mqtt.tls: cannot load the TLS files ({exc})") from None
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._subscriptions.on_subscribe
        client.on_message = self._subscriptions.on_message
        self._netloop.attach(client)
        return client

    def _replace_client(self) -> None:
        """A fresh paho client: what the old one held in memory is gone (the pump starts again from the oldest)."""
        with self._lock:
            self._client = self._make_client()
            self.generation += 1

    def _status_payload(self, state: State, reason: str | None = None) -> bytes:
        # The group is in every status, the Will included, so that `fleet` finds a group's devices.
        body: dict[str, Any] = {"device": self.device_id, "group": self.topics.group, "state": state}
        if state == ONLINE:
            body.update(ts=utc_iso(self._clock()), protocol=self.protocol, client_id=self.client_id)
            if self.agent_version:
                body["version"] = self.agent_version
        elif reason == "stopped":
            body["ts"] = utc_iso(self._clock())
        if reason:
            body["reason"] = reason
        return json.dumps(body).encode()

    def _set_state(self, state: State, error: str | None) -> None:
        with self._lock:
            changed = (state, error) != (self.state, self.error)
            self.state, self.error = state, error
        if not changed:
            return
        # Each problem is logged once, not at every retry.
        if error and error == self._logged_error:
            pass
        elif state == REFUSED:
            log.error("mqtt: connection to %s:%s refused: %s", self.config.host, self.config.port, error)
        elif state == OFFLINE and error:
            log.warning("mqtt: offline: %s", error)
        else:
            log.info("mqtt: %s", state)
        self._logged_error = error if error else (None if state == ONLINE else self._logged_error)
        for listener in self._state_listeners:
            try:
                listener(state, error)
            except Exception:  # a listener must not end the network thread
                log.exception("mqtt state listener failed")

    def _run(self) -> None:
        attempt = 0
        stopping = self._worker.stopping
        while not stopping.is_set():
            self._attempt_log, self._got_connack = None, False
            outcome = self._connect_once()
            if stopping.is_set():
                break
            if outcome == "again":
                continue
            if outcome == "was_online":
                attempt = 0
            wait = delay(attempt, self.reconnect_min, self.reconnect_max, self._rng)
            attempt += 1
            stopping.wait(wait)

    def _connect_once(self) -> Outcome:
        client = self._client
        config = self.config
        try:
            password = config.secret()
        except OSError as exc:
            self._set_state(REFUSED, f"cannot read mqtt.password_file: {exc.strerror or exc}")
            return "failed"
        if config.username or password:
            client.username_pw_set(config.username, password)
        # paho's log tells why a connection ended before CONNACK (a TLS alert, a reset). Only until
        # CONNACK: with a log callback set, paho formats a line for every packet (measured: a third of
        # the network thread's calls).
        client.on_log = self._on_log
        try:
            v5 = self._neg.mqtt5  # MQTT 5: a clean start, and the largest packet the device reads
            start, properties = (True, connect_properties()) if v5 else (paho.MQTT_CLEAN_START_FIRST_ONLY, None)
            client.connect(config.host, config.port, int(config.keepalive), clean_start=start, properties=properties)
        except ssl.SSLCertVerificationError as exc:
            self._set_state(REFUSED, refusals.untrusted_broker(exc))
            return "failed"
        except ssl.SSLError as exc:
            self._set_state(REFUSED, refusals.handshake_failed(exc))
            return "failed"
        except OSError as exc:
            self._set_state(OFFLINE, f"cannot reach {config.host}:{config.port}: {exc.strerror or exc}")
            return "failed"
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        # paho's timeout covers the TCP connect only; a broker that accepts and then never answers
        # (amqtt does this to an MQTT 5 CONNECT with a Will) would leave us "connecting" for ever.
        connack_deadline = time.monotonic() + CONNECT_TIMEOUT
        stopping = self._worker.stopping
        while not stopping.is_set() and rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            if not self._got_connack and time.monotonic() > connack_deadline:
                self._attempt_log = f"no answer to CONNECT within {CONNECT_TIMEOUT:g} s"
                break
            rc = self._netloop.turn(client, LOOP_TIMEOUT)
            for hook in self._loop_hooks:
                try:
                    hook()
                except Exception:  # a failing hook must not end the connection
                    log.exception("mqtt: network-thread hook failed")
        was_online = self.online
        self._went_offline()
        if stopping.is_set():
            return "stopped"
        if self._rebuild:
            self._rebuild = False
            self._replace_client()
            return "again"
        if not self._got_connack:
            self._no_connack()
        elif self.state != REFUSED:
            self._set_state(OFFLINE, f"connection lost ({paho.error_string(rc)})")
        return "was_online" if was_online else "failed"

    def _no_connack(self) -> None:
        """The connection ended before any CONNACK: a TLS rejection, or a broker that dislikes MQTT 5."""
        detail = self._attempt_log or "the broker closed the connection"
        rejected = refusals.rejected_certificate(detail)
        if rejected:
            self._set_state(REFUSED, rejected)
        elif self._neg.may_switch(self.connects == 0):
            self._neg.switch()  # the broker may not take MQTT 5; the line at connect will say
            self._replace_client()
            self._set_state(CONNECTING, None)
        else:
            self._set_state(OFFLINE, f"no CONNACK from {self.config.host}:{self.config.port}: {detail}")

    def _went_offline(self) -> None:
        self._subscriptions.acknowledged.clear()
        if self._online.is_set():
            self._online.clear()
            self.connected_since = None

    # paho callbacks: tiny, never raising (an exception here can end the network loop).

    def _on_log(self, client: paho.Client, userdata: object, level: int, buf: str) -> None:
        if level in (paho.MQTT_LOG_ERR, paho.MQTT_LOG_WARNING):
            self._attempt_log = buf
            log.debug("paho: %s", buf)

    def _on_connect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._got_connack = True
        client.on_log = None
        if reason.is_failure:
            code = refusals.connack_code(reason.value, self._neg.mqtt5)
            if self._neg.after_refusal(code, first=self.connects == 0):
                self._rebuild = True  # MQTT 5 refused: 3.1.1 next; a Will the broker cannot keep: one without it
                self._set_state(CONNECTING, None)
            else:
                self._set_state(REFUSED, refusals.connack_refusal(code, reason))
            return
        if not self._neg.adopt_window(client, properties):
            self._rebuild = True  # a fresh client with the broker's window connects again at once
            client.disconnect()
            return
        self._neg.connected(properties, f"{self.config.host}:{self.config.port}")
        self.connects += 1
        self.connected_since = self._clock()
        self._publish_retained(client, self.topics.status, self._status_payload(ONLINE))
        self._subscriptions.subscribe_all(client)
        with self._lock:
            latest = list(self._latest.items())
        for topic, payload in latest:
            self._publish_retained(client, topic, payload)
        self._online.set()
        self._set_state(ONLINE, None)

    def _publish_retained(self, client: paho.Client, topic: str, payload: bytes) -> paho.MQTTMessageInfo:
        """Status and health: retained where the broker keeps them, counted against the rate."""
        if self.rate is not None:
            self.rate.record(len(payload))
        return client.publish(topic, payload, qos=self.limits.qos(1), retain=self.limits.retain)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._went_offline()

    def _on_publish(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        ok = not reason.is_failure
        for listener in self._ack_listeners:
            try:
                listener(mid, ok)
            except Exception:
                log.exception("mqtt ack listener failed")


def reply_properties(correlation_data: bytes | None) -> Properties | None:
    """MQTT 5 properties for a command reply that echoes the request's correlation data."""
    if correlation_data is None:
        return None
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # paho leaves it unannotated
    props.CorrelationData = correlation_data
    return props
