"""A compromised IP camera sends a frame whose JPEG header declares 16000x16000 pixels in 1 MB of data.

OpenCV's FFmpeg backend converts every frame to the size the stream opened with. As the first frame of a
connection, the huge one made each frame after it a 768 MB BGR array: a running agent peaked at 2.3 GB.
Now the camera refuses a stream whose frames are larger than `MAX_SIDE` when it opens (`source.lost`
naming the size, then the usual backoff). Later in a stream the same frame comes out cut to the opened
size and the stream goes on; FFmpeg's decoder still takes that frame's own buffer for a moment (256 MB at
one byte a pixel), which OpenCV gives no option to bound.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from agent.inference.sources import SOURCES, make_source
from agent.inference.sources import camera as camera_source
from agent.inference.sources.base import Frame, SourceContext
from agent.transport.events import Event
from agent.util.libraries import MAX_SIDE
from tests.helpers.models import save, unary_model
from tests.helpers.profiles import one_pipeline

REPO = Path(__file__).resolve().parent.parent
HUGE = 16000  # over MAX_SIDE, under FFmpeg's own bound (about 2^28 pixels; it refuses 60000x60000 itself)
# Runs a command until SIGTERM, passed on to it, and prints its peak RSS (KiB) on stderr's last line.
PEAK_RSS = (
    "import resource, signal, subprocess, sys; p = subprocess.Popen(sys.argv[1:]); "
    "signal.signal(signal.SIGTERM, lambda *_: p.terminate()); rc = p.wait(); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)"
)


def flat_jpeg(width: int, height: int) -> bytes:
    """A valid baseline greyscale JPEG of one flat grey, 1 MB for 16000x16000: its Huffman tables have one
    1-bit code each, so every 8x8 block is two zero bits (DC difference 0, end of block)."""

    def segment(marker: int, body: bytes) -> bytes:
        return struct.pack(">HH", 0xFF00 | marker, len(body) + 2) + body

    blocks = -(-width // 8) * -(-height // 8)
    one_code = bytes([1] + [0] * 15) + b"\0"  # one symbol, 0, with a code of one bit
    return b"".join(
        [
            b"\xff\xd8",
            segment(0xDB, b"\0" + b"\1" * 64),
            segment(0xC0, struct.pack(">BHHB3B", 8, height, width, 1, 1, 0x11, 0)),
            segment(0xC4, b"\x00" + one_code + b"\x10" + one_code),
            segment(0xDA, bytes([1, 1, 0, 0, 63, 0])),
            bytes(-(-blocks * 2 // 8)),
            b"\xff\xd9",
        ]
    )


def small_jpeg(level: int) -> bytes:
    ok, jpg = cv2.imencode(".jpg", np.full((48, 64, 3), level, np.uint8))
    assert ok
    return jpg.tobytes()


class HostileMjpeg:
    """An HTTP MJPEG camera on loopback. Connection n gets `scripts[n]`, one part every 50 ms, and is closed;
    the last script's connection is held open instead and sets `done`. Connections past them are closed."""

    def __init__(self, scripts: list[list[bytes]]) -> None:
        self.scripts = scripts
        self.done = threading.Event()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/stream.mjpg"
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        for n in range(1000):
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            if n < len(self.scripts):
                threading.Thread(target=self._send, args=(conn, self.scripts[n], n), daemon=True).start()
            else:
                conn.close()

    def _send(self, conn: socket.socket, parts: list[bytes], n: int) -> None:
        try:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary=frame\r\n\r\n")
            for jpg in parts:
                head = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpg)
                conn.sendall(head + jpg + b"\r\n")
                time.sleep(0.05)
        except OSError:  # the agent hung up (it refused the stream)
            pass
        if n == len(self.scripts) - 1:
            self.done.set()
        else:
            conn.close()

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def camera() -> Iterator[HostileMjpeg]:
    normal = [small_jpeg(10 + 5 * i) for i in range(20)]
    huge = flat_jpeg(HUGE, HUGE)
    # First it opens with the huge frame (refused); then it sends it mid-stream between normal frames.
    srv = HostileMjpeg([[huge, *normal[:3]], [*normal[:3], huge, *normal]])
    yield srv
    srv.close()


def test_a_camera_frame_declaring_16000x16000_is_refused_by_a_running_agent_in_bounded_memory(
    tmp_path: Path, camera: HostileMjpeg
) -> None:
    model = save(unary_model("Relu", shape=("N", 3, 24, 32)), tmp_path / "m.onnx")
    profile = one_pipeline(
        tmp_path, model, {"type": "camera", "device": camera.url}, preprocess={"resize": [32, 24], "scale": 0.004}
    )
    cmd = [sys.executable, "-c", PEAK_RSS, sys.executable, "-m", "agent", "run", "--profile", str(profile)]
    with (tmp_path / "out").open("w+") as out, (tmp_path / "err").open("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=REPO)
        try:
            finished = camera.done.wait(60)
            time.sleep(1.0)  # the last frames through the pipeline
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        results_text, stderr = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    log, peak_kib = stderr.rsplit("\n", 2)[0], int(stderr.split()[-1])
    assert finished and proc.returncode == 0, log[-3000:]
    lost = f"sends frames of {HUGE}x{HUGE} pixels, more than the {MAX_SIDE}x{MAX_SIDE} a frame may have"
    assert lost in log, log[-3000:]
    assert "source.recovered" in log and "Traceback" not in log and "source.error" not in log, log[-3000:]
    # The stream went on after the huge frame mid-stream. A live source drops frames while the pipeline is busy
    # (9 of 24 came through on a loaded machine), so the frames are told apart by their grey level, which the
    # Relu model's output carries (level x 0.004): only normal frames after the huge one are 25 to 105 (the huge
    # one itself comes out cut to the stream's size, its grey about 130).
    results = [json.loads(line) for line in results_text.splitlines()]
    levels = [round(float(np.mean(r["output"]["y"])) / 0.004) for r in results]
    assert any(25 <= level <= 105 for level in levels), (levels, log[-3000:])
    # 2.3 GB before; the agent itself takes about 150 MB, FFmpeg's buffer for the mid-stream frame 256 MB.
    assert peak_kib < 600 * 1024, f"peak RSS {peak_kib >> 10} MiB"


class GrowingCapture:
    """A capture backend that follows a size change: it opens at 64x48, then hands on a frame taller than
    MAX_SIDE (one pixel wide, so that the test itself stays small)."""

    def __init__(self, *_: Any) -> None:
        self.images = [np.zeros((48, 64, 3), np.uint8), np.zeros((MAX_SIDE + 1, 1, 3), np.uint8)]

    def isOpened(self) -> bool:  # noqa: N802 (OpenCV's name)
        return True

    def get(self, prop: int) -> float:
        return {cv2.CAP_PROP_FRAME_WIDTH: 64.0, cv2.CAP_PROP_FRAME_HEIGHT: 48.0}.get(prop, 0.0)

    def set(self, prop: int, value: float) -> bool:
        return False

    def read(self) -> tuple[bool, np.ndarray | None]:
        return (True, self.images.pop(0)) if self.images else (False, None)

    def release(self) -> None:
        pass


def test_a_frame_larger_than_the_stream_opened_with_is_not_handed_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(camera_source.cv2, "VideoCapture", GrowingCapture)
    events: list[Event] = []
    config = SOURCES["camera"].Config(type="camera", device="http://camera.invalid/stream")
    source = make_source(config, SourceContext("cam", events.append))
    stop = threading.Event()
    frames: list[Frame] = []
    for frame in source.frames(stop):
        frames.append(frame)
        if len(frames) == 2:  # one from the first connection, one from the reconnect
            stop.set()
    assert [f.data.shape for f in frames] == [(48, 64, 3), (48, 64, 3)]
    tall = f"1x{MAX_SIDE + 1} pixels, more than the {MAX_SIDE}x{MAX_SIDE} a frame may have"
    assert [(e.type, e.fields.get("reason")) for e in events] == [
        ("source.lost", f"the device sent a frame of {tall}"),
        ("source.recovered", None),
    ]


def test_a_video_file_whose_first_frame_declares_16000x16000_is_refused_before_any_frame(tmp_path: Path) -> None:
    """The video source opens files through the same backend: such a file made every frame after the first,
    the small ones too, a 16000x16000 BGR array (2.3 GB peak in a bare reader)."""
    path = tmp_path / "drop.mjpeg"
    path.write_bytes(flat_jpeg(HUGE, HUGE) + small_jpeg(10) + small_jpeg(20))
    config = SOURCES["video"].Config(type="video", path=path)
    source = make_source(config, SourceContext("v", lambda _: None))
    too_big = f"{HUGE}x{HUGE} pixels, more than the {MAX_SIDE}x{MAX_SIDE} a frame may have"
    with pytest.raises(OSError, match=f"^drop.mjpeg has frames of {too_big}$"):
        next(iter(source.frames(threading.Event())))
