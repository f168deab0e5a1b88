"""DB-style text probability map (PP-OCR detector) to text boxes in source pixels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from agent.config.base import Field, Strict

KEY = "text-detection"


@dataclass(frozen=True, kw_only=True)
class Config(Strict):
    type: Literal["text-detection"]
    output: str | None = Field(None, description="the probability map output; the first output when unset")
    threshold: float = Field(0.3, gt=0, lt=1, description="pixel probability that counts as text")
    box_threshold: float = Field(0.6, gt=0, le=1, description="mean probability a box needs to be kept")
    min_size: int = Field(3, ge=1, description="shortest box side kept, in model pixels")
    unclip: float = Field(1.5, gt=0, description="how far boxes are grown around the shrunk text core")
    max_boxes: int = Field(100, gt=0, description="boxes kept per frame")


from agent.inference.processing.lazy import cv2, np
from agent.inference.processing.post.base import BasePostprocessor, PostContext

if TYPE_CHECKING:
    from agent.inference.processing.post.base import Output, Outputs


class Postprocessor(BasePostprocessor[Config]):
    """DB post-processing as PaddleOCR does it: binarise, contours, mean score inside, unclip.

    Boxes are axis-aligned `[x1, y1, x2, y2]` in source pixels, around the unclipped rotated box.
    """

    def __call__(self, outputs: Outputs, ctx: PostContext) -> Output:
        cfg = self.config
        prob = np.asarray(outputs[self.output])
        prob = prob.reshape(prob.shape[-2], prob.shape[-1]).astype(np.float32, copy=False)
        bitmap = (prob > cfg.threshold).astype(np.uint8)
        contours, _ = cv2.findContours(bitmap, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        h, w = prob.shape
        found: list[tuple[float, list[float]]] = []
        for contour in contours:
            if len(contour) < 4:
                continue
            (cx, cy), (rw, rh), angle = cv2.minAreaRect(contour)
            if min(rw, rh) < cfg.min_size:
                continue
            score = self._mean_score(prob, contour, w, h)
            if score < cfg.box_threshold:
                continue
            # Unclip: DB trains on text shrunk by area * (1 - r^2) / perimeter; grow it back.
            area, perimeter = rw * rh, 2 * (rw + rh)
            d = area * cfg.unclip / perimeter if perimeter > 0 else 0.0
            grown = cv2.boxPoints(((cx, cy), (rw + 2 * d, rh + 2 * d), angle))
            if min(rw, rh) + 2 * d < cfg.min_size + 2:
                continue
            x1, y1 = grown.min(axis=0)
            x2, y2 = grown.max(axis=0)
            box = [max(0.0, float(x1)), max(0.0, float(y1)), min(float(w), float(x2)), min(float(h), float(y2))]
            found.append((score, box))
        found.sort(key=lambda f: -f[0])
        boxes: list[dict[str, Any]] = []
        for score, box in found[: cfg.max_boxes]:
            boxes.append(
                {
                    "box": ctx.geometry.box_to_source(box) if ctx.geometry else [int(round(v)) for v in box],
                    "score": round(float(score), 4),
                }
            )
        boxes.sort(key=lambda b: (b["box"][1], b["box"][0]))
        return {"boxes": boxes}

    @staticmethod
    def _mean_score(prob: np.ndarray, contour: np.ndarray, w: int, h: int) -> float:
        x, y, bw, bh = cv2.boundingRect(contour)
        x2, y2 = min(w, x + bw), min(h, y + bh)
        mask = np.zeros((y2 - y, x2 - x), dtype=np.uint8)
        cv2.fillPoly(mask, [contour.reshape(-1, 2) - [x, y]], 1)
        return float(cv2.mean(prob[y:y2, x:x2], mask)[0])
