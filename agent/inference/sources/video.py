"""A video file, read in order, optionally looped."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agent.config.base import Field, ProfilePath, Strict

KEY = "video"


@dataclass(frozen=True, kw_only=True)
class Config(Strict):
    type: Literal["video"]
    path: ProfilePath = Field(description="a video file OpenCV can read (MP4, AVI, MKV)")
    loop: bool = Field(False, description="start again at the end instead of stopping")
    realtime: bool = Field(False, description="pace frames at the file's frame rate instead of as fast as possible")
    fps: float | None = Field(None, gt=0, description="pace frames at this rate (overrides the file's rate)")


import threading
import time
from collections.abc import Iterator

from agent.inference.processing.lazy import cv2
from agent.inference.sources.base import BaseSource, Frame, Pacer, too_large

DEFAULT_FPS = 30.0


class Source(BaseSource[Config]):
    """Frames of a file in order (backpressure: none dropped), `t` = frame index / the file's rate.

    A file OpenCV cannot open raises, so the pipeline reports `source.error` and tries again with
    backoff (the file may be replaced); a file that stops short of its frame count is reported too.
    """

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        cfg = self.config
        offset = 0.0
        while not stop.is_set():
            if not cfg.path.is_file():
                raise FileNotFoundError(f"{cfg.path} does not exist")
            cap = cv2.VideoCapture(str(cfg.path))
            try:
                if not cap.isOpened():
                    raise OSError(f"{cfg.path.name} is not a video OpenCV can read (corrupt or unknown format)")
                # A first frame declaring 16000x16000 made every frame a 768 MB array (2.3 GB peak).
                if too_big := too_large(cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FRAME_HEIGHT)):
                    raise OSError(f"{cfg.path.name} has frames of {too_big}")
                fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
                fps = fps if 0 < fps < 1000 else DEFAULT_FPS
                expected = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
                pacer = Pacer(cfg.fps or (fps if cfg.realtime else None))
                index = 0
                while not stop.is_set():
                    ok, img = cap.read()
                    if not ok or img is None:
                        break
                    if not pacer.wait(stop):
                        return
                    yield Frame(img, time.time(), self.next_seq(), offset + index / fps)
                    index += 1
                if index == 0:
                    raise OSError(f"{cfg.path.name} has no frame OpenCV can decode")
                if expected and index < expected - 1 and not stop.is_set():
                    self.emit(
                        "source.error",
                        reason=f"{cfg.path.name}: stopped at frame {index} of {expected} (truncated or corrupt)",
                    )
                offset += index / fps
            finally:
                cap.release()
            if not cfg.loop:
                return
