"""Linux Industrial I/O channels read from sysfs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from agent.config.base import Strict

KEY = "iio"


class Config(Strict):
    type: Literal["iio"]
    device: str = Field(min_length=1, description="an IIO device name (iio:device0) or its sysfs folder")
    channels: tuple[str, ...] = Field(min_length=1, description="channel names, e.g. in_accel_x")
    rate: float = Field(10.0, gt=0, description="samples per second")
    root: str = Field("/sys/bus/iio/devices", description="where IIO devices are found")


import threading
import time
from collections.abc import Iterator
from pathlib import Path

from agent.inference.processing.lazy import np
from agent.inference.sources.base import BaseSource, Pacer, Window
from agent.util.backoff import Backoff


def device_dir(root: Path, device: str) -> Path | None:
    """The sysfs folder of an IIO device given as a folder, `iio:deviceN`, or its `name` (e.g. adxl345)."""
    given = Path(device)
    if given.is_absolute():
        return given if given.is_dir() else None
    if (root / device).is_dir():
        return root / device
    for folder in sorted(root.glob("iio:device*")):
        name = folder / "name"
        if name.is_file() and name.read_text().strip() == device:
            return folder
    return None


def _number(path: Path, default: float) -> float:
    try:
        return float(path.read_text().strip())
    except FileNotFoundError:
        return default


class Source(BaseSource[Config]):
    """Channels read from sysfs at `rate`: value = (raw + offset) * scale, as the IIO ABI defines,
    with `<channel>_scale` or the shared `in_<type>_scale` when present. A device that goes away is
    `source.lost` and is looked for again with backoff."""

    sensor = True

    @staticmethod
    def example(config: Config) -> np.ndarray | None:
        return np.zeros(len(config.channels))

    def frames(self, stop: threading.Event) -> Iterator[Window]:
        cfg = self.config
        backoff = Backoff(30.0)
        lost = False
        while not stop.is_set():
            folder = device_dir(Path(cfg.root), cfg.device)
            try:
                if folder is None:
                    raise FileNotFoundError(f"no IIO device {cfg.device!r} under {cfg.root}")
                scales, offsets, raws = self._channels(folder)
                if lost:
                    self.emit("source.recovered")
                    lost = False
                backoff.reset()
                pacer = Pacer(cfg.rate)
                while pacer.wait(stop):
                    raw = np.array([float(p.read_text().strip()) for p in raws])
                    yield Window((raw + offsets) * scales, time.time(), self.next_seq())
                return
            except (OSError, ValueError) as exc:
                if not lost:
                    self.emit("source.lost", reason=str(exc))
                    lost = True
                stop.wait(backoff.next_delay())

    def _channels(self, folder: Path) -> tuple[np.ndarray, np.ndarray, list[Path]]:
        cfg = self.config
        scales, offsets, raws = [], [], []
        for channel in cfg.channels:
            raw = folder / f"{channel}_raw"
            if not raw.is_file():
                raw = folder / channel
            if not raw.is_file():
                raise FileNotFoundError(f"{folder.name} has no channel {channel!r}")
            shared = "_".join(channel.split("_")[:2])  # in_accel_x -> in_accel
            scales.append(_number(folder / f"{channel}_scale", _number(folder / f"{shared}_scale", 1.0)))
            offsets.append(_number(folder / f"{channel}_offset", _number(folder / f"{shared}_offset", 0.0)))
            raws.append(raw)
        return np.array(scales), np.array(offsets), raws
