"""Rows of a CSV file as sensor samples, replayed or followed as it grows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agent.config.base import INVALID_VALUES_DOC, Field, InvalidValues, ProfilePath, Strict

KEY = "csv"


@dataclass(frozen=True, kw_only=True)
class Config(Strict):
    type: Literal["csv"]
    path: ProfilePath = Field(description="a CSV file with a header row")
    columns: tuple[str, ...] | None = Field(
        None, min_length=1, description="value columns, in model input order; all numeric columns when unset"
    )
    timestamp: str | None = Field(
        None, description="the column holding each row's capture time (ISO 8601 or epoch seconds)"
    )
    follow: bool = Field(False, description="keep reading lines appended to the file, like tail -f")
    rate: float | None = Field(
        None, gt=0, description="replay at this many rows per second; as fast as possible when unset"
    )
    invalid: InvalidValues = Field("reject", description=INVALID_VALUES_DOC)


import csv as _csv
import math
import threading
from collections.abc import Iterator

from agent.inference.processing.lazy import np
from agent.inference.sources.base import BaseSource, Pacer, SourceFailedError, Window
from agent.inference.sources.lines import MAX_LINE, Offsets, invalid_value, now, parse_time, passes


class Source(BaseSource[Config]):
    """Each row is one sample: the value columns in order, as float. A row that does not parse, has
    another number of cells than the header, or holds NaN or infinity (unless `invalid: pass`) is a
    `frame.rejected` event naming the line and column, and reading goes on."""

    sensor = True

    @staticmethod
    def example(config: Config) -> np.ndarray | None:
        return np.zeros(len(config.columns)) if config.columns else None

    def frames(self, stop: threading.Event) -> Iterator[Window]:
        cfg = self.config
        pacer = Pacer(cfg.rate)
        offset = Offsets(cfg.timestamp is not None)
        for lines in passes(cfg.path, cfg.follow, stop):
            header: list[str] | None = None
            index: list[int] = []
            ts_index: int | None = None
            for number, line in lines:
                if line is None:
                    self.emit("frame.rejected", reason=f"{cfg.path.name} line {number}: longer than {MAX_LINE} bytes")
                    continue
                if not line.strip():
                    continue
                try:
                    cells = _cells(line)
                except ValueError as exc:
                    self.emit("frame.rejected", reason=f"{cfg.path.name} line {number}: {exc}")
                    continue
                if header is None:
                    header = [c.strip() for c in cells]
                    index, ts_index = self._columns(header, cfg)
                    continue
                if not index:  # all numeric columns: decided by the first data row
                    index = [i for i, c in enumerate(cells) if i != ts_index and _is_number(c)]
                    if not index:
                        raise SourceFailedError(f"{cfg.path.name}: no numeric columns in line {number}")
                try:
                    if len(cells) != len(header):
                        raise ValueError(f"{len(cells)} cells, the header has {len(header)}")
                    values = self._values(cells, index, header, cfg.invalid)
                    ts = parse_time(cells[ts_index]) if ts_index is not None else now()
                except ValueError as exc:
                    self.emit("frame.rejected", reason=f"{cfg.path.name} line {number}: {exc}")
                    continue
                if not pacer.wait(stop):
                    return
                yield Window(values, ts, self.next_seq(), offset(ts))

    @staticmethod
    def _columns(header: list[str], cfg: Config) -> tuple[list[int], int | None]:
        ts_index = None
        if cfg.timestamp is not None:
            if cfg.timestamp not in header:
                raise SourceFailedError(
                    f"{cfg.path.name}: no timestamp column {cfg.timestamp!r} (columns: {', '.join(header)})"
                )
            ts_index = header.index(cfg.timestamp)
        if cfg.columns is None:
            return [], ts_index
        missing = [c for c in cfg.columns if c not in header]
        if missing:
            raise SourceFailedError(f"{cfg.path.name}: no column {missing[0]!r} (columns: {', '.join(header)})")
        return [header.index(c) for c in cfg.columns], ts_index

    @staticmethod
    def _values(cells: list[str], index: list[int], header: list[str], invalid: str) -> np.ndarray:
        out = np.empty(len(index), dtype=np.float64)
        for k, i in enumerate(index):
            try:
                value = float(cells[i])
            except ValueError:
                raise ValueError(f"{cells[i][:40]!r} in column {header[i]!r} is not a number") from None
            if not math.isfinite(value) and (why := invalid_value(cells[i].strip(), invalid)) is not None:
                raise ValueError(f"column {header[i]!r}: {why}")
            out[k] = value
        return out


def _cells(line: str) -> list[str]:
    """The cells of one line; ValueError for quoting the csv module cannot read (a stray CR, NUL)."""
    if '"' not in line:  # str.split when nothing is quoted: a third of the cost of a csv.reader per line
        return line.split(",")
    try:
        return next(_csv.reader([line]))
    except _csv.Error as exc:
        raise ValueError(f"not a CSV row ({exc})") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
