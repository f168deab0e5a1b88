"""A moving test pattern with text drawn at known places, for demos and tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agent.config.base import MAX_SIDE, Field, Strict

KEY = "synthetic"


@dataclass(frozen=True, kw_only=True)
class Config(Strict):
    type: Literal["synthetic"]
    width: int = Field(640, gt=0, le=MAX_SIDE, description="frame width in pixels")
    height: int = Field(480, gt=0, le=MAX_SIDE, description="frame height in pixels")
    fps: float = Field(10.0, gt=0, description="frames per second")
    text: tuple[str, ...] = Field(("EDGE AGENT", "HELLO 42"), description="lines of text drawn on the frames")
    frames: int | None = Field(None, gt=0, description="stop after this many frames; endless when unset")


import threading
import time
from collections.abc import Iterator

from agent.inference.processing.lazy import cv2, np
from agent.inference.sources.base import BaseSource, Frame, Pacer

FONT = 0  # cv2.FONT_HERSHEY_SIMPLEX
LINE_HEIGHT = 90


def text_layout(config: Config, seq: int) -> list[tuple[str, tuple[int, int], float, int]]:
    """Where each line is drawn on frame `seq`: (text, origin, font scale, thickness); drifts slowly."""
    scale = max(0.6, min(config.width, config.height) / 300)
    thickness = max(2, int(scale * 2))
    dx = (seq * 3) % 60
    return [
        (line, (30 + dx, 70 + i * int(LINE_HEIGHT * scale / 1.6)), scale, thickness)
        for i, line in enumerate(config.text)
    ]


class Source(BaseSource[Config]):
    """Dark text on a light, slowly changing background with a moving block: deterministic per seq."""

    @staticmethod
    def example(config: Config) -> np.ndarray | None:
        return np.zeros((config.height, config.width, 3), dtype=np.uint8)

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        cfg = self.config
        pacer = Pacer(cfg.fps)
        h, w = cfg.height, cfg.width
        ramp = np.linspace(170, 235, w, dtype=np.float32)[None, :, None]
        base = np.broadcast_to(ramp, (h, w, 3)).astype(np.uint8)
        while cfg.frames is None or self.seq < cfg.frames:
            if not pacer.wait(stop):
                return
            seq = self.seq
            img = base.copy()
            bx = int((seq * 7) % max(1, w - 60))
            cv2.rectangle(img, (bx, h - 50), (bx + 40, h - 20), (90, 140, 200), -1)
            for text, origin, scale, thickness in text_layout(cfg, seq):
                cv2.putText(img, text, origin, FONT, scale, (20, 20, 20), thickness, cv2.LINE_AA)
            yield Frame(img, time.time(), self.next_seq(), seq / cfg.fps)
