"""The durable outbox and the sink that feeds it: pure units on a temp directory, no broker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.config.profile import OutboxConfig
from agent.transport.events import Event
from agent.transport.outbox import Outbox, open_outbox
from agent.transport.sinks.outbox import OutboxSink
from agent.transport.topics import Topics

pytestmark = pytest.mark.arm64


class FakeClock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def drain(box: Outbox) -> list[bytes]:
    out, cursor = [], 0
    while True:
        msgs = box.peek(cursor, 50)
        if not msgs:
            return out
        cursor = msgs[-1].id
        out += [m.payload for m in msgs]
        box.ack([m.id for m in msgs])


def test_order_kept_and_ack_removes(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    ids = [box.put(f"t/{i % 3}", str(i).encode()) for i in range(10)]
    assert ids == sorted(ids) and box.depth == 10
    first = box.peek(0, 4)
    assert [m.payload for m in first] == [b"0", b"1", b"2", b"3"]
    box.ack([first[1].id, first[0].id])  # out of order is fine
    assert box.depth == 8
    assert [m.payload for m in box.peek(0, 100)] == [str(i).encode() for i in range(2, 10)]
    assert drain(box) == [str(i).encode() for i in range(2, 10)]
    assert box.depth == 0


def test_unacked_survive_reopen_and_seq_keeps_rising(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    for _ in range(5):
        box.put_sequenced("results/p", "t", lambda seq: json.dumps({"seq": seq}).encode())
    box.ack([m.id for m in box.peek(0, 2)])
    box.close()  # and the same without close: see test_crash_without_close
    box = Outbox(tmp_path)
    assert [json.loads(m.payload)["seq"] for m in box.peek(0, 100)] == [3, 4, 5]
    drain(box)
    box.close()
    box = Outbox(tmp_path)  # everything delivered and deleted: seq still goes on
    assert box.depth == 0
    _id, seq = box.put_sequenced("results/p", "t", lambda s: b"x")
    assert seq == 6


def test_crash_without_close_keeps_everything(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    for _ in range(100):
        box.put_sequenced("results/p", "t", lambda seq: str(seq).encode())
    # no close, no sync: what a kill -9 leaves (the data went out with write(2)); the kernel would
    # release the lock of the dead process
    import os

    os.close(box._lock_fd)
    again = Outbox(tmp_path)
    assert again.depth == 100 and again.last_seq("results/p") == 100
    assert [m.payload for m in again.peek(0, 1000)] == [str(i).encode() for i in range(1, 101)]


def test_torn_tail_is_cut_and_the_rest_kept(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    for i in range(3):
        box.put("t", f"m{i}".encode())
    box.close()
    seg = sorted(tmp_path.glob("seg-*.log"))[-1]
    with open(seg, "ab") as f:
        f.write(b"\x40\x00\x00\x00garbage")  # a record cut short by a power loss
    box = Outbox(tmp_path)
    assert [m.payload for m in box.peek(0, 10)] == [b"m0", b"m1", b"m2"]
    box.put("t", b"m3")
    box.close()
    assert [m.payload for m in Outbox(tmp_path).peek(0, 10)] == [b"m0", b"m1", b"m2", b"m3"]


def test_bound_keeps_disk_within_max_bytes_and_drops_oldest(tmp_path: Path) -> None:
    bound = 256 * 1024
    box = open_outbox(tmp_path, OutboxConfig(max_bytes=bound))
    payload = b"x" * 500
    for _ in range(2000):  # about 1.1 MB offered to a 256 KiB outbox
        box.put_sequenced(
            "results/p", "edge/dev/p/results", lambda seq: json.dumps({"seq": seq, "pad": payload.decode()}).encode()
        )
        assert box.disk_bytes() <= bound
    stats = box.stats()
    assert stats.dropped > 0 and stats.dropped == stats.dropped_full
    remaining = [json.loads(m.payload)["seq"] for m in box.peek(0, 10_000)]
    assert remaining == list(range(remaining[0], 2001))  # the newest kept, contiguous
    assert remaining[0] == stats.dropped + 1  # exactly the oldest were dropped, and counted
    box.close()
    assert Outbox(tmp_path / "outbox").dropped == stats.dropped  # the count persists


def test_max_age_drops_and_counts(tmp_path: Path) -> None:
    clock = FakeClock()
    box = Outbox(tmp_path, max_bytes=1024 * 1024, max_age=60, clock=clock)
    for _ in range(10):
        box.put("t", b"old")
    clock.t += 61
    box.put("t", b"new")
    assert box.prune() == 10
    assert [m.payload for m in box.peek(0, 100)] == [b"new"]
    assert box.stats().dropped_age == 10 and box.dropped == 10


def test_one_process_per_outbox(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    with pytest.raises(RuntimeError, match="in use by another process"):
        Outbox(tmp_path)
    box.close()
    Outbox(tmp_path).close()


def test_rejected_are_counted(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    ids = [box.put("t", b"m") for _ in range(3)]
    box.ack(ids[:1], rejected=1)
    assert box.stats().rejected == 1 and box.depth == 2


def test_sink_numbers_results_per_pipeline_and_events(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    sink = OutboxSink(box, Topics("edge", "dev1"))
    sink.result("a", {"output": 1, "ts": 1_800_000_000.5}, 1)
    sink.result("b", {"output": 2}, 0)
    sink.result("a", {"output": 3}, 1)
    sink.event(Event("model.activated", {"model": "m", "version": "1.0"}, ts=1_800_000_000.0))
    msgs = box.peek(0, 10)
    bodies = [(m.topic, json.loads(m.payload), m.qos) for m in msgs]
    assert [(t, b["seq"], q) for t, b, q in bodies] == [
        ("edge/dev1/a/results", 1, 1),
        ("edge/dev1/b/results", 1, 0),
        ("edge/dev1/a/results", 2, 1),
        ("edge/dev1/events", 1, 1),
    ]
    first = bodies[0][1]
    assert first["device"] == "dev1" and first["pipeline"] == "a" and first["ts"] == "2027-01-15T08:00:00.500Z"
    assert bodies[3][1]["type"] == "model.activated" and bodies[3][1]["version"] == "1.0"


def test_sink_batches_by_size_and_by_delay(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    sink = OutboxSink(box, Topics("edge", "dev1"), batches={"s": (3, 60.0)})
    for i in range(7):
        sink.result("s", {"output": i}, 1)
    batches = [json.loads(m.payload) for m in box.peek(0, 10)]
    assert [(b["seq"], b["count"]) for b in batches] == [(1, 3), (4, 3)]
    assert [r["seq"] for r in batches[1]["results"]] == [4, 5, 6]
    sink.flush()  # what the flusher does when max_delay passes
    last = json.loads(box.peek(batches[-1]["seq"] and 2, 10)[0].payload)
    assert (last["seq"], last["count"], last["results"][0]["output"]) == (7, 1, 6)
    assert box.last_seq("results/s") == 7


def test_sink_reports_drops_as_an_event(tmp_path: Path) -> None:
    box = open_outbox(tmp_path, OutboxConfig(max_bytes=128 * 1024))
    sink = OutboxSink(box, Topics("edge", "dev1"))
    for _ in range(600):
        sink.result("p", {"pad": "x" * 400}, 1)
    sink.report_drops()
    events = [json.loads(m.payload) for m in box.peek(0, 100_000) if m.topic == "edge/dev1/events"]
    assert events and events[-1]["type"] == "outbox.dropped" and events[-1]["count"] == box.dropped
