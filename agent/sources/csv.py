"""Rows of a CSV file as sensor samples, replayed or followed as it grows."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from agent.configbase import ProfilePath, Strict

KEY = "csv"


class Config(Strict):
    type: Literal["csv"]
    path: ProfilePath = Field(description="a CSV file with a header row")
    columns: tuple[str, ...] | None = Field(None, min_length=1, description="value columns, in model input order; all numeric columns when unset")
    timestamp: str | None = Field(None, description="the column holding each row's capture time (ISO 8601 or epoch seconds)")
    follow: bool = Field(False, description="keep reading lines appended to the file, like tail -f")
    rate: float | None = Field(None, gt=0, description="replay at this many rows per second; as fast as possible when unset")
