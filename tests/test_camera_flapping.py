"""Issue 17, item 10: a camera stream that opens and closes at once. Its reconnect backoff used to reset on
every open (144 `source.lost` in 30 s); now it resets only once a stream has delivered for STABLE_S, so
reconnects and events thin out. A real stream: an HTTP MJPEG server on loopback that sends three frames
per connection and hangs up, read by OpenCV as a camera would be.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import cv2
import numpy as np
import pytest

from agent.inference.sources import SOURCES, make_source
from agent.inference.sources.base import SourceContext
from agent.inference.sources.camera import STABLE_S
from agent.transport.events import Event

WINDOW_S = 8.0


class FlappingMjpeg:
    """Accepts, sends a multipart MJPEG header and `frames` JPEGs, closes; remembers when each came."""

    def __init__(self, frames: int = 3) -> None:
        ok, jpg = cv2.imencode(".jpg", np.full((48, 64, 3), 90, np.uint8))
        assert ok
        self.part = (
            b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpg) + jpg.tobytes() + b"\r\n"
        )
        self.frames = frames
        self.connects: list[float] = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/stream.mjpg"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connects.append(time.monotonic())
            try:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary=frame\r\n\r\n")
                conn.sendall(self.part * self.frames)
            except OSError:
                pass
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server() -> Iterator[FlappingMjpeg]:
    srv = FlappingMjpeg()
    yield srv
    srv.close()


def test_a_stream_that_opens_and_closes_at_once_backs_off_instead_of_flooding(server: FlappingMjpeg) -> None:
    events: list[Event] = []
    config = SOURCES["camera"].Config(type="camera", device=server.url, reconnect_max=30)
    source = make_source(config, SourceContext("cam", events.append))
    stop = threading.Event()
    frames: list[object] = []
    reader = threading.Thread(target=lambda: frames.extend(source.frames(stop)))
    reader.start()
    time.sleep(WINDOW_S)
    stop.set()
    reader.join(15)
    lost = [e for e in events if e.type == "source.lost"]
    gaps = [b - a for a, b in zip(server.connects, server.connects[1:], strict=False)]
    # Before: a fresh backoff (0.25-0.5 s) after every open: ~20 connections and as many source.lost in 8 s.
    # Now the waits double (0.25-0.5, 0.5-1, 1-2, 2-4 s ...): at most 6 attempts fit in the window.
    assert 2 <= len(server.connects) <= 6, gaps
    assert len(lost) <= len(server.connects) and lost[0].fields["reason"] == "the device stopped delivering frames"
    assert gaps[-1] >= 1.0 and gaps[-1] > gaps[0], gaps  # spaced further each time
    assert frames, "the frames it did deliver were used"
    # Each return is reported once a frame arrives, never without one, with the failures folded into it.
    recovered = [e for e in events if e.type == "source.recovered"]
    assert all(e.fields["failed_attempts"] >= 1 for e in recovered)
    assert [e.type for e in events if e.type.startswith("source.")][:2] == ["source.lost", "source.recovered"]
    assert STABLE_S > WINDOW_S / 2  # no stream here stayed up long enough to reset the backoff
