"""A video file, read in order, optionally looped."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from agent.configbase import ProfilePath, Strict

KEY = "video"


class Config(Strict):
    type: Literal["video"]
    path: ProfilePath = Field(description="a video file OpenCV can read (MP4, AVI, MKV)")
    loop: bool = Field(False, description="start again at the end instead of stopping")
    realtime: bool = Field(False, description="pace frames at the file's frame rate instead of as fast as possible")
    fps: float | None = Field(None, gt=0, description="pace frames at this rate (overrides the file's rate)")
