"""YOLO-family detection output to boxes in source pixels, after confidence filter and NMS."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from agent.config.base import Field, ProfilePath, Strict

KEY = "detection"


@dataclass(frozen=True, kw_only=True)
class Config(Strict):
    type: Literal["detection"]
    format: Literal["yolov8", "yolov5"] = Field("yolov8", description="layout of the output tensor")
    output: str | None = Field(None, description="the detections output; the first output when unset")
    threshold: float = Field(0.25, ge=0, le=1, description="minimum confidence")
    iou: float = Field(0.45, gt=0, le=1, description="IoU above which overlapping boxes are suppressed")
    max_detections: int = Field(100, gt=0, description="boxes kept per frame")
    labels: ProfilePath | None = Field(None, description="a text file with one label per line")
    classes: tuple[int, ...] | None = Field(None, description="only report these class ids")


from collections.abc import Mapping, Sequence

from agent.inference.processing.lazy import cv2, np
from agent.inference.processing.post.base import BasePostprocessor, PostContext, read_labels

if TYPE_CHECKING:
    from agent.inference.processing.post.base import Output, Outputs, OutputValue


class Postprocessor(BasePostprocessor[Config]):
    """YOLOv8 ([1, 4+C, N]) or YOLOv5 ([1, N, 5+C]) rows to boxes, NMS per class, source pixels."""

    def __init__(
        self, config: Config, output_names: Sequence[str], output_types: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(config, output_names, output_types)
        self.labels = read_labels(config.labels)
        self.keep = set(config.classes) if config.classes is not None else None

    def decode(self, raw: OutputValue) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows of (cx, cy, w, h) boxes, their confidences and class ids, before NMS."""
        pred = np.asarray(raw, dtype=np.float32)
        pred = pred[0] if pred.ndim == 3 else pred
        if self.config.format == "yolov8":
            rows = pred.T  # [4+C, N] -> [N, 4+C]
            cls_scores = rows[:, 4:]
            boxes = rows[:, :4]
        else:
            rows = pred  # [N, 5+C]: objectness times class score
            cls_scores = rows[:, 5:] * rows[:, 4:5]
            boxes = rows[:, :4]
        if cls_scores.shape[1] == 0:
            return boxes[:0], np.zeros(0, np.float32), np.zeros(0, np.int64)
        class_ids = cls_scores.argmax(axis=1)
        conf = cls_scores[np.arange(len(rows)), class_ids]
        return boxes, conf, class_ids

    def __call__(self, outputs: Outputs, ctx: PostContext) -> Output:
        cfg = self.config
        boxes, conf, class_ids = self.decode(outputs[self.output])
        mask = conf >= cfg.threshold
        if self.keep is not None:
            mask &= np.isin(class_ids, list(self.keep))
        boxes, conf, class_ids = boxes[mask], conf[mask], class_ids[mask]
        detections: list[dict[str, Any]] = []
        if len(conf):
            xywh = np.column_stack(
                [boxes[:, 0] - boxes[:, 2] / 2, boxes[:, 1] - boxes[:, 3] / 2, boxes[:, 2], boxes[:, 3]]
            )
            keep = cv2.dnn.NMSBoxesBatched(xywh.tolist(), conf.tolist(), class_ids.tolist(), cfg.threshold, cfg.iou)
            order = sorted((int(i) for i in np.asarray(keep).reshape(-1)), key=lambda i: -conf[i])[: cfg.max_detections]
            for i in order:
                x, y, w, h = xywh[i]
                box = [float(x), float(y), float(x + w), float(y + h)]
                entry: dict[str, Any] = {
                    "box": ctx.geometry.box_to_source(box) if ctx.geometry else [round(v, 1) for v in box],
                    "score": round(float(conf[i]), 4),
                    "class": int(class_ids[i]),
                }
                if self.labels is not None and entry["class"] < len(self.labels):
                    entry["label"] = self.labels[entry["class"]]
                detections.append(entry)
        return {"detections": detections}
