"""Still images from a folder, optionally watched for new files."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from agent.configbase import ProfilePath, Strict

KEY = "images"


class Config(Strict):
    type: Literal["images"]
    path: ProfilePath = Field(description="a folder of images")
    pattern: str = Field("*", min_length=1, description="a glob of file names to read")
    watch: bool = Field(False, description="keep running and read files as they appear")
    fps: float | None = Field(None, gt=0, description="pace images at this rate")
