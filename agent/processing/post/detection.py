"""YOLO-family detection output to boxes in source pixels, after confidence filter and NMS."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from agent.configbase import ProfilePath, Strict

KEY = "detection"


class Config(Strict):
    type: Literal["detection"]
    format: Literal["yolov8", "yolov5"] = Field("yolov8", description="layout of the output tensor")
    output: str | None = Field(None, description="the detections output; the first output when unset")
    threshold: float = Field(0.25, ge=0, le=1, description="minimum confidence")
    iou: float = Field(0.45, gt=0, le=1, description="IoU above which overlapping boxes are suppressed")
    max_detections: int = Field(100, gt=0, description="boxes kept per frame")
    labels: ProfilePath | None = Field(None, description="a text file with one label per line")
    classes: tuple[int, ...] | None = Field(None, description="only report these class ids")
