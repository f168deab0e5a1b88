"""Sources read real files, ptys, fake sysfs trees and OpenCV captures; bad input becomes events."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from agent.inference.sources import SOURCES, make_source
from agent.inference.sources.base import SourceContext, SourceFailedError
from agent.transport.events import Event
from tests.helpers import media
from tests.helpers.profiles import validated


def source(kind: str, events: list[Event] | None = None, **fields: Any):
    config = SOURCES[kind].Config(type=kind, **fields)
    return make_source(config, SourceContext("p", (events if events is not None else []).append))


def collect(src: Any, count: int | None = None, timeout: float = 10.0) -> list[Any]:
    """Items until the source ends, or `count` items (then the source is stopped)."""
    stop = threading.Event()
    items: list[Any] = []
    deadline = time.monotonic() + timeout
    for item in src.frames(stop):
        items.append(item)
        if (count is not None and len(items) >= count) or time.monotonic() > deadline:
            stop.set()
            break
    return items


def test_every_registered_source_has_an_implementation() -> None:
    assert set(SOURCES) == {"camera", "video", "images", "synthetic", "csv", "jsonl", "serial", "iio", "mqtt", "audio"}
    assert all(hasattr(m, "Source") for m in SOURCES.values())
    assert [k for k, m in SOURCES.items() if m.Source.live] == ["camera"]


@pytest.mark.arm64
def test_synthetic_frames_are_numbered_timed_and_deterministic() -> None:
    frames = collect(source("synthetic", width=160, height=120, fps=200, frames=5))
    assert [f.seq for f in frames] == [0, 1, 2, 3, 4]
    assert frames[0].data.shape == (120, 160, 3) and frames[0].data.dtype == np.uint8
    assert [f.t for f in frames] == pytest.approx([0, 0.005, 0.01, 0.015, 0.02])
    assert abs(frames[0].ts - time.time()) < 5
    again = collect(source("synthetic", width=160, height=120, fps=200, frames=1))
    assert np.array_equal(again[0].data, frames[0].data)


@pytest.mark.arm64
def test_csv_reads_columns_and_timestamps_and_reports_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text(
        "time,ax,ay,note\n2026-11-25T10:00:00Z,1,2,a\n2026-11-25T10:00:01.5Z,x,4,b\n2026-11-25T10:00:02Z,5,6,c\n\n"
    )
    events: list[Event] = []
    items = collect(source("csv", events, path=path, columns=["ay", "ax"], timestamp="time"))
    assert [i.data.tolist() for i in items] == [[2, 1], [6, 5]]
    assert [i.seq for i in items] == [0, 1] and [i.t for i in items] == [0.0, 2.0]
    assert items[0].ts == pytest.approx(1795600800.0)
    assert [e.fields["reason"] for e in events] == ["s.csv line 3: 'x' in column 'ax' is not a number"]


@pytest.mark.arm64
def test_csv_without_columns_takes_the_numeric_ones_and_a_missing_column_is_a_clear_failure(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text("name,a,b\nx,1,2\ny,3,4\n")
    assert [i.data.tolist() for i in collect(source("csv", path=path))] == [[1, 2], [3, 4]]
    with pytest.raises(SourceFailedError, match="no column 'c' \\(columns: name, a, b\\)"):
        collect(source("csv", path=path, columns=["c"]))


@pytest.mark.arm64
def test_csv_follow_reads_appended_lines_including_one_written_in_two_parts(tmp_path: Path) -> None:
    path = tmp_path / "live.csv"
    path.write_text("a,b\n1,2\n")
    src = source("csv", path=path, follow=True)

    def writer() -> None:
        time.sleep(0.2)
        with path.open("a") as f:
            f.write("3,")
            f.flush()
            time.sleep(0.25)
            f.write("4\n5,6\n")

    threading.Thread(target=writer).start()
    items = collect(src, count=3, timeout=5)
    assert [i.data.tolist() for i in items] == [[1, 2], [3, 4], [5, 6]]


@pytest.mark.arm64
def test_jsonl_reads_fields_and_reports_each_kind_of_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text(
        '{"t": 100, "a": 1, "b": 2}\nnot json\n{"t": 101, "a": "hi", "b": 2}\n[1, 2]\n{"t": 102, "a": 3}\n{"t": 103.5, "a": 5, "b": 6}\n'
    )
    events: list[Event] = []
    items = collect(source("jsonl", events, path=path, fields=["a", "b"], timestamp="t"))
    assert [i.data.tolist() for i in items] == [[1, 2], [5, 6]] and [i.t for i in items] == [0.0, 3.5]
    reasons = [e.fields["reason"] for e in events]
    assert reasons == [
        "s.jsonl line 2: not JSON (Expecting value)",
        "s.jsonl line 3: field 'a' is 'hi', not a number",
        "s.jsonl line 4: expected a JSON object, got list",
        "s.jsonl line 5: field 'b' is missing",
    ]


@pytest.mark.arm64
def test_images_skips_a_text_file_with_an_event_and_watch_picks_up_new_files(tmp_path: Path) -> None:
    img, _ = media.text_frame(64, 48)
    cv2.imwrite(str(tmp_path / "a.png"), img)
    (tmp_path / "b.txt").write_text("hello")
    cv2.imwrite(str(tmp_path / "c.jpg"), img)
    events: list[Event] = []
    items = collect(source("images", events, path=tmp_path))
    assert [i.meta["file"] for i in items] == ["a.png", "c.jpg"] and items[0].data.shape == (48, 64, 3)
    assert [(e.type, e.fields["reason"]) for e in events] == [
        ("frame.rejected", "b.txt is not an image OpenCV can read")
    ]

    watched = source("images", path=tmp_path, pattern="*.png", watch=True)
    threading.Timer(0.3, lambda: cv2.imwrite(str(tmp_path / "d.png"), img)).start()
    assert [i.meta["file"] for i in collect(watched, count=2, timeout=5)] == ["a.png", "d.png"]


def test_video_reads_every_frame_of_an_mp4_with_offsets_and_loops(tmp_path: Path) -> None:
    frames = [media.text_frame(96, 64, seed=i)[0] for i in range(4)]
    path = media.write_mp4(tmp_path / "v.mp4", frames, fps=10)
    items = collect(source("video", path=path))
    assert [i.seq for i in items] == [0, 1, 2, 3] and [i.t for i in items] == pytest.approx([0, 0.1, 0.2, 0.3])
    assert items[0].data.shape == (64, 96, 3)
    looped = collect(source("video", path=path, loop=True), count=6)
    assert [round(i.t, 3) for i in looped] == [0, 0.1, 0.2, 0.3, 0.4, 0.5]


def test_a_corrupt_video_raises_a_clear_error_for_the_pipeline_to_report(tmp_path: Path) -> None:
    path = tmp_path / "bad.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    with pytest.raises(OSError, match="bad.mp4 is not a video OpenCV can read"):
        collect(source("video", path=path))


@pytest.mark.arm64
def test_audio_windows_carry_context_offsets_and_a_padded_tail(tmp_path: Path) -> None:
    samples = (np.arange(1000) / 1000.0).astype(np.float32) * 0.5
    path = media.write_wav(tmp_path / "a.wav", samples)
    items = collect(source("audio", path=path, window=400, context=100))
    assert [i.t for i in items] == pytest.approx([0, 0.025, 0.05])
    assert all(i.data.shape == (500,) for i in items)
    assert np.allclose(items[0].data[:100], 0) and np.allclose(items[0].data[100:], samples[:400], atol=1e-4)
    assert np.allclose(items[1].data, samples[300:800], atol=1e-4)  # context = the previous window's last 100
    assert np.allclose(items[2].data[:300], samples[700:], atol=1e-4) and np.allclose(items[2].data[300:], 0)
    hop = collect(source("audio", path=path, window=400, hop=200))
    assert [round(i.t, 4) for i in hop] == [0, 0.0125, 0.025, 0.0375, 0.05]


@pytest.mark.arm64
def test_audio_raw_pcm_and_a_wav_at_the_wrong_rate(tmp_path: Path) -> None:
    raw = tmp_path / "a.s16"
    raw.write_bytes((np.arange(512, dtype="<i2") * 8).tobytes())
    items = collect(source("audio", path=raw, format="s16le", window=256))
    assert len(items) == 2 and items[1].data[0] == pytest.approx(256 * 8 / 32768)
    wav = media.write_wav(tmp_path / "8k.wav", np.zeros(800, np.float32), rate=8000)
    with pytest.raises(SourceFailedError, match="8k.wav is sampled at 8000 Hz but the pipeline expects 16000 Hz"):
        collect(source("audio", path=wav))


@pytest.mark.arm64
def test_iio_scales_raw_values_and_waits_for_a_device_that_appears(tmp_path: Path) -> None:
    root = tmp_path / "iio"
    events: list[Event] = []
    src = source("iio", events, device="adxl345", channels=["in_accel_x", "in_temp"], rate=50, root=str(root))

    def plug_in() -> None:
        dev = root / "iio:device0"
        dev.mkdir(parents=True)
        (dev / "in_accel_scale").write_text("0.5\n")
        (dev / "in_accel_x_raw").write_text("10\n")
        (dev / "in_temp_raw").write_text("20\n")
        (dev / "in_temp_offset").write_text("-5\n")
        (dev / "name").write_text("adxl345\n")

    threading.Timer(0.2, plug_in).start()
    items = collect(src, count=2, timeout=10)
    assert [i.data.tolist() for i in items] == [[5.0, 15.0], [5.0, 15.0]]
    assert [e.type for e in events] == ["source.lost", "source.recovered"]
    assert "no IIO device 'adxl345'" in events[0].fields["reason"]


@pytest.mark.arm64
def test_serial_reads_lines_from_a_tty_and_rejects_a_garbled_one() -> None:
    master, slave = os.openpty()
    events: list[Event] = []
    src = source("serial", events, device=os.ttyname(slave), fields=["a", "b"], baud=9600)
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.extend(collect(src, count=2, timeout=10)))
    t.start()
    time.sleep(0.3)
    os.write(master, b"1.5,2\n")
    os.write(master, b"oops\n3,4")
    os.write(master, b"\n")
    t.join(10)
    os.close(master)
    os.close(slave)
    assert [i.data.tolist() for i in out] == [[1.5, 2], [3, 4]]
    assert [e.fields["reason"] for e in events if e.type == "frame.rejected"] == [
        f"{src.config.device}: 1 values, expected 2 (a, b): 'oops'"
    ]


def test_serial_port_that_does_not_exist_is_lost_and_retried() -> None:
    events: list[Event] = []
    src = source("serial", events, device="/dev/ttyNOPE0")
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    assert list(src.frames(stop)) == []
    assert events[0].type == "source.lost" and "No such file" in events[0].fields["reason"]


def test_camera_that_is_unplugged_is_lost_with_the_reason_and_retried() -> None:
    events: list[Event] = []
    src = source("camera", events, device="/dev/video99")
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    assert list(src.frames(stop)) == []
    assert [(e.type, e.fields["reason"]) for e in events] == [
        ("source.lost", "/dev/video99 does not exist (unplugged?)")
    ]


def test_camera_reports_a_frozen_feed(tmp_path: Path) -> None:
    # A stream that repeats one picture (OpenCV opens a file path like a network stream).
    frame = media.text_frame(64, 48)[0]
    path = media.write_mp4(tmp_path / "still.mp4", [frame] * 60, fps=30)
    events: list[Event] = []
    src = source("camera", events, device=str(path), frozen_after=0.0001)
    items = collect(src, count=40)
    assert any(e.type == "source.frozen" for e in events)
    assert items[-1].meta == {"frozen": True}


def test_mqtt_source_reads_fields_from_json_payloads_and_rejects_bad_ones(broker: Any) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from agent.config.profile import MqttConfig

    events: list[Event] = []
    topic = f"test/sensors/{time.monotonic_ns()}"
    config = validated(SOURCES["mqtt"].Config, type="mqtt", topic=topic, fields=["temp", "hum"])
    src = make_source(config, SourceContext("p", events.append, mqtt=MqttConfig(url=broker.url), device="dev"))
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.extend(collect(src, count=2, timeout=10)))
    t.start()
    deadline = time.monotonic() + 5
    while not any(e.type == "source.connected" for e in events) and time.monotonic() < deadline:
        time.sleep(0.02)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    for payload in ('{"temp": 21.5, "hum": 40}', "garbage", '{"temp": 22, "hum": 41}'):
        pub.publish(topic, payload, qos=1).wait_for_publish(5)
    t.join(10)
    pub.loop_stop()
    pub.disconnect()
    assert [i.data.tolist() for i in out] == [[21.5, 40], [22, 41]]
    assert [e.type for e in events if e.type == "frame.rejected"] == ["frame.rejected"]


def test_camera_stream_that_ends_is_lost_then_reconnected_and_numbering_goes_on(tmp_path: Path) -> None:
    frames = [media.text_frame(64, 48, seed=i)[0] for i in range(5)]
    path = media.write_mp4(tmp_path / "stream.mp4", frames, fps=30)
    events: list[Event] = []
    items = collect(source("camera", events, device=str(path)), count=8, timeout=20)
    assert [i.seq for i in items] == list(range(8))
    assert [e.type for e in events] == ["source.lost", "source.recovered"]
    assert events[0].fields["reason"] == "the device stopped delivering frames"


@pytest.mark.arm64
def test_mqtt_source_on_the_daemons_shared_connection_never_blocks_its_network_thread() -> None:
    class Connection:  # the surface of agent.transport.connection.Connection the source uses
        def __init__(self) -> None:
            self.handlers: dict[str, Any] = {}

        def subscribe(self, topic: str, handler: Any, qos: int = 1) -> None:
            self.handlers[topic] = handler

    class Msg:
        def __init__(self, payload: bytes) -> None:
            self.payload = payload

    conn = Connection()
    events: list[Event] = []
    config = validated(SOURCES["mqtt"].Config, type="mqtt", topic="plant/temp", fields=["t"])
    src = make_source(config, SourceContext("p", events.append, connection=conn))
    stop = threading.Event()
    frames = src.frames(stop)
    threading.Timer(0.2, lambda: [conn.handlers["plant/temp"](Msg(p)) for p in (b"21.5", b"{}", b'{"t": 22}')]).start()
    got = [next(frames).data.tolist(), next(frames).data.tolist()]
    stop.set()
    assert got == [[21.5], [22.0]] and [e.type for e in events] == ["frame.rejected"]


@pytest.mark.arm64
def test_mqtt_payloads_over_the_limit_are_refused_without_being_held() -> None:
    """The inbox holds 10,000 messages: payloads as large as a broker allows must not be what it holds."""
    import tracemalloc

    from agent.inference.sources.mqtt import MAX_PAYLOAD

    handlers: dict[str, Any] = {}

    class Connection:
        def subscribe(self, topic: str, handler: Any, qos: int = 1) -> None:
            handlers[topic] = handler

    class Msg:
        def __init__(self, payload: bytes) -> None:
            self.payload = payload

    events: list[Event] = []
    config = validated(SOURCES["mqtt"].Config, type="mqtt", topic="plant/temp", fields=["t"])
    stop = threading.Event()
    frames = make_source(config, SourceContext("p", events.append, connection=Connection())).frames(stop)
    threading.Timer(0.2, lambda: handlers["plant/temp"](Msg(b"21.5"))).start()
    assert next(frames).data.tolist() == [21.5]  # the source is suspended now: nothing drains its inbox
    tracemalloc.start()
    try:
        for i in range(40):  # 40 MiB of payloads, none kept by this test
            handlers["plant/temp"](Msg(bytes([48 + i % 10]) * (1 << 20)))
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    handlers["plant/temp"](Msg(b'{"t": 22}'))
    assert next(frames).data.tolist() == [22.0]
    stop.set()
    assert held < 2 << 20, f"{held} bytes held for 40 refused payloads"
    reasons = [e.fields["reason"] for e in events if e.type == "frame.rejected"]
    assert reasons == [f"payload on plant/temp: {1 << 20} bytes, more than the {MAX_PAYLOAD} allowed"] * 40
