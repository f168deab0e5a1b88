"""V4L2 cameras and network streams (RTSP, HTTP/MJPEG) through OpenCV."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from agent.configbase import Strict
from agent.units import Duration

KEY = "camera"


class Config(Strict):
    type: Literal["camera"]
    device: str | int = Field(
        description="a V4L2 device path (/dev/video0), a device index (0), or a stream URL (rtsp://, http://)"
    )
    fps: float | None = Field(None, gt=0, description="frames per second to request; the camera's own rate when unset")
    width: int | None = Field(None, gt=0, description="capture width in pixels")
    height: int | None = Field(None, gt=0, description="capture height in pixels")
    reconnect_max: Duration = Field(30.0, gt=0, description="longest wait between reconnect attempts")
    frozen_after: Duration = Field(10.0, gt=0, description="identical frames for this long raise a source.frozen event")
