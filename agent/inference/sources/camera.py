"""V4L2 cameras and network streams (RTSP, HTTP/MJPEG) through OpenCV."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agent.config.base import MAX_SIDE, Field, Strict
from agent.config.units import Duration

KEY = "camera"


@dataclass(frozen=True, kw_only=True)
class Config(Strict):
    type: Literal["camera"]
    device: str | int = Field(
        description="a V4L2 device path (/dev/video0), a device index (0), or a stream URL (rtsp://, http://)"
    )
    fps: float | None = Field(None, gt=0, description="frames per second to request; the camera's own rate when unset")
    width: int | None = Field(None, gt=0, le=MAX_SIDE, description="capture width in pixels")
    height: int | None = Field(None, gt=0, le=MAX_SIDE, description="capture height in pixels")
    reconnect_max: Duration = Field(30.0, gt=0, description="longest wait between reconnect attempts")
    frozen_after: Duration = Field(10.0, gt=0, description="identical frames for this long raise a source.frozen event")


import os
import threading
import time
import zlib
from collections.abc import Callable, Generator, Iterator

from agent.inference.processing.lazy import cv2, np
from agent.inference.sources.base import BaseSource, Frame, too_large
from agent.util.backoff import Backoff

OPEN_TIMEOUT_MS = 10000  # network streams: give up an attempt after this long, then back off
READ_TIMEOUT_MS = 10000
# A stream must deliver this long before its backoff resets: one that opens and closes at once (a
# camera rebooting, a proxy without upstream) otherwise reconnected, and reported it, twice a second.
STABLE_S = 10.0


def _target(device: str | int) -> str | int:
    if isinstance(device, int):
        return device
    text = str(device)
    return int(text) if text.isdigit() else text


def _fingerprint(img: np.ndarray) -> int:
    """A cheap digest of a subsampled frame: equal digests over time mean a frozen feed."""
    return zlib.crc32(img[::8, ::8].tobytes())


class _Link:
    """The camera's connection state: `source.lost` once when it goes, `source.recovered` once a frame
    arrives again (with the attempts that failed meanwhile folded into `failed_attempts`), and a backoff
    that resets only after the stream has stayed up for STABLE_S."""

    def __init__(self, source: Source, backoff: Backoff) -> None:
        self.source = source
        self.backoff = backoff
        self.lost = False
        self.failures = 0
        self.opened = time.monotonic()

    def failed(self, reason: str) -> float:
        """Report the loss (once) and return how long to wait before the next attempt."""
        if not self.lost:
            self.source.emit("source.lost", reason=reason)
            self.lost, self.failures = True, 0
        self.failures += 1
        return self.backoff.next_delay()

    def delivered(self) -> None:
        if self.lost:  # an open that fails at once, before a frame, is not a recovery
            self.source.emit("source.recovered", failed_attempts=self.failures)
            self.lost = False
        if time.monotonic() - self.opened >= STABLE_S:
            self.backoff.reset()  # only a stream that stayed up earns quick reconnects again


class Source(BaseSource[Config]):
    """A V4L2 device or a network stream. The newest frame wins (`live`). A device that cannot be
    opened or stops delivering is `source.lost`, retried with random capped backoff, and
    `source.recovered` when frames flow again; the same picture for `frozen_after` seconds is
    `source.frozen` (a stuck encoder or a covered lens is not "healthy at 5 fps"). A stream whose frames are
    larger than `MAX_SIDE` x `MAX_SIDE` is refused the same way, as lost, naming the size."""

    @staticmethod
    def example(config: Config) -> np.ndarray | None:
        if config.width is None or config.height is None:
            return None
        return np.zeros((config.height, config.width, 3), dtype=np.uint8)

    live = True

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        link = _Link(self, Backoff(self.config.reconnect_max))
        while not stop.is_set():
            cap, reason = self._open()
            if cap is not None:
                link.opened = time.monotonic()
                try:
                    reason = yield from self._read(cap, stop, link.delivered)
                finally:
                    cap.release()
            if reason and not stop.is_set():
                stop.wait(link.failed(reason))

    def _open(self) -> tuple[cv2.VideoCapture | None, str]:
        cfg = self.config
        target = _target(cfg.device)
        if isinstance(target, str) and target.startswith("/dev/") and not os.path.exists(target):
            return None, f"{target} does not exist (unplugged?)"
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, OPEN_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, READ_TIMEOUT_MS]
        cap = cv2.VideoCapture(target, cv2.CAP_ANY, params)
        if not cap.isOpened():
            cap.release()
            return None, f"cannot open {target}"
        for prop, value in (
            (cv2.CAP_PROP_FPS, cfg.fps),
            (cv2.CAP_PROP_FRAME_WIDTH, cfg.width),
            (cv2.CAP_PROP_FRAME_HEIGHT, cfg.height),
        ):
            if value is not None:
                cap.set(prop, float(value))
        # OpenCV's FFmpeg backend converts every frame to the size the stream opened with, its first frame's: a
        # 1 MB JPEG declaring 16000x16000 first made every frame after it a 768 MB BGR array (2.3 GB peak).
        # Refused before the first conversion: the probe that found the size took no frame buffer (0.1 GB peak).
        # FFmpeg's `max_pixels` would refuse it in the decoder, but OpenCV 5.1 passes no codec option on.
        too_big = too_large(cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if too_big:
            cap.release()
            return None, f"{target} sends frames of {too_big}"
        return cap, ""

    def _read(
        self, cap: cv2.VideoCapture, stop: threading.Event, delivered: Callable[[], None]
    ) -> Generator[Frame, None, str]:
        """Frames until the device stops delivering (the reason is returned) or `stop` is set; `delivered`
        is called for each frame before it is handed on."""
        cfg = self.config
        last_print: int | None = None
        same_since = time.monotonic()
        frozen = False
        while not stop.is_set():
            ok, img = cap.read()
            if not ok or img is None:
                return "the device stopped delivering frames"
            # FFmpeg's backend keeps the size checked at open (a larger frame later comes out cut to it); a
            # backend that follows a size change would hand on the larger frame: reconnect, and open refuses it.
            too_big = too_large(img.shape[1], img.shape[0])
            if too_big:
                return f"the device sent a frame of {too_big}"
            delivered()
            ts = time.time()
            fp = _fingerprint(img)
            mono = time.monotonic()
            if fp != last_print:
                last_print, same_since = fp, mono
                if frozen:
                    frozen = False
                    self.emit("source.unfrozen")
            elif not frozen and mono - same_since >= cfg.frozen_after:
                frozen = True
                self.emit("source.frozen", reason=f"the same picture for {mono - same_since:.0f} s")
            yield Frame(img, ts, self.next_seq(), None, {"frozen": True} if frozen else {})
        return ""
