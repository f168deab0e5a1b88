"""Preprocessing declared in the profile: image geometry, colour, normalisation, layout, dtype."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from agent.configbase import Strict


class PreprocessConfig(Strict):
    input: str | None = Field(None, description="the model input fed by the source; the first input when unset")
    resize: tuple[int, int] | None = Field(None, description="[width, height] to resize frames to")
    letterbox: bool = Field(False, description="keep the aspect ratio when resizing, padding the rest")
    crop: tuple[int, int, int, int] | None = Field(None, description="[x, y, width, height] region of interest, in source pixels")
    color: Literal["rgb", "bgr", "gray"] = Field("rgb", description="channel order the model expects")
    scale: float = Field(1.0, description="multiply pixel or sample values by this first")
    mean: tuple[float, ...] | None = Field(None, min_length=1, description="per-channel mean subtracted after scaling")
    std: tuple[float, ...] | None = Field(None, min_length=1, description="per-channel standard deviation divided after the mean")
    layout: Literal["nchw", "nhwc", "nc", "ncw"] = Field("nchw", description="tensor layout of the model input")
    dtype: Literal["float32", "float16", "uint8", "int8", "int64"] = Field("float32", description="tensor element type")
    window: int | None = Field(None, gt=0, description="sensor samples stacked into one model input")
    hop: int | None = Field(None, gt=0, description="samples between sensor windows; the window size when unset")

    @model_validator(mode="after")
    def _check(self) -> "PreprocessConfig":
        channels = 1 if self.color == "gray" else 3
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None and len(values) not in (1, channels) and self.window is None:
                raise ValueError(
                    f"{name} has {len(values)} values but color {self.color} has {channels} channel(s)"
                )
        if self.std is not None and any(v == 0 for v in self.std):
            raise ValueError("std values must not be 0")
        if self.resize is not None and min(self.resize) <= 0:
            raise ValueError(f"resize must be two sizes > 0, got {list(self.resize)}")
        if self.hop is not None and self.window is None:
            raise ValueError("hop needs window")
        return self
