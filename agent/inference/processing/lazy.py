"""numpy and OpenCV imported on first use.

Plug-in modules hold both their config (imported by every `edge-agent check`) and their
implementation; importing numpy and OpenCV eagerly would add ~170 ms to each profile check.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any


class LazyModule:
    def __init__(self, name: str) -> None:
        self.__dict__["_lazy_name"] = name

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self.__dict__["_lazy_name"])
        # Later lookups hit the instance dict directly, as fast as the module's own.
        self.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
        return getattr(module, attr)


__all__ = ["LazyModule", "cv2", "np"]

if TYPE_CHECKING:  # the type checker sees the modules themselves
    import cv2
    import numpy as np
else:
    np = LazyModule("numpy")
    cv2 = LazyModule("cv2")
