"""Hostile input to the device-side sensor sources: WAV headers and PCM streams (audio), sysfs attributes
(iio) and serial lines. Each attack is refused with one clear event, the good input around it comes
through, and nothing hangs, tracebacks or holds memory a header or a file asked for.
"""

from __future__ import annotations

import contextlib
import os
import struct
import termios
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.inference.sources import SOURCES, make_source
from agent.inference.sources.base import SourceContext, SourceFailedError
from agent.transport.events import Event
from tests.helpers import media
from tests.helpers.profiles import validated
from tests.test_sources import collect, source


def reasons(events: list[Event], type_: str = "frame.rejected") -> list[str]:
    return [str(e.fields["reason"]) for e in events if e.type == type_]


def wav(path: Path, fmt: bytes, *chunks: bytes) -> Path:
    body = b"WAVE" + fmt + b"".join(chunks)
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def chunk(name: bytes, data: bytes, size: int | None = None) -> bytes:
    return name + struct.pack("<I", len(data) if size is None else size) + data


def pcm_format(channels: int, bits: int, rate: int = 16000) -> bytes:
    align = channels * bits // 8
    return chunk(b"fmt ", struct.pack("<HHLLHH", 1, channels, rate, (rate * align) & 0xFFFFFFFF, align & 0xFFFF, bits))


class Running:
    """A source's frames on a thread of their own, so that a test survives a source that hangs."""

    def __init__(self, src: Any) -> None:
        self.stop = threading.Event()
        self.items: list[Any] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(src,), daemon=True)
        self.thread.start()

    def _run(self, src: Any) -> None:
        try:
            for item in src.frames(self.stop):
                self.items.append(item)
        except BaseException as exc:  # noqa: BLE001 (the test asserts on it)
            self.error = exc

    def wait_for(self, done: Callable[[], bool], timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            time.sleep(0.02)
        return done()

    def ended_after_stop(self, timeout: float = 2.0) -> bool:
        self.stop.set()
        self.thread.join(timeout)
        return not self.thread.is_alive()


@contextlib.contextmanager
def fifo(path: Path) -> Iterator[Path]:
    """A FIFO; whoever still waits to open it for reading is let go at the end."""
    os.mkfifo(path)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


# -- audio ----------------------------------------------------------------------------------------


def test_audio_wav_claiming_65535_channels_is_read_in_bounded_pieces(tmp_path: Path) -> None:
    """Before: reads were 4096 frames whatever a frame's size, so a header of 65535 channels of 32 bits made
    one read take up to 1 GiB (a 256 MiB file of them peaked at 860 MiB for 64 mono windows of 16 samples)."""
    channels, frames = 65535, 32
    levels = np.arange(1, frames + 1, dtype="<i4") << 24  # every channel of frame k holds the same value
    data = np.repeat(levels, channels).tobytes()  # 8 MiB
    path = wav(tmp_path / "wide.wav", pcm_format(channels, 32), chunk(b"data", data))
    del data
    tracemalloc.start()
    try:
        items = collect(source("audio", path=path, window=16))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 << 20, f"{peak >> 20} MiB held to read 32 frames"
    assert np.allclose(np.concatenate([i.data for i in items]), levels / 2.0**31)


def test_audio_wav_whose_chunk_claims_more_than_the_file_is_refused_clearly(tmp_path: Path) -> None:
    """Before: a LIST chunk claiming 2 GiB made `wave` seek past the RIFF chunk and raise a bare
    RuntimeError out of the source (a source.error retried for ever, saying only "RuntimeError: ")."""
    path = wav(tmp_path / "big.wav", pcm_format(1, 16), chunk(b"LIST", b"abcd", size=0x7FFFFFFF), chunk(b"data", b""))
    with pytest.raises(SourceFailedError, match=r"^big.wav is not a PCM WAV file \(it ends before its data\)$"):
        collect(source("audio", path=path))


def test_audio_wav_cut_inside_a_sample_gives_every_whole_sample(tmp_path: Path) -> None:
    """Before: the odd last byte made numpy raise ValueError ("buffer size must be a multiple of element
    size"); the pipeline restarts a failed source, so the file was replayed from the start for ever."""
    samples = (np.arange(1000) / 2000.0).astype(np.float32)
    path = media.write_wav(tmp_path / "cut.wav", samples)
    path.write_bytes(path.read_bytes()[:-1])
    items = collect(source("audio", path=path, window=400))
    assert [i.t for i in items] == pytest.approx([0, 0.025, 0.05])
    assert np.allclose(items[2].data[:199], samples[800:999], atol=1e-4) and np.allclose(items[2].data[199:], 0)


def test_audio_float_samples_that_are_not_finite_reject_their_window(tmp_path: Path) -> None:
    """Before: NaN and infinity in f32le PCM went to the model as they were, without a word."""
    samples = np.full(1024, 0.25, dtype="<f4")
    samples[10], samples[600], samples[601] = np.nan, np.inf, -np.inf
    path = tmp_path / "mic.f32"
    path.write_bytes(samples.tobytes())
    events: list[Event] = []
    items = collect(source("audio", events, path=path, format="f32le", window=256))
    assert [i.t for i in items] == [0.016, 0.048] and [i.seq for i in items] == [0, 1]
    assert all(np.all(i.data == np.float32(0.25)) for i in items)
    assert reasons(events) == [
        "mic.f32: window at 0.000 s: sample 10 is nan, not a finite number (1 such in the window)",
        "mic.f32: window at 0.032 s: sample 600 is inf, not a finite number (2 such in the window)",
    ]


def test_audio_fifo_stops_when_asked_and_gives_samples_as_they_come(tmp_path: Path) -> None:
    """Before: a FIFO without a writer blocked the source in open() for ever, deaf to stop; once a writer
    came, a read waited for 8192 bytes, so a slow or stalled writer's samples were held back, and a
    sample split between two writes would have shifted every sample after it."""
    with fifo(tmp_path / "nobody") as path:
        idle = Running(source("audio", path=path, format="s16le", window=256))
        time.sleep(0.3)
        assert idle.ended_after_stop(), "the source still waits for a writer after stop"
        assert idle.error is None and idle.items == []

    with fifo(tmp_path / "mic") as path:
        live = Running(source("audio", path=path, format="s16le", window=256))
        writer = os.open(path, os.O_WRONLY)
        try:
            pcm = (np.arange(512, dtype="<i2") * 64).tobytes()
            os.write(writer, pcm[:301])  # a sample split between two writes
            time.sleep(0.1)
            os.write(writer, pcm[301:])
            got_both = live.wait_for(lambda: len(live.items) == 2)
            assert live.ended_after_stop(), "the source still waits for the writer after stop"
        finally:
            os.close(writer)
    assert got_both, f"{len(live.items)} windows of the 2 the writer sent"
    assert np.allclose(np.concatenate([w.data for w in live.items]), np.arange(512) * 64 / 32768)


def test_audio_hop_longer_than_the_window_skips_the_samples_between(tmp_path: Path) -> None:
    """Before: a hop past the samples read so far skipped only those, so windows after the first held
    audio from before their `t` (here the second, at 0.5 s, held the samples from 0.256 s)."""
    samples = (np.arange(20000) % 1000 / 1000.0).astype(np.float32)
    path = media.write_wav(tmp_path / "a.wav", samples)
    items = collect(source("audio", path=path, window=400, hop=8000))
    assert [i.t for i in items] == [0, 0.5, 1.0]
    for item, start in zip(items, (0, 8000, 16000), strict=True):
        assert np.allclose(item.data, samples[start : start + 400], atol=1e-4)


# -- iio ------------------------------------------------------------------------------------------


def iio_device(root: Path, folder_name: str = "iio:device0", /, **attributes: str | bytes) -> Path:
    folder = root / folder_name
    folder.mkdir(parents=True)
    for attribute, value in attributes.items():
        (folder / attribute).write_bytes(value if isinstance(value, bytes) else value.encode())
    return folder


def test_iio_raw_values_that_are_not_finite_numbers_are_rejected_and_sampling_goes_on(tmp_path: Path) -> None:
    """Before: "nan" and "1e999" went to the model as NaN and infinity; "zz" or bytes that are not text
    made the device `source.lost` and re-found with backoff, as if unplugged."""
    root = tmp_path / "iio"
    folder = iio_device(root, in_accel_x_raw="nan\n", in_accel_scale="0.5\n")
    raw = folder / "in_accel_x_raw"
    bad: list[str | bytes] = ["1e999\n", "zz\n", b"\xff\xfe\n", "10\n"]

    def sink(event: Event) -> None:  # called on the source's thread: the next value is there for its next read
        events.append(event)
        if event.type == "frame.rejected" and bad:
            value = bad.pop(0)
            raw.write_bytes(value if isinstance(value, bytes) else value.encode())

    events: list[Event] = []
    config = validated(
        SOURCES["iio"].Config, type="iio", device="iio:device0", channels=["in_accel_x"], rate=200, root=str(root)
    )
    items = collect(make_source(config, SourceContext("p", sink)), count=1, timeout=5)
    assert [i.data.tolist() for i in items] == [[5.0]]
    assert [e.type for e in events] == ["frame.rejected"] * 4
    assert reasons(events) == [
        "iio:device0: in_accel_x_raw holds 'nan', not a finite number",
        "iio:device0: in_accel_x_raw holds '1e999', not a finite number",
        "iio:device0: in_accel_x_raw holds 'zz', not a finite number",
        "iio:device0: in_accel_x_raw holds b'\\xff\\xfe\\n', not text",
    ]


def test_iio_product_beyond_float_range_is_rejected(tmp_path: Path) -> None:
    """Before: (raw + offset) * scale overflowed to infinity and went to the model."""
    root = tmp_path / "iio"
    iio_device(root, in_accel_x_raw="1e308\n", in_accel_scale="10\n")
    events: list[Event] = []
    running = Running(source("iio", events, device="iio:device0", channels=["in_accel_x"], rate=200, root=str(root)))
    assert running.wait_for(lambda: bool(events or running.items)) and running.ended_after_stop()
    assert running.items == []
    assert reasons(events)[0] == "iio:device0: in_accel_x_raw: (1e+308 + 0.0) * 10.0 is beyond the range of a float"


def sparse(path: Path) -> None:
    with path.open("wb") as f:
        f.truncate(32 << 20)


@pytest.mark.parametrize(
    ("attribute", "make", "reason"),
    [
        ("in_accel_scale", lambda p: p.write_text("nan\n"), "in_accel_scale holds 'nan', not a finite number"),
        ("in_accel_x_offset", lambda p: p.write_text("-inf\n"), "in_accel_x_offset holds '-inf', not a finite number"),
        ("in_accel_scale", os.mkfifo, "in_accel_scale: a FIFO, not a regular file"),
        ("in_accel_scale", sparse, "in_accel_scale is larger than 4096 bytes, not a sysfs attribute"),
        ("in_accel_scale", lambda p: p.symlink_to("/dev/zero"), "in_accel_scale: a device, not a regular file"),
    ],
    ids=["nan-scale", "inf-offset", "fifo", "huge", "dev-zero"],
)
def test_iio_scale_or_offset_that_is_not_a_finite_number_is_a_clear_source_lost(
    tmp_path: Path, attribute: str, make: Callable[[Path], object], reason: str
) -> None:
    """Before: a NaN scale or offset made every sample NaN, without a word; a FIFO blocked the source for
    ever; a 512 MiB sparse file took 53 s and 7 GiB, and the source.lost reason carried its whole text (a
    32 MiB one here); /dev/zero was read until memory ran out."""
    root = tmp_path / "iio"
    folder = iio_device(root, in_accel_x_raw="10\n")
    make(folder / attribute)
    events: list[Event] = []
    running = Running(source("iio", events, device="iio:device0", channels=["in_accel_x"], root=str(root)))
    try:
        assert running.wait_for(lambda: bool(events), timeout=3), "no event within 3 s"
        assert running.ended_after_stop()
    finally:
        running.stop.set()
        if (folder / attribute).is_fifo():  # let a source blocked opening it go
            with contextlib.suppress(OSError):
                os.close(os.open(folder / attribute, os.O_WRONLY | os.O_NONBLOCK))
    assert running.items == [] and running.error is None
    assert [(e.type, e.fields["reason"]) for e in events] == [("source.lost", reason)]


def test_iio_another_devices_unreadable_name_does_not_hide_ours(tmp_path: Path) -> None:
    """Before: device0's name, not UTF-8, raised UnicodeDecodeError out of the source while it looked for
    device1 by name (a source.error, retried with the same result for ever)."""
    root = tmp_path / "iio"
    iio_device(root, "iio:device0", name=b"\xff\xfe\n", in_accel_x_raw="1\n")
    iio_device(root, "iio:device1", name="adxl345\n", in_accel_x_raw="2\n")
    events: list[Event] = []
    items = collect(source("iio", events, device="adxl345", channels=["in_accel_x"], rate=200, root=str(root)), 2)
    assert [i.data.tolist() for i in items] == [[2.0], [2.0]] and events == []


# -- serial ---------------------------------------------------------------------------------------


def write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data[:1024]) :]


def test_serial_line_longer_than_the_limit_is_refused_whole_and_an_endless_one_once() -> None:
    """Before: a line over MAX_LINE was cut and its tail parsed as a sample of its own, without a word
    ("0" * 9000 + "7,2" came out as the sample [7, 2]); a line that never ended was dropped in silence."""
    from agent.inference.sources.serial import MAX_LINE

    master, slave = os.openpty()
    events: list[Event] = []
    src = source("serial", events, device=os.ttyname(slave), fields=["a", "b"])
    running = Running(src)
    try:
        assert running.wait_for(lambda: not termios.tcgetattr(slave)[3] & termios.ICANON), "the port stayed cooked"
        write_all(master, b"1,2\n" + b"0" * 9000 + b"7,2\n3,4\n")
        assert running.wait_for(lambda: len(running.items) == 2)
        write_all(master, b"9" * 100_000)  # no newline
        assert running.wait_for(lambda: len(events) == 2)
        write_all(master, b"9,9\n5,6\n")
        assert running.wait_for(lambda: len(running.items) == 3)
        assert running.ended_after_stop()
    finally:
        running.stop.set()
        os.close(master)
        os.close(slave)
    assert [i.data.tolist() for i in running.items] == [[1, 2], [3, 4], [5, 6]]
    device = src.config.device
    assert reasons(events) == [
        f"{device}: a line longer than {MAX_LINE} bytes: {'0' * 80!r}",
        f"{device}: a line longer than {MAX_LINE} bytes: {'9' * 80!r}",
    ]
