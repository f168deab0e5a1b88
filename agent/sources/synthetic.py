"""A moving test pattern with text drawn at known places, for demos and tests."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from agent.configbase import Strict

KEY = "synthetic"


class Config(Strict):
    type: Literal["synthetic"]
    width: int = Field(640, gt=0, le=8192, description="frame width in pixels")
    height: int = Field(480, gt=0, le=8192, description="frame height in pixels")
    fps: float = Field(10.0, gt=0, description="frames per second")
    text: tuple[str, ...] = Field(("EDGE AGENT", "HELLO 42"), description="lines of text drawn on the frames")
    frames: int | None = Field(None, gt=0, description="stop after this many frames; endless when unset")
