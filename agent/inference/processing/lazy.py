"""numpy and OpenCV imported on first use.

Plug-in modules hold both their config (imported by every `edge-agent check`) and their
implementation; importing numpy and OpenCV eagerly would add ~170 ms to each profile check.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any


class LazyModule:
    def __init__(self, name: str, on_import: Callable[[ModuleType], None] | None = None) -> None:
        self.__dict__["_lazy_name"] = name
        self.__dict__["_on_import"] = on_import

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self.__dict__["_lazy_name"])
        if self.__dict__["_on_import"] is not None:
            self.__dict__["_on_import"](module)
        # Later lookups hit the instance dict directly, as fast as the module's own.
        self.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
        return getattr(module, attr)


__all__ = ["LazyModule", "cv2", "np", "preload_opencv"]

if TYPE_CHECKING:  # the type checker sees the modules themselves
    import cv2
    import numpy as np
else:

    def _one_thread(module: ModuleType) -> None:
        # Pre- and post-processing run on the pipelines' own threads, overlapping inference; OpenCV's own
        # pool (a thread per core) would compete with the sessions' pools for the device's one thread
        # budget, for nothing measurable at camera frame sizes (1.6 ms either way at 1280x720 -> 640x480).
        module.setNumThreads(1)

    np = LazyModule("numpy")
    cv2 = LazyModule("cv2", _one_thread)


def preload_opencv() -> None:
    """Import OpenCV now on a short-lived thread of its own: an image pipeline needs it for its first
    frame, and onnxruntime releases the interpreter while it builds the model's session, so the import
    runs beside the load instead of after it (on the way to the first result)."""
    threading.Thread(target=_touch_opencv, name="import-opencv", daemon=True).start()


def _touch_opencv() -> None:
    _ = cv2.resize
