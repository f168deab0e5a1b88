"""DB-style text probability map (PP-OCR detector) to text boxes in source pixels."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from agent.configbase import Strict

KEY = "text-detection"


class Config(Strict):
    type: Literal["text-detection"]
    output: str | None = Field(None, description="the probability map output; the first output when unset")
    threshold: float = Field(0.3, gt=0, lt=1, description="pixel probability that counts as text")
    box_threshold: float = Field(0.6, gt=0, le=1, description="mean probability a box needs to be kept")
    min_size: int = Field(3, ge=1, description="shortest box side kept, in model pixels")
    unclip: float = Field(1.5, gt=0, description="how far boxes are grown around the shrunk text core")
    max_boxes: int = Field(100, gt=0, description="boxes kept per frame")
