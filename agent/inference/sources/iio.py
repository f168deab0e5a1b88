"""Linux Industrial I/O channels read from sysfs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agent.config.base import Field, Strict

KEY = "iio"


@dataclass(frozen=True, kw_only=True)
class Config(Strict):
    type: Literal["iio"]
    device: str = Field(min_length=1, description="an IIO device name (iio:device0) or its sysfs folder")
    channels: tuple[str, ...] = Field(min_length=1, description="channel names, e.g. in_accel_x")
    rate: float = Field(10.0, gt=0, description="samples per second")
    root: str = Field("/sys/bus/iio/devices", description="where IIO devices are found")


import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from agent.inference.processing.lazy import np
from agent.inference.sources.base import BaseSource, Pacer, Window
from agent.util.backoff import Backoff
from agent.util.files import read_small

# sysfs gives an attribute one page at most: a file under `root` larger than this is not one. Bounded
# reads of regular files only: a FIFO as a scale blocked the source for ever, and a 512 MiB scale file
# took 53 s and 7 GiB, its whole text then carried in the source.lost reason.
MAX_ATTRIBUTE = 4096


def _text(path: Path) -> str:
    """An attribute's text, stripped: OSError when it is not a small regular file, ValueError when it
    is not text."""
    try:
        data = read_small(path, MAX_ATTRIBUTE)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise OSError(f"{path.name}: {exc.strerror or exc}") from None
    if len(data) > MAX_ATTRIBUTE:
        raise OSError(f"{path.name} is larger than {MAX_ATTRIBUTE} bytes, not a sysfs attribute")
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{path.name} holds {data[:40]!r}, not text") from None


def _finite(path: Path) -> float:
    """The finite number an attribute holds, else ValueError naming the file and its text."""
    text = _text(path)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"{path.name} holds {text[:40]!r}, not a finite number")
    return value


def device_dir(root: Path, device: str) -> Path | None:
    """The sysfs folder of an IIO device given as a folder, `iio:deviceN`, or its `name` (e.g. adxl345)."""
    given = Path(device)
    if given.is_absolute():
        return given if given.is_dir() else None
    if (root / device).is_dir():
        return root / device
    for folder in sorted(root.glob("iio:device*")):
        try:
            name = _text(folder / "name")
        except (OSError, ValueError):
            continue  # another device's unreadable name must not hide this one
        if name == device:
            return folder
    return None


def _number(paths: tuple[Path, ...], default: float) -> float:
    """The number in the first of `paths` that exists (those after it are not read), else `default`."""
    for path in paths:
        try:
            return _finite(path)
        except FileNotFoundError:
            continue
    return default


class Source(BaseSource[Config]):
    """Channels read from sysfs at `rate`: value = (raw + offset) * scale, as the IIO ABI defines,
    with `<channel>_scale` or the shared `in_<type>_scale` when present. A device that goes away, or
    whose scale or offset is not a finite number, is `source.lost` and is looked for again with
    backoff. A sample whose raw value is not a finite number is `frame.rejected`."""

    sensor = True

    @staticmethod
    def example(config: Config) -> np.ndarray | None:
        return np.zeros(len(config.channels))

    def frames(self, stop: threading.Event) -> Iterator[Window]:
        cfg = self.config
        backoff = Backoff(30.0)
        lost = False
        while not stop.is_set():
            try:
                folder = device_dir(Path(cfg.root), cfg.device)
                if folder is None:
                    raise FileNotFoundError(f"no IIO device {cfg.device!r} under {cfg.root}")
                scales, offsets, raws = self._channels(folder)
                if lost:
                    self.emit("source.recovered")
                    lost = False
                backoff.reset()
                pacer = Pacer(cfg.rate)
                while pacer.wait(stop):
                    if (values := self._sample(raws, offsets, scales)) is not None:
                        yield Window(values, time.time(), self.next_seq())
                return
            except (OSError, ValueError) as exc:
                if not lost:
                    self.emit("source.lost", reason=str(exc))
                    lost = True
                stop.wait(backoff.next_delay())

    def _sample(self, raws: list[Path], offsets: np.ndarray, scales: np.ndarray) -> np.ndarray | None:
        """One sample, or None when a raw value is not a finite number (`frame.rejected`); OSError when
        the device has gone."""
        raw = np.empty(len(raws))
        for k, path in enumerate(raws):
            try:
                raw[k] = _finite(path)
            except ValueError as exc:
                self.emit("frame.rejected", reason=f"{path.parent.name}: {exc}")
                return None
        with np.errstate(over="ignore", invalid="ignore"):
            values: np.ndarray = (raw + offsets) * scales
        if not np.isfinite(values).all():
            k = int(np.flatnonzero(~np.isfinite(values))[0])
            why = f"({raw[k]} + {offsets[k]}) * {scales[k]} is beyond the range of a float"
            self.emit("frame.rejected", reason=f"{raws[k].parent.name}: {raws[k].name}: {why}")
            return None
        return values

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
            scales.append(_number((folder / f"{channel}_scale", folder / f"{shared}_scale"), 1.0))
            offsets.append(_number((folder / f"{channel}_offset", folder / f"{shared}_offset"), 0.0))
            raws.append(raw)
        return np.array(scales), np.array(offsets), raws
