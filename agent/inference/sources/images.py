"""Still images from a folder, optionally watched for new files."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from agent.config.base import ProfilePath, Strict

KEY = "images"


class Config(Strict):
    type: Literal["images"]
    path: ProfilePath = Field(description="a folder of images")
    pattern: str = Field("*", min_length=1, description="a glob of file names to read")
    watch: bool = Field(False, description="keep running and read files as they appear")
    fps: float | None = Field(None, gt=0, description="pace images at this rate")


import threading
import time
from collections.abc import Iterator
from pathlib import Path

from agent.inference.processing.lazy import cv2, np
from agent.inference.sources.base import BaseSource, Frame, Pacer

WATCH_POLL_S = 0.5


class Source(BaseSource[Config]):
    """Image files in name order; with `watch`, files that appear later too (once their size holds
    still for one poll, so a file being copied in is not read half-written). A file that is not an
    image is a `frame.rejected` event naming it, and reading goes on."""

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        cfg = self.config
        if not cfg.path.is_dir():
            raise FileNotFoundError(f"{cfg.path} is not a folder")
        pacer = Pacer(cfg.fps)
        seen: set[str] = set()
        sizes: dict[str, int] = {}
        first_scan = True
        while not stop.is_set():
            for path in sorted(p for p in cfg.path.glob(cfg.pattern) if p.is_file()):
                if path.name in seen:
                    continue
                if cfg.watch and not first_scan:
                    size = path.stat().st_size
                    if sizes.get(path.name) != size:
                        sizes[path.name] = size
                        continue
                seen.add(path.name)
                img = _read(path)
                if img is None:
                    self.emit("frame.rejected", reason=f"{path.name} is not an image OpenCV can read", file=path.name)
                    continue
                if not pacer.wait(stop):
                    return
                yield Frame(img, time.time(), self.next_seq(), None, {"file": path.name})
            if not cfg.watch:
                return
            first_scan = False
            stop.wait(WATCH_POLL_S)


def _read(path: Path) -> np.ndarray | None:
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError:
        return None
    if data.size == 0:
        return None
    return cv2.imdecode(data, cv2.IMREAD_COLOR)
