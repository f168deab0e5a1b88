"""Still images from a folder, optionally watched for new files."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agent.config.base import Field, ProfilePath, Strict

KEY = "images"


@dataclass(frozen=True, kw_only=True)
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
from agent.util.files import read_small
from agent.util.libraries import MAX_SIDE

WATCH_POLL_S = 0.5
# A file larger than any image of MAX_SIDE x MAX_SIDE pixels is compressed (a 16-bit RGBA PNG of that size is
# 512 MiB raw): not read, so a folder others write to cannot fill the device's memory with one file.
MAX_IMAGE_BYTES = 128 << 20


class Source(BaseSource[Config]):
    """Image files in name order; with `watch`, files that appear later too (once their size holds
    still for one poll, so a file being copied in is not read half-written). A file that is not an
    image, or is larger than the bounds (`MAX_IMAGE_BYTES`, `MAX_SIDE` x `MAX_SIDE` pixels), is a
    `frame.rejected` event naming it, and reading goes on. A watched folder's names are remembered only
    while their files are there: a folder emptied as it is read does not grow the agent's memory."""

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        cfg = self.config
        if not cfg.path.is_dir():
            raise FileNotFoundError(f"{cfg.path} is not a folder")
        pacer = Pacer(cfg.fps)
        seen: set[str] = set()
        sizes: dict[str, int] = {}
        first_scan = True
        while not stop.is_set():
            present = sorted(p for p in cfg.path.glob(cfg.pattern) if p.is_file())
            names = {p.name for p in present}
            seen &= names
            sizes = {name: size for name, size in sizes.items() if name in names}
            for path in present:
                if path.name in seen:
                    continue
                if cfg.watch and not first_scan:
                    size = path.stat().st_size
                    if sizes.get(path.name) != size:
                        sizes[path.name] = size
                        continue
                seen.add(path.name)
                img, problem = _read(path)
                if img is None:
                    self.emit("frame.rejected", reason=f"{path.name} {problem}", file=path.name)
                    continue
                if not pacer.wait(stop):
                    return
                yield Frame(img, time.time(), self.next_seq(), None, {"file": path.name})
            if not cfg.watch:
                return
            first_scan = False
            stop.wait(WATCH_POLL_S)


def _read(path: Path) -> tuple[np.ndarray | None, str]:
    """The decoded image, or None and what is wrong with the file (after its name, in one line)."""
    try:
        data = read_small(path, MAX_IMAGE_BYTES)
    except OSError as exc:
        return None, f"cannot be read: {exc.strerror or exc}"
    if len(data) > MAX_IMAGE_BYTES:
        return None, f"is larger than {MAX_IMAGE_BYTES >> 20} MiB, more than an image of {MAX_SIDE}x{MAX_SIDE} pixels"
    try:
        img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR) if data else None
    except cv2.error:  # OpenCV refuses more pixels than OPENCV_IO_MAX_IMAGE_PIXELS before it allocates
        return None, f"has more pixels than the {MAX_SIDE}x{MAX_SIDE} an image may have, or is corrupt"
    return img, "is not an image OpenCV can read"
