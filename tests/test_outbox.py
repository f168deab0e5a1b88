"""The durable outbox and the sink that feeds it: pure units on a temp directory, no broker."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.config.profile import OutboxConfig
from agent.transport.events import Event
from agent.transport.outbox import Outbox, open_outbox
from agent.transport.outbox.record import parse
from agent.transport.sinks.outbox import OutboxSink
from agent.transport.topics import Topics

pytestmark = pytest.mark.arm64
REPO = Path(__file__).resolve().parent.parent


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
    activated = {"model": "m", "version": "1.0", "variant": "fp32", "provider": "CPU", "previous": None}
    sink.event(Event("model.activated", activated, ts=1_800_000_000.0))
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


# ---- the lock is never held across a flush or a preallocation -----------------------------------


class SlowDisk:
    """Stands in for an SD card: the named os calls, made on a thread named `slow-disk`, wait until the
    test lets them go. Calls from other threads go straight through."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
        self.entered = threading.Event()
        self.go = threading.Event()
        self.calls: list[str] = []
        for name in names:
            real = getattr(os, name)

            def slow(*args: int, _real: Callable[..., None] = real, _name: str = name) -> None:
                if threading.current_thread().name == "slow-disk":
                    self.calls.append(_name)
                    self.entered.set()
                    self.go.wait(10)
                _real(*args)

            monkeypatch.setattr(os, name, slow)

    def on_its_thread(self, work: Callable[[], object]) -> threading.Thread:
        thread = threading.Thread(target=work, name="slow-disk", daemon=True)
        thread.start()
        assert self.entered.wait(10), "the slow call never came"
        return thread


def finishes_beside(work: Callable[[], object]) -> bool:
    """Whether `work` completes on another thread while the slow disk call is still waiting. Blocked on
    the outbox lock it would wait for the test to release the disk, so this waits 5 s before saying no."""
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(5)
    return not thread.is_alive()


def fill(box: Outbox, n: int) -> Callable[[], None]:
    return lambda: [box.put("t", b"x" * 500) for _ in range(n)] and None


@pytest.mark.parametrize(
    "call, moment",
    [
        ("posix_fallocate", "the next segment is preallocated ahead, at half the active one"),
        ("fsync", "a rolled segment is cut to its length and flushed"),
    ],
)
def test_a_roll_neither_preallocates_nor_flushes_under_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str, moment: str
) -> None:
    box = Outbox(tmp_path, max_bytes=256 * 1024)  # 32 KiB segments: a roll every ~60 puts of 500 bytes
    first = box.put("t", b"first")
    disk = SlowDisk(monkeypatch, call)
    producer = disk.on_its_thread(fill(box, 200))
    # The network thread reads and acknowledges, and another producer puts, while that call waits.
    ok = finishes_beside(lambda: (box.peek(0, 10), box.ack([first]), box.put("t", b"beside")))
    disk.go.set()
    producer.join(10)
    assert ok, f"blocked while {moment} ({disk.calls})"
    assert box.depth == 201 and len(drain(box)) == 201
    box.close()


def test_the_periodic_sync_does_not_flush_under_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = Outbox(tmp_path)
    ids = [box.put("t", b"m") for _ in range(10)]
    disk = SlowDisk(monkeypatch, "fdatasync")
    syncer = disk.on_its_thread(lambda: box.sync_if_due(force=True))
    ok = finishes_beside(lambda: (box.peek(0, 10), box.ack(ids[:5]), box.put("t", b"beside")))
    disk.go.set()
    syncer.join(10)
    assert ok, f"blocked while the maintenance thread flushed ({disk.calls})"
    assert box.depth == 6
    box.close()


def test_acknowledged_segments_are_deleted_off_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unlink waits on the file system's journal (measured: 180 ms on a busy disk): the network thread's
    acks only queue the files, and the next sync removes them."""
    box = Outbox(tmp_path, max_bytes=256 * 1024)
    fill(box, 200)()
    drain(box)
    assert len(list(tmp_path.glob("seg-*.log"))) > 1  # still there: nothing flushed since
    disk = SlowDisk(monkeypatch, "unlink")
    syncer = disk.on_its_thread(lambda: box.sync_if_due(force=True))
    ok = finishes_beside(lambda: (box.put("t", b"beside"), box.ack([m.id for m in box.peek(0, 10)])))
    disk.go.set()
    syncer.join(10)
    assert ok, f"blocked while a deleted segment's file was removed ({disk.calls})"
    assert len(list(tmp_path.glob("seg-*.log"))) == 1 and box.depth == 0
    box.close()


def test_flushing_every_record_does_not_stop_the_network_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = Outbox(tmp_path, fsync_interval=0)
    ids = [box.put("t", b"m") for _ in range(3)]
    disk = SlowDisk(monkeypatch, "fdatasync")
    producer = disk.on_its_thread(lambda: box.put("t", b"flushed"))
    ok = finishes_beside(lambda: (box.peek(0, 10), box.ack(ids)))
    disk.go.set()
    producer.join(10)
    assert ok, "peek/ack blocked while a put flushed its record"
    assert [m.payload for m in box.peek(0, 10)] == [b"flushed"]
    box.close()


def test_flushing_every_record_reaches_the_device_before_put_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Across rolls: the record, the segment it rolled from and the directory are flushed in the put."""
    flushed: list[str] = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda fd, _real=real, _name=name: (flushed.append(_name), _real(fd))[1])
    box = Outbox(tmp_path, max_bytes=128 * 1024, fsync_interval=0)  # 16 KiB segments
    for i in range(100):
        flushed.clear()
        box.put("t", b"x" * 500)
        assert "fdatasync" in flushed, i
    assert len(list(tmp_path.glob("seg-*.log"))) > 2  # it rolled
    box.close()


# ---- crash safety with rolls -------------------------------------------------------------------


def test_a_gap_left_by_a_power_cut_at_a_roll_is_counted_as_gone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The rolled segment's last records did not reach the device, the new segment's did."""
    box = Outbox(tmp_path, max_bytes=128 * 1024)
    for _ in range(80):  # over two 16 KiB segments
        box.put_sequenced("results/p", "t", lambda seq: json.dumps({"seq": seq, "pad": "x" * 400}).encode())
    box.close()
    first_seg = sorted(tmp_path.glob("seg-*.log"))[0]
    data = first_seg.read_bytes()
    ends, pos = [], 0
    while (rec := parse(data, pos)) is not None:
        ends.append(rec.end)
        pos = rec.end
    first_seg.write_bytes(data[: ends[-4]])  # its last three records lost
    box = Outbox(tmp_path)
    assert "3 message(s) before a segment roll were lost in a power cut" in caplog.text
    seqs = [json.loads(m.payload)["seq"] for m in box.peek(0, 1000)]
    assert len(seqs) == 77 == box.depth and seqs == sorted(seqs) and 80 in seqs
    drain(box)
    box.sync_if_due(force=True)  # acknowledged segments' files go off the lock, at the next sync
    assert box.depth == 0 and len(list(tmp_path.glob("seg-*.log"))) == 1  # all released
    box.close()
    assert Outbox(tmp_path).depth == 0


CHILD = """
import sys
from agent.transport.outbox import Outbox
box = Outbox(sys.argv[1], max_bytes=2 * 1024 * 1024)  # 256 KiB segments: a roll every ~700 puts
while True:
    _id, seq = box.put_sequenced("results/p", "t", lambda s: b"%d:" % s + b"x" * 300)
    print(seq, flush=True)
"""


@pytest.mark.slow
def test_kill_9_while_segments_roll_loses_nothing_that_was_put(tmp_path: Path) -> None:
    """A producer killed at random moments, across rolls, spares and segments not yet cut."""
    rng = random.Random(15)
    expected_next = 1
    for _round in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert proc.stdout is not None
        stop_at, reported = expected_next + rng.randrange(300, 2500), 0
        for line in proc.stdout:
            reported = int(line)
            if reported >= stop_at:
                break
        proc.send_signal(signal.SIGKILL)
        for line in proc.stdout:  # what it printed before the signal landed
            reported = int(line)
        proc.wait()
        box = Outbox(tmp_path)
        seqs = [int(m.payload.split(b":")[0]) for m in box.peek(0, 100_000)]
        assert seqs == list(range(expected_next, seqs[-1] + 1)) and seqs[-1] >= reported
        assert box.last_seq("results/p") == seqs[-1] and box.dropped == 0
        drain(box)
        box.close()
        assert not list(tmp_path.glob(".spare-*"))
        expected_next = seqs[-1] + 1
