"""The latest frame of a pipeline as a JPEG with its boxes drawn, encoded only when someone looks."""

from __future__ import annotations

import math
import numbers
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence

import cv2
import numpy as np

JPEG_QUALITY = 80
BOX_COLOR = (0, 200, 255)  # BGR amber: visible on both dark and light scenes

# A result box: {"box": [x1, y1, x2, y2], "score": ..., "label": ...} in source pixels, or the bare corners.
Box = Mapping[str, object] | Sequence[float]
Image = bytes | np.ndarray
# (image, boxes): JPEG bytes or the BGR uint8 array a camera source produced, and the result's boxes.
Frame = tuple[Image, Sequence[Box]]
FrameGetter = Callable[[str], Frame | None]


class FrameCache:
    """The last rendered JPEG per pipeline: a page polling every second re-encodes only new frames."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, tuple[Image, list[Box], bytes]] = {}

    def render(self, pipeline: str, image: Image, boxes: Sequence[Box]) -> bytes:
        drawn = list(boxes)
        with self._lock:
            hit = self._last.get(pipeline)
            if hit is not None and hit[0] is image and hit[1] == drawn:
                return hit[2]
        jpeg = draw_boxes(image, drawn)
        with self._lock:
            # The image itself is kept as the key: identity stays meaningful while it is alive.
            self._last[pipeline] = (image, drawn, jpeg)
        return jpeg


def draw_boxes(image: Image, boxes: Iterable[Box]) -> bytes:
    """A JPEG of the image with each box ([x1, y1, x2, y2] in source pixels) and its label drawn."""
    boxes = list(boxes)
    if isinstance(image, bytes):
        if not boxes:
            return image
        picture = cv2.imdecode(np.frombuffer(image, dtype=np.uint8), cv2.IMREAD_COLOR)
        if picture is None:
            raise ValueError("the latest frame is not a decodable JPEG")
    else:
        picture = np.asarray(image)
        if picture.ndim == 2:
            picture = cv2.cvtColor(picture, cv2.COLOR_GRAY2BGR)
        elif picture.ndim != 3 or picture.shape[2] not in (3, 4):
            raise ValueError(f"the latest frame has shape {picture.shape}, not an image")
        # A copy: the boxes must not be drawn into the frame the pipeline still holds.
        picture = np.array(picture[:, :, :3], dtype=np.uint8, copy=True)
    thickness = max(1, round(max(picture.shape[:2]) / 400))
    for item in boxes:
        corners, caption = _box_and_caption(item)
        if corners is None:
            continue
        x1, y1, x2, y2 = (round(v) for v in corners)
        cv2.rectangle(picture, (x1, y1), (x2, y2), BOX_COLOR, thickness)
        if caption:
            cv2.putText(
                picture,
                caption,
                (x1, max(12, y1 - 4)),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.4 * thickness,
                BOX_COLOR,
                thickness,
                cv2.LINE_AA,
            )
    ok, buf = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError("the latest frame could not be encoded as JPEG")
    return bytes(buf.tobytes())


def _box_and_caption(item: Box) -> tuple[list[float] | None, str]:
    """The corners and the caption of one box; None for a box that cannot be drawn (skipped, not an error)."""
    if isinstance(item, Mapping):
        corners, parts = item.get("box"), []
        label = item.get("label", item.get("class"))
        if label is not None:
            parts.append(str(label))
        score = item.get("score")
        if isinstance(score, (int, float)):
            parts.append(f"{score:.2f}")
        caption = " ".join(parts)
    else:
        corners, caption = item, ""
    if not isinstance(corners, Sequence) or isinstance(corners, (str, bytes)):
        return None, ""
    values: list[float] = []
    for v in corners:
        if not isinstance(v, numbers.Real) or not math.isfinite(v):
            return None, ""
        values.append(float(v))
    return (values, caption) if len(values) == 4 else (None, "")
