"""Deployment orders as they arrive, carried out one at a time and in arrival order.

Orders come on retained topics (the device's and its group's): only the latest payload of each topic
counts, so a topic's newer payload replaces one not yet carried out (a flood of orders costs one slot
per topic, never a thread each) and moves to the back, behind what arrived before it. One thread in
arrival order matters: a passed canary's group order, then the withdrawal of its own order, must be
carried out in that order, or the canary goes back to its channel's version in between.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from agent.util.worker import Worker

log = logging.getLogger(__name__)


class OrderInbox:
    def __init__(self, apply: Callable[[str, bytes], None]) -> None:
        """`apply(topic, payload)` carries one order out (on the inbox's thread)."""
        self._apply = apply
        self._waiting: dict[str, bytes] = {}  # topic -> latest payload, oldest first
        self._cond = threading.Condition()
        self._worker = Worker("deploy", self._run, wake=self._wake)

    def put(self, topic: str, payload: bytes) -> None:
        """From the network thread: never blocks on the order being carried out."""
        with self._cond:
            self._waiting.pop(topic, None)  # re-inserted: it goes behind what arrived before it
            self._waiting[topic] = payload
            self._cond.notify()

    def start(self) -> OrderInbox:
        self._worker.start()
        return self

    def stop(self) -> None:
        self._worker.stop()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _run(self) -> None:
        stopping = self._worker.stopping
        while True:
            with self._cond:
                while not self._waiting and not stopping.is_set():
                    self._cond.wait()
                if stopping.is_set():
                    return
                topic = next(iter(self._waiting))
                payload = self._waiting.pop(topic)
            try:
                self._apply(topic, payload)
            except Exception:  # one order that fails unexpectedly must not stop the next ones
                log.exception("deployment order on %s failed", topic)
