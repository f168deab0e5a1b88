"""One MQTT connection per daemon, and the pump that empties the durable outbox through it.

`Connection` owns a paho-mqtt 2 client (callback API version 2): MQTT 5 with a fallback to 3.1.1,
mqtt:// and mqtts:// (CA, client certificate and key), a password read from its file at each connect, a
retained `offline` Last Will and a retained `online` birth message, reconnects with capped, jittered
backoff, and re-subscribes on every connect. A refused connection (bad credentials, not authorised, a
certificate the other side rejects) sets the state `refused` with one clear error, logged once.

`OutboxPump` publishes the outbox in order, keeps a window of messages in flight, and removes a message
from the outbox only when its PUBACK arrives. Nothing that matters is published straight from a
producer: results and events go through the outbox; only things whose latest value is all that counts
(status, health, command replies) are published directly.
"""

from __future__ import annotations

import json
import logging
import random
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.transport.outbox import Outbox
from agent.transport.topics import Topics

log = logging.getLogger(__name__)

# Reconnect delay: uniform(0, min(RECONNECT_MAX, RECONNECT_MIN * 2**attempt)), "full jitter", so that a
# fleet that lost its broker at once does not come back at once.
RECONNECT_MIN = 0.5
RECONNECT_MAX = 60.0
# paho's own default; a broker's Receive Maximum (MQTT 5 CONNACK) replaces it.
DEFAULT_INFLIGHT = 20
# Messages the pump hands to paho ahead of their acknowledgements. paho sends them as the broker's
# window allows, from its own network thread, with no thread switch per message (measured: a window of
# 16 refilled by the pump thread ran at a quarter of bare paho's rate).
PUMP_WINDOW = 1000
# Acknowledgements recorded in the outbox together (while paho still holds half a window to send).
ACK_BATCH = 200
# The longest the network thread waits in select() before the pump looks at the outbox again (puts
# wake it sooner when it is idle).
LOOP_TIMEOUT = 0.1
# A message in flight this long on a live connection is published again (paho normally resends on
# reconnect by itself; this is the safety net should its in-memory state ever be lost).
RESEND_AFTER = 60.0
# TCP connect and TLS handshake timeout, and the longest wait for CONNACK after CONNECT.
CONNECT_TIMEOUT = 10.0

ONLINE, OFFLINE, CONNECTING, REFUSED, STOPPED = "online", "offline", "connecting", "refused", "stopped"

# CONNACK reason codes that a human has to fix (MQTT 5 codes; 3.1.1 return codes are mapped onto them).
_REFUSAL_HINTS = {
    0x84: "the broker does not support this MQTT version",
    0x85: "the broker rejected the client id (mqtt.client_id)",
    0x86: "bad user name or password (mqtt.username, mqtt.password_file)",
    # Mosquitto answers a wrong password with 0x87 too.
    0x87: "not authorised (check mqtt.username and mqtt.password_file, and the broker's ACL for this user)",
    0x8A: "this client is banned by the broker",
    0x8C: "bad authentication method",
}
_V311_TO_V5 = {1: 0x84, 2: 0x85, 3: 0x88, 4: 0x86, 5: 0x87}


class MqttConfigError(Exception):
    """A configuration problem found before connecting (unreadable TLS files, password file)."""


@dataclass(frozen=True)
class Incoming:
    """A message handed to a subscription handler: copied out of paho, safe to keep."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Incoming], None]
AckListener = Callable[[int, bool], None]


def utc_iso(ts: float) -> str:
    """UTC ISO 8601 with milliseconds, the form every payload uses."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


def backoff(
    attempt: int, low: float = RECONNECT_MIN, high: float = RECONNECT_MAX, rng: Callable[[], float] = random.random
) -> float:
    """Full-jitter exponential backoff, capped."""
    return rng() * min(high, low * (2 ** min(attempt, 30)))


# The most bytes of queued packets that _AgentClient joins into one send().
COALESCE_BYTES = 64 * 1024
# What _AgentClient asks of one recv().
RECV_BYTES = 64 * 1024
# Handed to on_publish for PUBACKs without properties (read only: nothing here changes them).
_PUBACK_REASONS: dict[int, ReasonCode] = {}
_PUBACK_NO_PROPERTIES = Properties(PacketTypes.PUBACK)


class _AgentClient(paho.Client):
    """paho's client with far fewer system calls and objects per message on the network thread.

    Stock paho driven by `loop()` (as here) writes every packet the moment it is queued: each PUBACK
    read frees a slot in the in-flight window, paho queues the next PUBLISH and writes a wake-up byte to
    its own socket pair and then the packet, and it reads each PUBACK in three recv() calls. Every system
    call hands the interpreter lock to the producing thread and waits to get it back, so with a producer
    busy they cost far more than their own time. Profiled with py-spy on bench/bench_outbox.py, 80,000
    results: send()/recv() and the wake-up byte were about 40% of the network thread's samples, and
    paho's PUBACK decoding (a fresh ReasonCode and Properties each) another 25%.

    - Only the network thread writes: a packet queued there just waits (no wake-up byte: that thread is
      not in select()); one queued by another thread (health, a command reply, stop) wakes it. This also
      keeps another thread from taking packets off the queue between those the pump put there.
    - `_packet_write` joins the queued packets into one send() (up to COALESCE_BYTES).
    - `_sock_recv` takes what the socket holds in one recv() and serves paho's small reads from it.
    - `_handle_pubackcomp` decodes a PUBACK without properties with shared reason objects.
    Together (with the sink's reused JSON encoder): the bench's agent/bare ratio of medians went from
    0.63-0.83 to 1.27-1.66 in alternated runs, the drain alone from 5,700-7,800 to 13,500-17,300
    results/s; the network thread's samples for 80,000 results from 11,340 to 6,521 (docs/mqtt.md).
    """

    # The thread running loop() while it runs (set and cleared by Connection._connect_once).
    _net_thread: int | None = None
    # Bytes read from the socket ahead of paho's parser, and the socket they came from.
    _ahead: bytes = b""
    _ahead_pos = 0
    _ahead_sock: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._queue_lock = threading.Lock()  # orders another thread's queueing against the loop's end

    def loop_started(self) -> None:
        """From now on the calling thread is the only one that writes to the socket."""
        self._net_thread = threading.get_ident()

    def loop_ended(self) -> None:
        """The calling (network) thread leaves its loop: write what is queued (a DISCONNECT from stop()),
        and let other threads write for themselves again, as stock paho does."""
        with self._queue_lock:
            self._net_thread = None
        try:
            if self._sock is not None and self.want_write():
                self.loop_write()
        except Exception:  # the connection is ending anyway; the Will covers a lost DISCONNECT
            log.debug("mqtt: writing the last packets failed", exc_info=True)

    def _packet_queue(
        self, command: int, packet: bytes | bytearray, mid: int, qos: int, info: paho.MQTTMessageInfo | None = None
    ) -> MQTTErrorCode:
        if self._net_thread is None:
            return super()._packet_queue(command, packet, mid, qos, info)
        entry = {
            "command": command,
            "mid": mid,
            "qos": qos,
            "pos": 0,
            "to_process": len(packet),
            "packet": packet,
            "info": info,
        }
        if threading.get_ident() == self._net_thread:
            self._out_packet.append(entry)  # type: ignore[arg-type]
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        with self._queue_lock:
            if self._net_thread is None:  # the loop ended meanwhile
                return super()._packet_queue(command, packet, mid, qos, info)
            self._out_packet.append(entry)  # type: ignore[arg-type]
        wake = self._sockpairW
        if wake is not None:
            try:
                wake.send(b"0")
            except OSError:
                pass
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _packet_write(self) -> MQTTErrorCode:
        # Join the leading run of packets that need nothing after their write (not a QoS 0 PUBLISH, whose
        # on_publish fires once written, nor a DISCONNECT) into one; paho writes it as any packet, partial
        # writes included.
        out = self._out_packet
        if len(out) > 1:
            taken = []
            size = 0
            while out and size < COALESCE_BYTES:
                head = out[0]
                kind = head["command"] & 0xF0
                if kind == paho.DISCONNECT or (kind == paho.PUBLISH and head["qos"] == 0):
                    break
                taken.append(out.popleft())
                size += head["to_process"]
            if len(taken) > 1:
                joined = b"".join(p["packet"][p["pos"] :] if p["pos"] else p["packet"] for p in taken)
                out.appendleft(
                    {
                        "command": paho.PUBACK,
                        "mid": 0,
                        "qos": 1,
                        "pos": 0,
                        "to_process": len(joined),
                        "packet": joined,
                        "info": None,
                    }
                )
            elif taken:
                out.appendleft(taken[0])
        return super()._packet_write()

    def _sock_recv(self, bufsize: int) -> bytes:
        ahead = self._ahead
        if self._ahead_pos < len(ahead) and self._ahead_sock is self._sock:
            start = self._ahead_pos
            self._ahead_pos = min(start + bufsize, len(ahead))
            return ahead[start : self._ahead_pos]
        data = super()._sock_recv(max(bufsize, RECV_BYTES))
        if len(data) <= bufsize:
            self._ahead, self._ahead_pos = b"", 0
            return data
        self._ahead, self._ahead_pos, self._ahead_sock = data, bufsize, self._sock
        return data[:bufsize]

    @property
    def read_ahead(self) -> bool:
        """Bytes wait in the read-ahead buffer: select() cannot see them, so loop_read() must run."""
        return self._ahead_pos < len(self._ahead) and self._ahead_sock is self._sock and self._sock is not None

    def _handle_pubackcomp(self, cmd: Any) -> MQTTErrorCode:
        # A PUBACK without properties: 2 bytes of message id; MQTT 5 may add a reason byte and an empty
        # property length (Mosquitto sends 0x10 "no matching subscribers" when nobody listens). Anything
        # else (properties, PUBCOMP, an unknown reason) goes the stock way.
        packet = self._in_packet["packet"]
        size = len(packet)
        if cmd == "PUBACK" and (
            size == 2 or (self._protocol == paho.MQTTv5 and (size == 3 or (size == 4 and packet[3] == 0)))
        ):
            code = packet[2] if size > 2 else 0
            reason = _PUBACK_REASONS.get(code)
            if reason is None:
                try:
                    reason = _PUBACK_REASONS[code] = ReasonCode(PacketTypes.PUBACK, identifier=code)
                except KeyError:  # not a PUBACK reason code: paho says so
                    return super()._handle_pubackcomp(cmd)
            mid = (packet[0] << 8) | packet[1]
            with self._out_message_mutex:
                if mid in self._out_messages:
                    return self._do_on_publish(mid, reason, _PUBACK_NO_PROPERTIES)
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return super()._handle_pubackcomp(cmd)


class Connection:
    """The daemon's one broker connection. `start()` returns at once; the state tells the rest."""

    def __init__(
        self,
        config: Any,
        device: Any,
        *,
        agent_version: str | None = None,
        reconnect_min: float = RECONNECT_MIN,
        reconnect_max: float = RECONNECT_MAX,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.device_id: str = device.id
        self.topics = Topics(config.topic_prefix, device.id, getattr(device, "group", "default"))
        self.client_id: str = config.client_id or device.id
        self.agent_version = agent_version
        self.reconnect_min, self.reconnect_max = reconnect_min, reconnect_max
        self._rng, self._clock = rng, clock
        self._protocol = paho.MQTTv311 if config.protocol == "3.1.1" else paho.MQTTv5
        self._protocol_known = config.protocol != "auto"
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._online = threading.Event()
        self._subscribed = threading.Event()
        self._pending_subs: set[int] = set()
        self._thread: threading.Thread | None = None
        self._subs: dict[str, tuple[Handler, int]] = {}
        self._latest: dict[str, bytes] = {}
        self._ack_listeners: list[AckListener] = []
        self._state_listeners: list[Callable[[str, str | None], None]] = []
        self._loop_hooks: list[Callable[[], None]] = []
        self.state = STOPPED
        self.error: str | None = None
        self.generation = 0
        self.inflight_limit = DEFAULT_INFLIGHT
        self.connected_since: float | None = None
        self.connects = 0
        self._attempt_log: str | None = None
        self._logged_error: str | None = None
        self._got_connack = False
        self._client = self._make_client()

    # ---- the API the daemon uses ---------------------------------------------------------------

    @property
    def protocol(self) -> str:
        return "5" if self._protocol == paho.MQTTv5 else "3.1.1"

    @property
    def online(self) -> bool:
        return self._online.is_set()

    @property
    def alive(self) -> bool:
        """The network loop thread is running (what the systemd watchdog asks)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Connection:
        if self._thread is None:
            self._stop.clear()
            self._set_state(CONNECTING, None)
            self._thread = threading.Thread(target=self._run, name="mqtt-connection", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Publish `offline` ourselves (a clean disconnect suppresses the Will), then disconnect."""
        if self._thread is None:
            return
        if self.online:
            info = self._client.publish(
                self.topics.status, self._status_payload(OFFLINE, "stopped"), qos=1, retain=True
            )
            deadline = time.monotonic() + min(timeout, 2.0)
            try:
                while self.online and not info.is_published() and time.monotonic() < deadline:
                    time.sleep(0.01)
            except RuntimeError:  # paho raises once the connection is gone; the Will covers it then
                pass
        self._stop.set()
        try:
            self._client.disconnect()
        except Exception:  # noqa: BLE001 (shutting down; the socket may already be gone)
            pass
        self._thread.join(timeout)
        self._thread = None
        self._online.clear()
        self._set_state(STOPPED, None)

    def wait_online(self, timeout: float) -> bool:
        """Connected, and every subscription acknowledged (commands sent after this reach us)."""
        deadline = time.monotonic() + timeout
        return self._online.wait(timeout) and self._subscribed.wait(max(0.0, deadline - time.monotonic()))

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Remembered and re-subscribed on every connect. `handler` runs on the network thread: keep it tiny."""
        with self._lock:
            self._subs[topic_filter] = (handler, qos)
        if self.online:
            self._client.subscribe(topic_filter, qos)

    def publish(
        self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False, properties: Properties | None = None
    ) -> int | None:
        """Publish now if online and return the mid; None when offline (nothing is queued)."""
        if not self.online:
            return None
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
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
        """`hook()` on the network thread after every turn of paho's loop while a socket is open."""
        self._loop_hooks.append(hook)

    def wake(self) -> None:
        """Cut short the network thread's wait in select(), so that a hook runs now."""
        # paho's own wake-up socket pair (what publish() uses from other threads).
        sock = getattr(self._client, "_sockpairW", None)
        if sock is not None:
            try:
                sock.send(b"0")
            except OSError:
                pass

    def add_state_listener(self, listener: Callable[[str, str | None], None]) -> None:
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
        kwargs: dict[str, Any] = {
            "callback_api_version": CallbackAPIVersion.VERSION2,
            "client_id": self.client_id,
            "protocol": self._protocol,
            "reconnect_on_failure": False,
        }
        if self._protocol != paho.MQTTv5:
            kwargs["clean_session"] = True
        client = _AgentClient(**kwargs)
        client.connect_timeout = CONNECT_TIMEOUT
        client.max_queued_messages_set(0)
        client.max_inflight_messages_set(DEFAULT_INFLIGHT)
        client.will_set(self.topics.status, self._status_payload(OFFLINE, "connection lost"), qos=1, retain=True)
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
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _status_payload(self, state: str, reason: str | None = None) -> bytes:
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

    def _set_state(self, state: str, error: str | None) -> None:
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
        while not self._stop.is_set():
            self._attempt_log, self._got_connack = None, False
            outcome = self._connect_once()
            if self._stop.is_set():
                break
            if outcome == "was_online":
                attempt = 0
            delay = backoff(attempt, self.reconnect_min, self.reconnect_max, self._rng)
            attempt += 1
            self._stop.wait(delay)

    def _connect_once(self) -> str:
        client = self._client
        password = None
        try:
            password = self.config.secret()
        except OSError as exc:
            self._set_state(REFUSED, f"cannot read mqtt.password_file: {exc.strerror or exc}")
            return "failed"
        if self.config.username or password:
            client.username_pw_set(self.config.username, password)
        # paho's log tells why a connection ended before CONNACK (a TLS alert, a reset). Only until
        # CONNACK: with a log callback set, paho formats a line for every packet (measured: a third of
        # the network thread's calls).
        client.on_log = self._on_log
        client.loop_started()  # only this thread writes to the socket from now on (see _AgentClient)
        try:
            try:
                if self._protocol == paho.MQTTv5:
                    client.connect(self.config.host, self.config.port, int(self.config.keepalive), clean_start=True)
                else:
                    client.connect(self.config.host, self.config.port, int(self.config.keepalive))
            except ssl.SSLCertVerificationError as exc:
                self._set_state(
                    REFUSED,
                    f"TLS: the broker's certificate is not trusted: {exc.verify_message or exc} "
                    "(mqtt.tls.ca must be the CA that signed it, and the URL host must match it)",
                )
                return "failed"
            except ssl.SSLError as exc:
                self._set_state(REFUSED, f"TLS handshake failed: {_ssl_reason(exc)}{_cert_hint(str(exc))}")
                return "failed"
            except OSError as exc:
                self._set_state(OFFLINE, f"cannot reach {self.config.host}:{self.config.port}: {exc.strerror or exc}")
                return "failed"
            rc = MQTTErrorCode.MQTT_ERR_SUCCESS
            # paho's timeout covers the TCP connect only; a broker that accepts and then never answers
            # (amqtt does this to an MQTT 5 CONNECT with a Will) would leave us "connecting" for ever.
            connack_deadline = time.monotonic() + CONNECT_TIMEOUT
            while not self._stop.is_set() and rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                if not self._got_connack and time.monotonic() > connack_deadline:
                    self._attempt_log = f"no answer to CONNECT within {CONNECT_TIMEOUT:g} s"
                    break
                rc = client.loop(timeout=0.0 if client.read_ahead else LOOP_TIMEOUT)
                if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and client.read_ahead:
                    # paho stops reading after as many packets as it has messages pending; what it left in
                    # the read-ahead buffer is invisible to select() and is read now, not when more arrives.
                    rc = client.loop_read()
                for hook in self._loop_hooks:
                    try:
                        hook()
                    except Exception:  # a failing hook must not end the connection
                        log.exception("mqtt: network-thread hook failed")
            was_online = self.online
            self._went_offline()
            if self._stop.is_set():
                return "stopped"
            if not self._got_connack:
                self._no_connack()
            elif self.state not in (REFUSED,):
                self._set_state(OFFLINE, f"connection lost ({paho.error_string(rc)})")
            return "was_online" if was_online else "failed"
        finally:
            client.loop_ended()

    def _no_connack(self) -> None:
        """The connection ended before any CONNACK: a TLS rejection, or a broker that dislikes MQTT 5."""
        detail = self._attempt_log or "the broker closed the connection"
        if "SSL" in detail or "alert" in detail.lower():
            self._set_state(
                REFUSED, f"TLS: the broker rejected this device's certificate: {detail}{_cert_hint(detail)}"
            )
            return
        if not self._protocol_known and self.connects == 0:
            self._switch_protocol()
        self._set_state(OFFLINE, f"no CONNACK from {self.config.host}:{self.config.port}: {detail}")

    def _switch_protocol(self) -> None:
        self._protocol = paho.MQTTv311 if self._protocol == paho.MQTTv5 else paho.MQTTv5
        log.info("mqtt: trying MQTT %s", self.protocol)
        with self._lock:
            self._client = self._make_client()
            self.generation += 1

    def _went_offline(self) -> None:
        self._subscribed.clear()
        if self._online.is_set():
            self._online.clear()
            self.connected_since = None

    # paho callbacks: tiny, never raising (an exception here can end the network loop).

    def _on_log(self, client: paho.Client, userdata: Any, level: int, buf: str) -> None:
        if level in (paho.MQTT_LOG_ERR, paho.MQTT_LOG_WARNING):
            self._attempt_log = buf
            log.debug("paho: %s", buf)

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Properties | None
    ) -> None:
        self._got_connack = True
        client.on_log = None
        if reason.is_failure:
            code = reason.value if self._protocol == paho.MQTTv5 else _V311_TO_V5.get(reason.value, reason.value)
            if code == 0x84 and not self._protocol_known and self.connects == 0:
                self._switch_protocol()
                self._set_state(OFFLINE, "the broker refused MQTT 5; trying 3.1.1")
                return
            hint = _REFUSAL_HINTS.get(code, str(reason))
            self._set_state(REFUSED, f"the broker refused the connection: {hint} (reason {code:#04x} {reason})")
            return
        limit = DEFAULT_INFLIGHT
        if properties is not None and hasattr(properties, "ReceiveMaximum"):
            limit = int(properties.ReceiveMaximum)
        self.inflight_limit = limit
        # paho refuses max_inflight_messages_set() once connected, but honours the attribute from here
        # on; exceeding the broker's Receive Maximum gets the connection closed (MQTT 5, 3.3.4).
        client._max_inflight_messages = limit  # noqa: SLF001
        self._protocol_known = True
        self.connects += 1
        self.connected_since = self._clock()
        client.publish(self.topics.status, self._status_payload(ONLINE), qos=1, retain=True)
        with self._lock:
            subs = list(self._subs.items())
            latest = list(self._latest.items())
        self._subscribed.clear()
        self._pending_subs = set()
        for topic_filter, (_handler, qos) in subs:
            _rc, mid = client.subscribe(topic_filter, qos)
            if mid is not None:
                self._pending_subs.add(mid)
        if not self._pending_subs:
            self._subscribed.set()
        for topic, payload in latest:
            client.publish(topic, payload, qos=1, retain=True)
        self._online.set()
        self._set_state(ONLINE, None)

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: list[ReasonCode], properties: Properties | None
    ) -> None:
        failed = [r for r in reasons if r.is_failure]
        if failed:
            log.error("mqtt: the broker refused a subscription (%s); check its ACL for this device", failed[0])
        self._pending_subs.discard(mid)
        if not self._pending_subs:
            self._subscribed.set()

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Properties | None
    ) -> None:
        self._went_offline()

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Properties | None
    ) -> None:
        ok = not reason.is_failure
        for listener in self._ack_listeners:
            try:
                listener(mid, ok)
            except Exception:
                log.exception("mqtt ack listener failed")

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        props = getattr(message, "properties", None)
        incoming = Incoming(
            topic=message.topic,
            payload=bytes(message.payload),
            qos=message.qos,
            retain=bool(message.retain),
            response_topic=getattr(props, "ResponseTopic", None) if props else None,
            correlation_data=getattr(props, "CorrelationData", None) if props else None,
            user_properties=tuple(getattr(props, "UserProperty", ()) or ()) if props else (),
        )
        with self._lock:
            handlers = [h for f, (h, _q) in self._subs.items() if paho.topic_matches_sub(f, message.topic)]
        for handler in handlers:
            try:
                handler(incoming)
            except Exception:  # a bad message must never end the network thread
                log.exception("mqtt: handler for %s failed", message.topic)


def _ssl_reason(exc: ssl.SSLError) -> str:
    return exc.reason.replace("_", " ").lower() if getattr(exc, "reason", None) else str(exc)


def _cert_hint(text: str) -> str:
    lowered = text.lower()
    if (
        "unknown ca" in lowered
        or "bad certificate" in lowered
        or "certificate required" in lowered
        or "certificate unknown" in lowered
    ):
        return " (mqtt.tls.cert must be signed by a CA the broker trusts, and tls.key must match it)"
    return ""


def reply_properties(correlation_data: bytes | None) -> Properties | None:
    if correlation_data is None:
        return None
    props = Properties(PacketTypes.PUBLISH)
    props.CorrelationData = correlation_data
    return props


class OutboxPump:
    """Moves the outbox to the broker in order; a message leaves the outbox only on its PUBACK.

    Its steps run on the connection's network thread, right after paho's loop: the PUBACKs just read
    are turned into outbox acks and the window is refilled with no thread switch per message
    (measured: a separate pump thread ran at half of bare paho's rate on a loaded two-core machine).
    A small thread of its own fsyncs the log and drops expired messages, online or not.
    """

    def __init__(self, connection: Connection, outbox: Outbox, *, window: int = PUMP_WINDOW, batch: int = 200) -> None:
        self.connection, self.outbox = connection, outbox
        self.window = window
        self.batch = batch
        self._stop = threading.Event()
        self._acks: deque[tuple[int, bool]] = deque()
        self._inflight: dict[int, tuple[int, float]] = {}  # mid -> (outbox id, sent at), oldest first
        self._cursor = 0
        self._generation = connection.generation
        self._was_online = False
        self._idle = True  # nothing to send: only then does a put need to wake the network thread
        self._thread: threading.Thread | None = None
        self._started = False
        self.published = 0
        self.rejected = 0
        connection.add_ack_listener(self._on_ack)
        connection.add_loop_hook(self._hook)
        outbox.add_listener(self._nudge)

    def start(self) -> OutboxPump:
        self._started = True
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._maintain, name="outbox-sync", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._started = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.outbox.sync_if_due(force=True)

    def flush(self, timeout: float) -> bool:
        """Wait until the outbox is empty (every message acknowledged); False on timeout."""
        deadline = time.monotonic() + timeout
        while self.outbox.depth and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.outbox.depth == 0

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def _nudge(self) -> None:
        if self._idle and self._started:
            self._idle = False
            self.connection.wake()

    def _on_ack(self, mid: int, ok: bool) -> None:
        self._acks.append((mid, ok))

    def _maintain(self) -> None:
        last_prune = time.monotonic()
        while not self._stop.wait(0.2):
            try:
                self.outbox.sync_if_due()
                if time.monotonic() - last_prune > 5.0:
                    last_prune = time.monotonic()
                    self.outbox.prune()
            except Exception:  # a full disk must not end fsyncs for good
                log.exception("outbox: sync failed")

    def _hook(self) -> None:
        if self._started:
            self.step()

    def step(self) -> None:
        """One turn: acks to the outbox, then publish up to the window. Network thread only."""
        conn = self.connection
        if conn.generation != self._generation:
            # A new paho client: whatever the old one held in memory is gone; start again from the oldest.
            self._generation = conn.generation
            self._inflight.clear()
            self._acks.clear()
            self._cursor = 0
        if len(self._inflight) > self.window // 2 and len(self._acks) < ACK_BATCH and conn.online:
            return  # paho still holds plenty: refill and record acks in batches, not per packet
        self._drain_acks()
        online = conn.online
        if online and not self._was_online and self._inflight:
            # paho resends what it holds on reconnect; give those a fresh deadline.
            now = time.monotonic()
            self._inflight = {mid: (msg_id, now) for mid, (msg_id, _sent) in self._inflight.items()}
        self._was_online = online
        if not online:
            self._idle = True
            return
        self._resend_stale()
        while len(self._inflight) < self.window and self.outbox.last_id > self._cursor:
            messages = self.outbox.peek(self._cursor, min(self.batch, self.window - len(self._inflight)))
            if not messages:
                self._cursor = self.outbox.last_id
                break
            now = time.monotonic()
            qos0: list[int] = []
            # (On the network thread paho only queues these, without a wake-up byte: _AgentClient.)
            for msg in messages:
                mid, accepted = conn.publish_raw(msg.topic, msg.payload, msg.qos, msg.retain)
                if not accepted:
                    break
                self._cursor = msg.id
                self.published += 1
                if msg.qos == 0:
                    # QoS 0 has no acknowledgement: handed over (written on this turn of the loop) is as
                    # delivered as it gets.
                    qos0.append(msg.id)
                else:
                    self._inflight[mid] = (msg.id, now)
            if qos0:
                self.outbox.ack(qos0)
        self._idle = not self._inflight and self.outbox.last_id <= self._cursor

    def _drain_acks(self) -> None:
        done: list[int] = []
        rejected = 0
        while self._acks:
            mid, ok = self._acks.popleft()
            entry = self._inflight.pop(mid, None)
            if entry is None:
                continue  # a direct publish (status, health, reply), not ours
            done.append(entry[0])
            if not ok:
                rejected += 1
        if rejected:
            self.rejected += rejected
            log.error(
                "outbox: the broker rejected %d message(s) (not authorised?); they are dropped and counted", rejected
            )
        if done:
            self.outbox.ack(done, rejected=rejected)

    def _resend_stale(self) -> None:
        if not self._inflight:
            return
        _id, oldest = next(iter(self._inflight.values()))
        if time.monotonic() - oldest > RESEND_AFTER:
            log.warning(
                "outbox: %d message(s) unacknowledged for %.0f s; publishing them again",
                len(self._inflight),
                RESEND_AFTER,
            )
            self._inflight.clear()
            self._cursor = 0
