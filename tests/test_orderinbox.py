"""The deployment-order inbox: one thread, arrival order, the latest payload per topic."""

from __future__ import annotations

import threading
import time

import pytest

from agent.models.orderinbox import OrderInbox


def test_orders_are_carried_out_in_arrival_order_and_a_topic_keeps_only_its_latest() -> None:
    done: list[tuple[str, bytes]] = []
    gate = threading.Event()

    def apply(topic: str, payload: bytes) -> None:
        gate.wait(10)  # the first order is slow (a download): the others wait behind it
        done.append((topic, payload))

    inbox = OrderInbox(apply).start()
    try:
        inbox.put("group", b"g1")  # taken at once, then held at the gate
        time.sleep(0.2)
        inbox.put("device", b"d1")
        inbox.put("group", b"g2")
        inbox.put("device", b"")  # replaces d1 and goes behind g2
        threads = threading.active_count()
        for i in range(1000):  # a flood on one topic costs one slot, never a thread each
            inbox.put("group", f"g{i + 3}".encode())
        assert threading.active_count() == threads
        gate.set()
        deadline = time.monotonic() + 10
        while len(done) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        inbox.stop()
    assert done == [("group", b"g1"), ("device", b""), ("group", b"g1002")]


@pytest.mark.logs_exception("a bug in carrying out one order is logged with its traceback, and the next goes on")
def test_an_order_that_fails_unexpectedly_does_not_stop_the_next(caplog: pytest.LogCaptureFixture) -> None:
    done: list[str] = []

    def apply(topic: str, payload: bytes) -> None:
        if payload == b"bad":
            raise RuntimeError("a bug")
        done.append(topic)

    inbox = OrderInbox(apply).start()
    try:
        inbox.put("a", b"bad")
        inbox.put("b", b"good")
        deadline = time.monotonic() + 10
        while not done and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        inbox.stop()
    assert done == ["b"]
    assert "deployment order on a failed" in caplog.text
