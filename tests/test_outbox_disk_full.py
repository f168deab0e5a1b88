"""Issue 17, item 5: a full disk under the state folder. Results that cannot be kept are counted, use up
their `seq` and are reported; the agent starts on a full disk and keeps inferring.

The state folder is a real small file system: a tmpfs the test mounts (the tests run as root in a
container, as CI does). Without the capability to mount, the tests skip and say why.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from agent.config.profile import DeviceConfig, MqttConfig, RuntimeConfig
from agent.device.session import open_session
from agent.transport.connection import Connection
from agent.transport.outbox import Outbox
from agent.transport.outbox.fallback import memory_dir
from agent.transport.pump import OutboxPump
from agent.transport.sinks.outbox import OutboxSink
from agent.transport.topics import Topics
from tests.helpers.broker import Mosquitto, free_port
from tests.helpers.daemon_proc import sensor_csv
from tests.helpers.models import linear_model, save
from tests.helpers.mqtt_client import Subscriber, seqs
from tests.helpers.tcpproxy import TcpProxy
from tests.helpers.waiting import wait_for

REPO = Path(__file__).resolve().parent.parent


def mount_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip()}): needs root in the container")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    yield from mount_tmpfs(tmp_path / "small", "1m")


def fill(disk: Path, leave: int = 0) -> Path:
    """A file that takes every free block of `disk` but `leave` bytes (whole pages); removed to make room."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):  # every block taken: ENOSPC ends it
            pass
    except OSError:
        pass
    finally:
        if leave:
            os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
        os.close(fd)
    return filler


def test_outbox_on_a_full_disk_counts_every_message_it_could_not_keep_and_reopens(small_disk: Path) -> None:
    outbox = Outbox(small_disk / "outbox")
    for _ in range(20_000):  # ~5 MB into 1 MiB
        outbox.put_sequenced("s", "t", lambda seq: b"x" * 250)
    stats = outbox.stats()
    assert outbox.last_seq("s") == 20_000  # every message took its seq, kept or not
    kept, after = 0, 0
    while batch := outbox.peek(after, 1000):
        kept, after = kept + len(batch), batch[-1].id
    assert 0 < kept < 20_000
    assert stats.dropped_disk == stats.dropped == 20_000 - kept  # nothing lost without being counted
    outbox.close()
    # Before the fix the restart on the full disk failed: "cannot reserve 16777216 bytes for a segment".
    again = Outbox(small_disk / "outbox")
    try:
        again.put_sequenced("s", "t", lambda seq: b"y" * 250)
        assert again.last_seq("s") == 20_001 and again.stats().dropped_disk >= stats.dropped_disk
    finally:
        again.close()


def stay_root() -> str:
    return "user root\n" if os.geteuid() == 0 else ""


def status(page: str) -> dict[str, Any] | None:
    try:
        return requests.get(page + "api/status", timeout=5).json()  # type: ignore[no-any-return]
    except requests.ConnectionError:
        return None


def write_profile(
    tmp_path: Path, device: str, state: Path, mqtt_url: str, source: dict[str, Any], **extra: Any
) -> Path:
    """A profile of one pipeline (a linear model over a csv source) with health every second."""
    model = save(linear_model(np.ones((3, 1))), tmp_path / "m.onnx")
    profile = tmp_path / "profile.json"
    body = {
        "device": {"id": device, "state_dir": str(state)},
        "mqtt": {"url": mqtt_url, "keepalive": 5},
        "health": {"interval": "1s"},
        "pipelines": [{"name": "p", "model": str(model), "source": {"type": "csv", **source}}],
        **extra,
    }
    profile.write_text(json.dumps(body))
    return profile


def launcher(profile: Path, log: Path) -> Callable[[], subprocess.Popen[bytes]]:
    """Starts `edge-agent run` on the profile, its log appended to `log`."""

    def start() -> subprocess.Popen[bytes]:
        with log.open("ab") as err:
            return subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "--profile", str(profile)],
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd=REPO,
            )

    return start


def test_agent_on_a_full_disk_with_the_broker_down_accounts_for_every_seq(
    small_disk: Path, tmp_path: Path, broker_factory: Callable[..., Mosquitto]
) -> None:
    """A real agent, 20,000 csv rows, the broker unreachable, the state folder on 1 MiB: once the broker
    is back, each result seq arrives or is counted in `outbox.dropped`; then the agent restarts on the
    full disk and goes on (it exited 1 before the fix)."""
    mosq = broker_factory(extra_conf=stay_root() + "max_queued_messages 0\n")
    proxy = TcpProxy(mosq.port)
    proxy.cut(refuse_for=3600)  # the broker is down for the agent; the subscriber is on it directly
    device = f"full-{uuid.uuid4().hex[:6]}"
    sub = Subscriber(mosq.port, f"edge/{device}/#")
    rows = 20_000
    page = f"http://127.0.0.1:{free_port()}/"
    source = {"path": str(sensor_csv(tmp_path / "s.csv", rows))}
    runtime = {"http": page.removeprefix("http://").rstrip("/")}
    profile = write_profile(tmp_path, device, small_disk / "state", proxy.url, source, runtime=runtime)
    log = tmp_path / "agent.log"
    start = launcher(profile, log)
    agent = start()
    try:
        done = wait_for(
            lambda: (s := status(page)) and s["pipelines"][0]["results"] >= rows and s, timeout=120, interval=0.2
        )
        assert done, log.read_text()[-3000:]
        outbox = done["outbox"]
        assert outbox["dropped_disk"] > 0 and outbox["dropped"] >= outbox["dropped_disk"]  # health says so
        proxy.cut(refuse_for=0)  # the broker is back
        topic = f"edge/{device}/p/results"
        assert sub.wait_for(lambda: rows in seqs(sub.payloads(topic)), timeout=60), log.read_text()[-3000:]
        delivered = set(seqs(sub.payloads(topic)))
        missing = set(range(1, rows + 1)) - delivered
        assert missing and len(delivered) > 1000

        def unaccounted() -> int:  # results and events that never arrived (events dropped count there too)
            event_seqs = {e["seq"] for e in sub.payloads(f"edge/{device}/events")}
            return len(missing) + len(set(range(1, max(event_seqs, default=0) + 1)) - event_seqs)

        def dropped() -> list[dict[str, Any]]:
            return [e for e in sub.payloads(f"edge/{device}/events") if e["type"] == "outbox.dropped"]

        # Every result seq is delivered or among the drops reported: an `outbox.dropped` event that counts
        # them all comes (a later report may still be on its way when the last result lands: waited for).
        assert sub.wait_for(lambda: dropped() and dropped()[-1]["total"] >= unaccounted(), timeout=30), (
            dropped()[-3:],
            unaccounted(),
        )
        last = dropped()[-1]
        assert last["disk"] > 0 and "the disk was full" in last["reason"], last
        assert last["total"] <= unaccounted() + 5, (last, unaccounted())  # and the count is not inflated
        agent.terminate()
        agent.wait(60)
        # The disk is still full: the agent starts, infers and publishes anyway.
        (small_disk / "filler").write_bytes(b"\0" * 64 * 1024)  # whatever room the shutdown left, taken
        before = len(sub.payloads(topic))
        agent = start()
        assert sub.wait_for(lambda: len(sub.payloads(topic)) > before + 100, timeout=60), log.read_text()[-3000:]
        assert agent.poll() is None
        assert "Traceback" not in log.read_text()
        assert max(seqs(sub.payloads(topic))) > rows  # seq goes on across the restart
    finally:
        agent.kill()
        agent.wait(10)
        sub.close()
        proxy.close()


def test_agent_starts_on_a_disk_without_a_free_block_with_its_outbox_in_memory(
    small_disk: Path, tmp_path: Path, broker: Mosquitto
) -> None:
    """Other files took every block: the agent starts anyway, publishes live from an outbox in memory and
    says so in health; the next start with room numbers on above it, never repeating a seq."""
    device = f"nodisk-{uuid.uuid4().hex[:6]}"
    state = small_disk / "state"
    state.mkdir()
    filler = fill(small_disk)
    sub = Subscriber(broker.port, f"edge/{device}/#")
    source = {"path": str(sensor_csv(tmp_path / "s.csv")), "rate": 100}
    log = tmp_path / "agent.log"
    topic = f"edge/{device}/p/results"
    start = launcher(write_profile(tmp_path, device, state, broker.url, source), log)
    agent = start()
    try:
        assert sub.wait_for(lambda: len(sub.payloads(topic)) >= 50, timeout=60), log.read_text()[-3000:]
        health = sub.wait_for(
            lambda: [h for h in sub.payloads(f"edge/{device}/health") if h.get("outbox", {}).get("memory_only")], 10
        )
        assert health, "health does not say the outbox is in memory"
        text = log.read_text()
        assert "keeping up to 8388608 bytes of messages in memory" in text and "Traceback" not in text
        assert text.count("optimised model not cached") == 1  # the cache (on by default) could not be written
        assert not list((state / "cache" / "optimized").glob("*"))  # and left nothing a later start would trust
        assert agent.poll() is None
        agent.terminate()
        assert agent.wait(60) == 0
        first_run = seqs(sub.payloads(topic))
        filler.unlink()  # room again: the disk outbox takes over
        agent = start()
        assert sub.wait_for(lambda: len(sub.payloads(topic)) >= len(first_run) + 50, timeout=60)
        second_run = seqs(sub.payloads(topic))[len(first_run) :]
        assert min(second_run) > max(first_run)  # seq never repeats across the switch
        assert (state / "outbox").is_dir() and not memory_dir(state / "outbox").exists()
    finally:
        agent.kill()
        agent.wait(10)
        sub.close()
        shutil.rmtree(memory_dir(state / "outbox").parent, ignore_errors=True)  # when it failed midway


def test_drops_of_an_agent_stopped_on_a_full_disk_are_announced_by_the_next_start(
    small_disk: Path, tmp_path: Path, broker_factory: Callable[..., Mosquitto]
) -> None:
    """A real agent fills its 1 MiB state folder with the broker away and is stopped with the disk still
    full: health counted the drops, but before the fix no `outbox.dropped` event ever reported them (the
    next start took them as reported). Now the next start, broker back, sends one that counts them."""
    mosq = broker_factory(extra_conf=stay_root() + "max_queued_messages 0\n")
    proxy = TcpProxy(mosq.port)
    proxy.cut(refuse_for=3600)
    device = f"gone-{uuid.uuid4().hex[:6]}"
    sub = Subscriber(mosq.port, f"edge/{device}/#")
    rows = 20_000
    page = f"http://127.0.0.1:{free_port()}/"
    source = {"path": str(sensor_csv(tmp_path / "s.csv", rows))}
    runtime = {"http": page.removeprefix("http://").rstrip("/")}
    log = tmp_path / "agent.log"
    start = launcher(write_profile(tmp_path, device, small_disk / "state", proxy.url, source, runtime=runtime), log)
    agent = start()
    try:
        done = wait_for(
            lambda: (s := status(page)) and s["pipelines"][0]["results"] >= rows and s, timeout=120, interval=0.2
        )
        assert done, log.read_text()[-3000:]
        assert done["outbox"]["dropped_disk"] > 0  # health says so
        agent.terminate()
        assert agent.wait(60) == 0
        # What the stopped agent left: drops that no stored event reported (the disk had no room for one).
        left = json.loads((small_disk / "state" / "outbox" / "counters.json").read_text())
        unreported = left["dropped_disk"] - left["reported_disk"]
        assert left["dropped_disk"] >= done["outbox"]["dropped_disk"] and unreported > 0, left
        proxy.cut(refuse_for=0)  # the broker is back for the next start; the disk is as full as it was
        # The next start reads its rows at a pace the broker drains, so that its own event is not lost too.
        write_profile(tmp_path, device, small_disk / "state", proxy.url, {**source, "rate": 50}, runtime=runtime)
        agent = start()

        def announced() -> list[dict[str, Any]]:  # the next start's events: a run-1 event counted fewer
            events = sub.payloads(f"edge/{device}/events")
            return [e for e in events if e["type"] == "outbox.dropped" and e["total"] >= left["dropped"]]

        assert sub.wait_for(announced, timeout=60), log.read_text()[-3000:]
        first = announced()[0]  # every drop not reported before the stop, and what this start dropped to begin
        assert first["count"] == first["total"] - left["reported"], (first, left)
        assert first["disk"] >= unreported and "the disk was full" in first["reason"]
        assert agent.poll() is None and "Traceback" not in log.read_text()
    finally:
        agent.kill()
        agent.wait(10)
        sub.close()
        proxy.close()


# ---- the optimised model cache on a full disk ------------------------------------------------------

X = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}


def cache_files(state: Path) -> list[str]:
    folder = state / "cache" / "optimized"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_the_optimised_model_cache_on_a_disk_without_a_free_block_costs_speed_never_the_session(
    small_disk: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before the fix onnxruntime failed the session (InvalidProtobuf "Protobuf serialization failed")
    when it could not write the optimised model, and the pipeline never loaded."""
    state = small_disk / "state"
    model = save(linear_model(np.ones((3, 1))), tmp_path / "m.onnx")
    filler = fill(small_disk)
    caplog.set_level(logging.WARNING, logger="agent.device")
    first = open_session(model, RuntimeConfig(), state)
    again = open_session(model, RuntimeConfig(), state)
    assert (first.cache, again.cache) == ("off", "off")
    np.testing.assert_array_equal(first.session.run(None, X)[0], X["x"].sum(axis=1, keepdims=True))
    said = [r.getMessage() for r in caplog.records if "optimised model not cached" in r.getMessage()]
    assert len(said) == 1 and "Protobuf serialization failed" in said[0], said  # said once, with the reason
    assert cache_files(state) == []  # no partial file for a later start to trust
    filler.unlink()  # room again: the cache works as before
    assert open_session(model, RuntimeConfig(), state).cache == "written"
    assert open_session(model, RuntimeConfig(), state).cache == "hit"


def test_an_optimised_model_with_no_room_for_its_record_leaves_nothing_behind(
    small_disk: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The model fits, its record does not: the entry is removed whole, the session runs uncached."""
    model = save(linear_model(np.ones((300, 400))), tmp_path / "m.onnx")
    roomy = tmp_path / "roomy"
    assert open_session(model, RuntimeConfig(), roomy).cache == "written"
    (optimised,) = (roomy / "cache" / "optimized").glob("*.onnx")
    pages = -(-optimised.stat().st_size // 4096)
    state = small_disk / "state"
    (state / "cache" / "optimized").mkdir(parents=True)
    fill(small_disk, leave=pages * 4096)  # room for the optimised model to the page, none for the record
    caplog.set_level(logging.WARNING, logger="agent.device")
    opened = open_session(model, RuntimeConfig(), state)
    assert opened.cache == "off"
    assert opened.session.run(None, {"x": np.ones((1, 300), dtype=np.float32)})[0].shape == (1, 400)
    assert "No space left on device" in caplog.text and "optimised model not cached" in caplog.text
    assert cache_files(state) == []  # neither the model without its record nor a half-written record


# ---- expired messages on a full disk -----------------------------------------------------------------


def test_prune_on_a_full_disk_drops_expired_messages_in_place_and_the_maintenance_thread_goes_on(
    small_disk: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix prune raised ENOSPC (no room for the segment to roll the expired one away) and the
    maintenance thread logged a traceback at every prune."""
    now = [1_000_000.0]
    outbox = Outbox(small_disk / "outbox", max_bytes=512 * 1024, max_age=60, clock=lambda: now[0])
    monkeypatch.setattr("agent.transport.pump.PRUNE_INTERVAL", 0.05)
    conn = Connection(MqttConfig(url=f"mqtt://127.0.0.1:{free_port()}"), DeviceConfig(id="full"))
    pump = OutboxPump(conn, outbox)
    try:
        for _ in range(50):
            outbox.put("t", b"x" * 200)
        filler = fill(small_disk)
        now[0] += 120  # every message expired
        caplog.set_level(logging.WARNING, logger="agent.transport")
        pump.start()
        assert wait_for(lambda: outbox.stats().dropped_age == 50, timeout=10), outbox.stats()
        stats = outbox.stats()
        assert (stats.depth, stats.dropped) == (0, 50) and outbox.peek(0, 100) == []  # counted, never sent
        wait_for(lambda: False, timeout=0.5)  # several more prunes: nothing new to say
        assert pump._worker.alive
        assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
        assert caplog.text.count("the disk is full; expired messages dropped in place") == 1
        assert caplog.text.count("dropped 50 message(s) older than 60 s") == 1
        filler.unlink()  # room again: the next put rolls the old segment away and its file goes
        for _ in range(5):
            outbox.put("t", b"y" * 200)
        assert [m.payload for m in outbox.peek(0, 100)] == [b"y" * 200] * 5
    finally:
        pump.stop()
        outbox.close()


# ---- drops reported after a restart ---------------------------------------------------------------


def dropped_events(outbox: Outbox) -> list[dict[str, Any]]:
    events = [json.loads(m.payload) for m in outbox.peek(0, 100_000) if m.topic == "edge/dev1/events"]
    return [e for e in events if e["type"] == "outbox.dropped"]


def test_drops_of_a_run_that_ended_on_a_full_disk_are_reported_after_the_restart(small_disk: Path) -> None:
    """Before the fix the restarted sink took every drop so far as reported: health counted them, no
    `outbox.dropped` event ever said so."""
    topics = Topics("edge", "dev1")
    outbox = Outbox(small_disk / "outbox")
    sink = OutboxSink(outbox, topics)
    filler = fill(small_disk)
    for i in range(5000):
        sink.result("p", {"i": i, "pad": "x" * 200})
    sink.report_drops(force=True)  # the event itself finds no room: not reported yet
    lost = outbox.stats().dropped_disk
    assert lost > 0 and outbox.disk_full and dropped_events(outbox) == []
    outbox.close()

    filler.unlink()  # the restart finds room
    outbox = Outbox(small_disk / "outbox")
    try:
        assert outbox.stats().dropped_disk >= lost  # health goes on counting them
        OutboxSink(outbox, topics).report_drops()
        (event,) = dropped_events(outbox)
        assert event["disk"] >= lost and event["count"] == event["total"] == outbox.dropped
        assert "the disk was full" in event["reason"]
    finally:
        outbox.close()

    outbox = Outbox(small_disk / "outbox")  # reported once: the next start has nothing to say
    try:
        OutboxSink(outbox, topics).report_drops(force=True)
        assert len(dropped_events(outbox)) == 1 and outbox.unreported_drops()[0] == 0
    finally:
        outbox.close()
