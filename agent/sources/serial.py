"""A line protocol from a serial port (CSV values or JSON objects per line)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from agent.configbase import Strict

KEY = "serial"


class Config(Strict):
    type: Literal["serial"]
    device: str = Field(min_length=1, description="the tty, e.g. /dev/ttyUSB0")
    baud: int = Field(115200, gt=0, description="line speed")
    format: Literal["csv", "jsonl"] = Field("csv", description="how each line is written")
    fields: tuple[str, ...] | None = Field(None, min_length=1, description="field names (jsonl) or column names (csv)")
