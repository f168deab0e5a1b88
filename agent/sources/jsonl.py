"""JSON lines as sensor samples, replayed or followed as the file grows."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from agent.configbase import ProfilePath, Strict

KEY = "jsonl"


class Config(Strict):
    type: Literal["jsonl"]
    path: ProfilePath = Field(description="a file with one JSON object per line")
    fields: tuple[str, ...] = Field(min_length=1, description="the numeric fields to read, in model input order")
    timestamp: str | None = Field(None, description="the field holding each line's capture time")
    follow: bool = Field(False, description="keep reading lines appended to the file, like tail -f")
    rate: float | None = Field(None, gt=0, description="replay at this many lines per second")
