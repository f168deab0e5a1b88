"""A line protocol from a serial port (CSV values or JSON objects per line)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agent.config.base import INVALID_VALUES_DOC, Field, InvalidValues, Strict

KEY = "serial"


@dataclass(frozen=True, kw_only=True)
class Config(Strict):
    type: Literal["serial"]
    device: str = Field(min_length=1, description="the tty, e.g. /dev/ttyUSB0")
    baud: int = Field(115200, gt=0, description="line speed")
    format: Literal["csv", "jsonl"] = Field("csv", description="how each line is written")
    fields: tuple[str, ...] | None = Field(None, min_length=1, description="field names (jsonl) or column names (csv)")
    invalid: InvalidValues = Field("reject", description=INVALID_VALUES_DOC)


import os
import select
import threading
import time
from collections.abc import Generator, Iterator

from agent.inference.processing.lazy import np
from agent.inference.sources.base import BaseSource, SourceFailedError, Window
from agent.inference.sources.jsonl import values_from_object
from agent.inference.sources.lines import invalid_value
from agent.util.backoff import Backoff
from agent.util.jsonlimits import loads

POLL_S = 0.25
MAX_LINE = 4096  # a line longer than this is noise on the wire, not a sample


def _configure(fd: int, baud: int) -> None:
    """Raw 8N1 at `baud`, no echo, no line editing: the bytes as the sensor sends them."""
    import termios
    import tty

    speed = getattr(termios, f"B{baud}", None)
    if speed is None:
        raise SourceFailedError(f"baud rate {baud} is not one this system supports")
    tty.setraw(fd)
    attrs = termios.tcgetattr(fd)
    attrs[2] |= termios.CLOCAL | termios.CREAD
    attrs[4] = attrs[5] = speed
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


class Source(BaseSource[Config]):
    """Lines from a tty: comma-separated numbers (csv) or JSON objects (jsonl). A line that does not
    parse is `frame.rejected`, and so is one longer than MAX_LINE, once, as soon as it is (the rest of it
    is dropped up to its newline); a port that disappears (USB unplugged) is `source.lost`, reopened with
    backoff, then `source.recovered`."""

    sensor = True

    @staticmethod
    def example(config: Config) -> np.ndarray | None:
        return np.zeros(len(config.fields)) if config.fields else None

    def frames(self, stop: threading.Event) -> Iterator[Window]:
        cfg = self.config
        if cfg.format == "jsonl" and not cfg.fields:
            raise SourceFailedError("a jsonl serial source needs fields (the numeric fields to read, in order)")
        backoff = Backoff(30.0)
        lost = False
        while not stop.is_set():
            try:
                fd = os.open(cfg.device, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
            except OSError as exc:
                if not lost:
                    self.emit("source.lost", reason=f"cannot open {cfg.device}: {exc.strerror}")
                    lost = True
                stop.wait(backoff.next_delay())
                continue
            try:
                if os.isatty(fd):
                    _configure(fd, cfg.baud)
                if lost:
                    self.emit("source.recovered")
                    lost = False
                backoff.reset()
                reason = yield from self._lines(fd, stop)
            finally:
                os.close(fd)
            if reason and not stop.is_set():
                self.emit("source.lost", reason=reason)
                lost = True
                stop.wait(backoff.next_delay())

    def _lines(self, fd: int, stop: threading.Event) -> Generator[Window, None, str]:
        """Samples until the port fails (the reason is returned) or `stop` is set."""
        pending = b""
        overlong = False  # inside a line already refused as too long: dropped up to its newline
        first = True  # the first line may be the tail of one sent before we opened the port
        while not stop.is_set():
            ready, _, _ = select.select([fd], [], [], POLL_S)
            if not ready:
                continue
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                continue
            except OSError as exc:
                return f"{self.config.device}: {exc.strerror}"
            if not data:
                return f"{self.config.device} closed"
            pending += data
            *lines, pending = pending.split(b"\n")
            if overlong:
                if not lines:
                    pending = b""
                    continue
                overlong = False
                lines.pop(0)  # the refused line's end, not a line: its tail once passed as a sample
            for raw in lines:
                if len(raw) > MAX_LINE:  # arrived whole within one read
                    self._too_long(raw)
                    first = False
                    continue
                text = raw.decode("utf-8", "replace").strip()
                if not text:
                    continue
                try:
                    values = self._parse(text)
                except ValueError as exc:
                    if not first:
                        self.emit("frame.rejected", reason=f"{self.config.device}: {exc}: {text[:80]!r}")
                    first = False
                    continue
                first = False
                yield Window(values, time.time(), self.next_seq())
            if len(pending) > MAX_LINE:  # refused now, not at its newline: a line may never end
                self._too_long(pending)
                pending, overlong, first = b"", True, False
        return ""

    def _too_long(self, raw: bytes) -> None:
        text = raw[:80].decode("utf-8", "replace")
        self.emit("frame.rejected", reason=f"{self.config.device}: a line longer than {MAX_LINE} bytes: {text!r}")

    def _parse(self, text: str) -> np.ndarray:
        cfg = self.config
        if cfg.format == "jsonl":
            obj = loads(text, max_bytes=MAX_LINE)
            return values_from_object(obj, cfg.fields or (), cfg.invalid)  # frames() refuses jsonl without fields
        cells = [c.strip() for c in text.split(",")]
        if cfg.fields is not None and len(cells) != len(cfg.fields):
            raise ValueError(f"{len(cells)} values, expected {len(cfg.fields)} ({', '.join(cfg.fields)})")
        try:
            values = np.array([float(c) for c in cells], dtype=np.float64)
        except ValueError:
            raise ValueError("not comma-separated numbers") from None
        for k, cell in enumerate(cells):
            if not np.isfinite(values[k]) and (why := invalid_value(cell, cfg.invalid)) is not None:
                raise ValueError(f"value {k + 1}: {why}")
        return values
