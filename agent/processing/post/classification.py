"""Class scores to the top-k labels."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from agent.configbase import ProfilePath, Strict

KEY = "classification"


class Config(Strict):
    type: Literal["classification"]
    output: str | None = Field(None, description="the scores output; the first output when unset")
    softmax: bool = Field(False, description="apply softmax to logits first")
    top_k: int = Field(5, gt=0, description="how many classes to report")
    threshold: float = Field(0.0, ge=0, le=1, description="leave out classes scoring below this")
    labels: ProfilePath | None = Field(None, description="a text file with one label per line")
