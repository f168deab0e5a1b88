"""The network thread's loop: one paho client driven through paho's public external-loop API.

Driven by `loop()`, paho writes a packet the moment any thread queues it, and writes a wake-up byte to
its own socket pair each time: a send() per message from the producing thread, and two threads taking
packets off one queue. With `on_socket_register_write` set (an external loop), paho only queues and
calls back, so the thread running `turn()` is the only one that writes the socket; a packet queued on
that thread just waits for the end of the turn, and one queued elsewhere (health, a command reply)
wakes it once, through a socket pair of our own. The rest is what paho's `loop()` does: select(), then
`loop_read()`, `loop_write()` and `loop_misc()`.

Small packets go out at once: Nagle's algorithm held a command's reply, written right after its PUBACK,
until the broker acknowledged the PUBACK (its delayed ACK: 40 ms; a ping to an agent with little traffic
took 43 ms at the median), so the loop turns it off on each new socket (TCP_NODELAY; what one turn writes
is joined into one send by pahopatch already). The broker's side is the mirror: Mosquitto leaves Nagle on,
so its next small packet (a SUBACK, a marker) waited for this side's delayed ACK of the one before; after
each read the kernel is told to acknowledge at once (Linux TCP_QUICKACK, which does not last by itself).
`fleet status` spent 2 of its 4 s at 10,000 devices in such waits.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode

from agent.transport import pahopatch

_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only


class NetworkLoop:
    """Select, read, write and keepalive for one client at a time; `wake()` from any thread."""

    def __init__(self) -> None:
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._owner: int | None = None  # the thread that runs turn()
        self._tuned: object = None  # the socket whose Nagle is off

    def open(self) -> None:
        if self._wake_r is None:
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)

    def close(self) -> None:
        pair, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), None, None
        for sock in pair:
            if sock is not None:
                sock.close()

    def attach(self, client: paho.Client) -> None:
        """Make `client` queue packets for this loop instead of writing them from the calling thread."""
        client.on_socket_register_write = self._on_register_write

    def wake(self) -> None:
        """Cut short the wait in select() (from any thread)."""
        sock = self._wake_w
        if sock is not None:
            try:
                sock.send(b"\0")
            except OSError:  # full (a wake-up is pending anyway) or closed (stopping)
                pass

    def _on_register_write(self, client: paho.Client, userdata: object, sock: object) -> None:
        if threading.get_ident() != self._owner:
            self.wake()

    def turn(self, client: paho.Client, timeout: float) -> MQTTErrorCode:
        """One turn: wait up to `timeout` for the socket (or a wake-up), read, write, keepalive."""
        sock = client.socket()
        wake = self._wake_r
        if sock is None or wake is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        self._owner = threading.get_ident()
        if sock is not self._tuned:
            self._tuned = sock
            _set_tcp(sock, socket.TCP_NODELAY)
        # Bytes already read (TLS records, the patch's read-ahead) are invisible to select().
        ready = pahopatch.read_ahead(client) or (isinstance(sock, ssl.SSLSocket) and sock.pending() > 0)
        try:
            readable, _w, _x = select.select(
                [sock, wake], [sock] if client.want_write() else [], [], 0.0 if ready else timeout
            )
        except (OSError, ValueError):  # the socket closed under the select
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        if wake in readable:
            try:
                wake.recv(4096)
            except OSError:  # another turn took the bytes
                pass
        if ready or sock in readable:
            rc = client.loop_read()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or client.socket() is None:
                return rc
            _set_tcp(sock, _QUICKACK)
        if client.want_write():
            rc = client.loop_write()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return rc
        return client.loop_misc()


def _set_tcp(sock: object, option: int | None) -> None:
    """Turn a TCP option on; nothing where the platform lacks it or the socket is not TCP (a test's pair)."""
    if option is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, option, 1)  # type: ignore[attr-defined]
        except (OSError, AttributeError):
            pass
