"""JSON lines as sensor samples, replayed or followed as the file grows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agent.config.base import INVALID_VALUES_DOC, Field, InvalidValues, ProfilePath, Strict

KEY = "jsonl"


@dataclass(frozen=True, kw_only=True)
class Config(Strict):
    type: Literal["jsonl"]
    path: ProfilePath = Field(description="a file with one JSON object per line")
    fields: tuple[str, ...] = Field(min_length=1, description="the numeric fields to read, in model input order")
    timestamp: str | None = Field(None, description="the field holding each line's capture time")
    follow: bool = Field(False, description="keep reading lines appended to the file, like tail -f")
    rate: float | None = Field(None, gt=0, description="replay at this many lines per second")
    invalid: InvalidValues = Field("reject", description=INVALID_VALUES_DOC)


import re
import threading
from collections.abc import Iterator

from agent.inference.processing.lazy import np
from agent.inference.sources.base import BaseSource, Pacer, Window
from agent.inference.sources.lines import MAX_LINE, Offsets, invalid_value, now, parse_time, passes
from agent.util.jsonlimits import loads

# The parser's "line 1 column 9 (char 8)": a row is one line, and the event names the file's line.
_POSITION = re.compile(r": line \d+ column \d+ \(char \d+\)")


def values_from_object(obj: object, fields: tuple[str, ...], invalid: str = "reject") -> np.ndarray:
    """The named numeric fields of a JSON object, in order; ValueError with the reason otherwise (also
    for NaN, infinity and numbers beyond float range, unless `invalid` is "pass")."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    out = np.empty(len(fields), dtype=np.float64)
    for k, name in enumerate(fields):
        if name not in obj:
            raise ValueError(f"field {name!r} is missing")
        value = obj[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"field {name!r} is {str(value)[:40]!r}, not a number")
        if (why := invalid_value(value, invalid)) is not None:
            raise ValueError(f"field {name!r}: {why}")
        out[k] = value
    return out


class Source(BaseSource[Config]):
    sensor = True

    @staticmethod
    def example(config: Config) -> np.ndarray | None:
        return np.zeros(len(config.fields))

    def frames(self, stop: threading.Event) -> Iterator[Window]:
        cfg = self.config
        pacer = Pacer(cfg.rate)
        offset = Offsets(cfg.timestamp is not None)
        for lines in passes(cfg.path, cfg.follow, stop):
            for number, line in lines:
                if line is not None and not line.strip():
                    continue
                try:
                    if line is None:
                        raise ValueError(f"longer than {MAX_LINE} bytes")
                    obj = loads(line, max_bytes=MAX_LINE)  # bounded: a nested line is refused, not a crash
                    values = values_from_object(obj, cfg.fields, cfg.invalid)
                    ts = parse_time(obj[cfg.timestamp]) if cfg.timestamp is not None else now()
                except (ValueError, KeyError) as exc:
                    reason = (
                        f"timestamp field {cfg.timestamp!r} is missing"
                        if isinstance(exc, KeyError)
                        else _POSITION.sub("", str(exc))
                    )
                    self.emit("frame.rejected", reason=f"{cfg.path.name} line {number}: {reason}")
                    continue
                if not pacer.wait(stop):
                    return
                yield Window(values, ts, self.next_seq(), offset(ts))
