"""A faster paho client for the outbox path, fenced: stock paho wherever its private surface differs.

Profiled with py-spy on bench/bench_outbox.py (80,000 results), the network thread of stock paho spent
about 40% of its samples in send()/recv() and 25% decoding PUBACKs: with one interpreter lock, every
system call hands the lock to the producing thread and waits to get it back. `_AgentClient` overrides
three private methods of paho's Client:

- `_packet_write` joins the queued packets into one send() (up to COALESCE_BYTES);
- `_sock_recv` takes what the socket holds in one recv() and serves paho's small reads from it;
- `_handle_pubackcomp` decodes a PUBACK without properties with shared reason objects;
- `_handle_publish` decodes an MQTT 5 QoS 0 PUBLISH without properties with one shared empty property
  set: paho builds and clears a Properties object per message, half its time per message
  (`fleet status` reads 20,000 retained messages at 10,000 devices);

and `adopt_receive_maximum` sets the in-flight window on a live connection (paho's public setter refuses
once connected; the broker's Receive Maximum only arrives in CONNACK, and exceeding it gets the
connection closed, MQTT 5 3.3.4). "Only the network thread writes the socket" needs no patch: it is
paho's public external-loop API (agent/transport/netloop.py).

The fence: at import, `surface_differences()` compares what the patch relies on with the installed
paho: the names and signatures (parameter names, kinds and defaults; not annotations, which paho 2.2
rewrote without changing behaviour) of the methods it overrides or calls, and the private attributes it
reads or writes, on a constructed client. When anything differs, one warning names it and
`CLIENT_CLASS` is stock `paho.Client`: the agent works as before, slower. pyproject pins paho to the
minor releases the suite has run against (scripts/test-paho.sh runs it against the lowest).
"""

from __future__ import annotations

import collections
import inspect
import logging
from typing import Literal

import paho.mqtt.client as paho
from paho import mqtt as paho_package
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger(__name__)

PAHO_VERSION: str = paho_package.__version__

# The most bytes of queued packets that _AgentClient joins into one send().
COALESCE_BYTES = 64 * 1024
# What _AgentClient asks of one recv().
RECV_BYTES = 64 * 1024
# Handed to on_publish for PUBACKs without properties (read only: nothing here changes them).
_PUBACK_REASONS: dict[int, ReasonCode] = {}
_PUBACK_NO_PROPERTIES = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]  # paho leaves it unannotated
_PUBLISH_NO_PROPERTIES = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]

# The private methods the patch overrides or calls, as `inspect.signature` shows them without annotations.
METHODS = {
    "_packet_write": "(self)",
    "_sock_recv": "(self, bufsize)",
    "_handle_pubackcomp": "(self, cmd)",
    "_do_on_publish": "(self, mid, reason_code, properties)",
    "_handle_publish": "(self)",
    "_handle_on_message": "(self, message)",
    "_packet_queue": "(self, command, packet, mid, qos, info=None)",  # makes the entries _packet_write joins
}
MESSAGE_INIT = "(self, mid=0, topic=b'')"
# The keys of a queued packet (paho's _OutPacket), which _packet_write builds one of.
OUT_PACKET_KEYS = frozenset({"command", "mid", "qos", "pos", "to_process", "packet", "info"})


class _AgentClient(paho.Client):
    """paho's client with far fewer system calls and objects per message on the network thread.

    Together (with the sink's reused JSON encoder): the bench's agent/bare ratio of medians went from
    0.63-0.83 to 1.27-1.66 in alternated runs, the drain alone from 5,700-7,800 to 13,500-17,300
    results/s; the network thread's samples for 80,000 results from 11,340 to 6,521 (docs/mqtt.md).
    """

    # Bytes read from the socket ahead of paho's parser, and the socket they came from.
    _ahead: bytes = b""
    _ahead_pos = 0
    _ahead_sock: object = None

    def _packet_write(self) -> MQTTErrorCode:
        # Join the leading run of packets that need nothing after their write (not a QoS 0 PUBLISH, whose
        # on_publish fires once written, nor a DISCONNECT) into one; paho writes it as any packet, partial
        # writes included. Only the network thread gets here (netloop), so nothing else takes from the queue.
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

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> MQTTErrorCode:
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

    def _handle_publish(self) -> MQTTErrorCode:
        # MQTT 5, QoS 0, a topic, no properties (a zero property length): the message as paho makes it, with
        # the shared empty property set. Anything else (QoS 1 and 2, properties, 3.1.1) goes the stock way.
        header = self._in_packet["command"]
        packet = self._in_packet["packet"]
        if self._protocol == paho.MQTTv5 and not header & 0x06 and len(packet) > 2:
            end = 2 + ((packet[0] << 8) | packet[1])
            if 2 < end < len(packet) and packet[end] == 0:
                message = paho.MQTTMessage(0, bytes(packet[2:end]))
                message.retain = bool(header & 0x01)
                message.dup = bool(header & 0x08)
                message.properties = _PUBLISH_NO_PROPERTIES
                message.payload = bytes(packet[end + 1 :])
                message.timestamp = paho.time_func()
                self._handle_on_message(message)
                return MQTTErrorCode.MQTT_ERR_SUCCESS
        return super()._handle_publish()

    def adopt_receive_maximum(self, limit: int) -> None:
        """The broker's Receive Maximum as paho's in-flight window, from CONNACK on (network thread).

        paho reads `_max_inflight_messages` each time it decides whether to send a queued message; its
        setter refuses on a live connection only because changing between 0 (no limit) and a limit is
        untested, and both values here are positive.
        """
        self._max_inflight_messages = limit


def read_ahead(client: paho.Client) -> bool:
    """The patched client holds bytes that select() cannot see (False for stock paho)."""
    return isinstance(client, _AgentClient) and client.read_ahead


def adopt_receive_maximum(client: paho.Client, limit: int) -> bool:
    """Set the in-flight window on a live connection; False where stock paho cannot."""
    if not isinstance(client, _AgentClient):
        return False
    client.adopt_receive_maximum(limit)
    return True


def _shape(method: object) -> str:
    """A signature without its annotations."""
    sig = inspect.signature(method)  # type: ignore[arg-type]  # any callable; a TypeError is a difference
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


def surface_differences(cls: type[paho.Client] = paho.Client) -> list[str]:
    """What differs between `cls` and the private surface the patch was written against; [] if nothing."""
    found: list[str] = []
    for name, expected in METHODS.items():
        method = getattr(cls, name, None)
        if method is None:
            found.append(f"{name} is gone")
            continue
        try:
            shape = _shape(method)
        except (TypeError, ValueError):
            shape = "(no signature)"
        if shape != expected:
            found.append(f"{name}{shape} instead of {name}{expected}")
    message_shape = _shape(paho.MQTTMessage.__init__)
    if message_shape != MESSAGE_INIT:  # _handle_publish makes messages as paho does
        found.append(f"MQTTMessage.__init__{message_shape} instead of MQTTMessage.__init__{MESSAGE_INIT}")
    if not callable(getattr(paho, "time_func", None)):
        found.append("paho.mqtt.client.time_func is gone")
    try:
        found += _attribute_differences(cls)
    except Exception as exc:  # noqa: BLE001 (whatever a changed constructor raises is one more difference)
        found.append(f"probing a client failed: {type(exc).__name__}: {exc}")
    return found


def _attribute_differences(cls: type[paho.Client]) -> list[str]:
    client = cls(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    # Read at run time, not through paho's annotations: this is what a different paho would change.
    attrs: dict[str, object] = vars(client)
    found = [
        f"attribute {name} is gone"
        for name in ("_sock", "_out_packet", "_in_packet", "_out_messages", "_out_message_mutex", "_protocol")
        if name not in attrs
    ]
    if found:
        return found
    mutex, in_packet, out_packet = attrs["_out_message_mutex"], attrs["_in_packet"], attrs["_out_packet"]
    if attrs["_sock"] is not None:
        found.append("_sock is set on a new client")
    if attrs["_protocol"] != paho.MQTTv5:
        found.append("_protocol does not hold the protocol")
    if not isinstance(attrs["_out_messages"], dict):
        found.append(f"_out_messages is a {type(attrs['_out_messages']).__name__}, not a dict")
    if not (hasattr(mutex, "__enter__") and hasattr(mutex, "__exit__")):
        found.append("_out_message_mutex is not a lock")
    if not isinstance(in_packet, dict) or "packet" not in in_packet:
        found.append("_in_packet has no 'packet'")
    if not isinstance(out_packet, collections.deque):
        found.append(f"_out_packet is a {type(out_packet).__name__}, not a deque")
    else:
        # A queued packet's keys, as paho itself makes it (an external loop is set, so nothing is written).
        client.on_socket_register_write = lambda *_args: None
        client._packet_queue(paho.PINGREQ, b"\xc0\x00", 0, 0)
        keys = set(out_packet[-1]) if out_packet else set()
        if keys != OUT_PACKET_KEYS:
            found.append(f"_out_packet entries have keys {sorted(keys)}, not {sorted(OUT_PACKET_KEYS)}")
    # The attribute behind the public in-flight setting, which adopt_receive_maximum writes.
    client.max_inflight_messages = 7
    if attrs.get("_max_inflight_messages") != 7:
        found.append("_max_inflight_messages is not what max_inflight_messages sets")
    return found


def choose_client_class() -> type[paho.Client]:
    """The patched client when paho's private surface is what it expects; stock paho, and one warning, if not."""
    differences = surface_differences()
    if differences:
        log.warning(
            "paho-mqtt %s differs from what agent.transport.pahopatch was written for (%s); using stock paho "
            "(correct, but slower: pin paho as pyproject.toml does, or update the patch)",
            PAHO_VERSION,
            "; ".join(differences),
        )
        return paho.Client
    return _AgentClient


CLIENT_CLASS = choose_client_class()
PATCHED = CLIENT_CLASS is _AgentClient
