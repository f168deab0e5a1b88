"""Audio from a WAV file or a raw PCM stream, cut into windows with hop and context."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from agent.configbase import ProfilePath, Strict

KEY = "audio"


class Config(Strict):
    type: Literal["audio"]
    path: ProfilePath = Field(description="a WAV file, or a raw PCM file or FIFO")
    format: Literal["wav", "s16le", "f32le"] = Field("wav", description="wav, or raw little-endian 16-bit or float PCM")
    sample_rate: int = Field(16000, gt=0, description="samples per second (checked against a WAV header)")
    window: int = Field(512, gt=0, description="samples per window given to the model")
    hop: int | None = Field(None, gt=0, description="samples between window starts; the window size when unset")
    context: int = Field(0, ge=0, description="samples of the previous window prepended to each window")
    realtime: bool = Field(False, description="pace windows at the sample rate instead of as fast as possible")
