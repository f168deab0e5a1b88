"""Linux Industrial I/O channels read from sysfs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from agent.configbase import Strict

KEY = "iio"


class Config(Strict):
    type: Literal["iio"]
    device: str = Field(min_length=1, description="an IIO device name (iio:device0) or its sysfs folder")
    channels: tuple[str, ...] = Field(min_length=1, description="channel names, e.g. in_accel_x")
    rate: float = Field(10.0, gt=0, description="samples per second")
    root: str = Field("/sys/bus/iio/devices", description="where IIO devices are found")
