"""The pump that empties the durable outbox through the broker connection.

`OutboxPump` publishes the outbox in order, keeps a window of messages in flight, and removes a message
from the outbox only when its PUBACK arrives. Nothing that matters is published straight from a
producer: results and events go through the outbox; only things whose latest value is all that counts
(status, health, command replies) are published directly.

It keeps to what the broker takes (agent/transport/limits.py): QoS lowered to the broker's maximum, retain
dropped where it keeps nothing, a message too large for it refused (acknowledged as rejected, counted and
logged: sent, it would get the connection closed), and, under a preset's publish rate, no more publishes
in any second than the rate allows (direct publishes count too; the rest waits its turn in the outbox).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from agent.transport.connection import Connection
from agent.transport.outbox import Outbox
from agent.util.worker import Worker

log = logging.getLogger(__name__)

# Messages the pump hands to paho ahead of their acknowledgements. paho sends them as the broker's
# window allows, from its own network thread, with no thread switch per message (measured: a window of
# 16 refilled by the pump thread ran at a quarter of bare paho's rate).
PUMP_WINDOW = 1000
# Messages read from the outbox at a time.
PEEK_BATCH = 200
# Acknowledgements recorded in the outbox together (while paho still holds half a window to send).
ACK_BATCH = 200
# A message in flight this long on a live connection is published again (paho normally resends on
# reconnect by itself; this is the safety net should its in-memory state ever be lost).
RESEND_AFTER = 60.0
# How often the maintenance thread fsyncs (as due) and drops expired messages.
SYNC_TICK = 0.2
PRUNE_INTERVAL = 5.0


class OutboxPump:
    """Moves the outbox to the broker in order; a message leaves the outbox only on its PUBACK.

    Its steps run on the connection's network thread, right after each turn of its loop: the PUBACKs
    just read are turned into outbox acks and the window is refilled with no thread switch per message
    (measured: a separate pump thread ran at half of bare paho's rate on a loaded two-core machine).
    A small thread of its own fsyncs the log and drops expired messages, online or not.
    """

    def __init__(
        self,
        connection: Connection,
        outbox: Outbox,
        *,
        window: int = PUMP_WINDOW,
        batch: int = PEEK_BATCH,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.connection, self.outbox = connection, outbox
        self._clock = clock
        self.window = window
        self.batch = batch
        self._acks: deque[tuple[int, bool]] = deque()
        self._inflight: dict[int, tuple[int, float]] = {}  # mid -> (outbox id, sent at), oldest first
        self._cursor = 0
        self._generation = connection.generation
        self._was_online = False
        self._idle = True  # nothing to send: only then does a put need to wake the network thread
        self._worker = Worker("outbox-sync", self._maintain)
        self.published = 0
        self.rejected = 0
        connection.add_ack_listener(self._on_ack)
        connection.add_loop_hook(self._hook)
        outbox.add_listener(self._nudge)

    def start(self) -> OutboxPump:
        self._worker.start()
        return self

    def stop(self) -> None:
        self._worker.stop()
        self.outbox.sync_if_due(force=True)

    def flush(self, timeout: float) -> bool:
        """Wait until the outbox is empty (every message acknowledged); False on timeout."""
        deadline = time.monotonic() + timeout
        while self.outbox.depth and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.outbox.depth == 0

    def _nudge(self) -> None:
        if self._idle and self._worker.started:
            self._idle = False
            self.connection.wake()

    def _on_ack(self, mid: int, ok: bool) -> None:
        self._acks.append((mid, ok))

    def _maintain(self) -> None:
        last_prune = time.monotonic()
        while not self._worker.stopping.wait(SYNC_TICK):
            try:
                self.outbox.sync_if_due()
                if time.monotonic() - last_prune > PRUNE_INTERVAL:
                    last_prune = time.monotonic()
                    self.outbox.prune()
            except Exception:  # a full disk must not end fsyncs for good
                log.exception("outbox: sync failed")

    def _hook(self) -> None:
        if self._worker.started:
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
            now = self._clock()
            self._inflight = {mid: (msg_id, now) for mid, (msg_id, _sent) in self._inflight.items()}
        self._was_online = online
        if not online:
            self._idle = True
            return
        self._resend_stale()
        limits, rate = conn.limits, conn.rate
        paced = False
        while not paced and len(self._inflight) < self.window and self.outbox.last_id > self._cursor:
            messages = self.outbox.peek(self._cursor, min(self.batch, self.window - len(self._inflight)))
            if not messages:
                self._cursor = self.outbox.last_id
                break
            now = self._clock()
            qos0: list[int] = []
            refused: list[int] = []
            # On the network thread paho only queues these; they are written at the next turn (netloop).
            for msg in messages:
                qos = limits.qos(msg.qos)
                too_large = limits.too_large(msg.topic, len(msg.payload), qos)
                if too_large:
                    log.error("outbox: a message to %s is %s: refused and counted", msg.topic, too_large)
                    refused.append(msg.id)
                    self._cursor = msg.id
                    continue
                if rate is not None and not rate.allow(len(msg.payload)):
                    paced = True  # the rest goes out in a later second
                    break
                mid, accepted = conn.publish_raw(msg.topic, msg.payload, qos, msg.retain and limits.retain)
                if not accepted:
                    break
                self._cursor = msg.id
                self.published += 1
                if qos == 0:
                    # QoS 0 has no acknowledgement: handed over (written on the next turn of the loop) is as
                    # delivered as it gets.
                    qos0.append(msg.id)
                else:
                    self._inflight[mid] = (msg.id, now)
            if qos0:
                self.outbox.ack(qos0)
            if refused:
                self.rejected += len(refused)
                self.outbox.ack(refused, rejected=len(refused))
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
        if self._clock() - oldest > RESEND_AFTER:
            log.warning(
                "outbox: %d message(s) unacknowledged for %.0f s; publishing them again",
                len(self._inflight),
                RESEND_AFTER,
            )
            self._inflight.clear()
            self._cursor = 0
