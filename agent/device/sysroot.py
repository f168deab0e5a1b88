"""The kernel's own files (/proc, /sys, /dev, /etc) read under a root directory.

The hardware probe reads every fact through this, so that tests point it at trees captured from real
devices (tests/fixtures/hardware/) instead of this machine's `/`.
"""

from __future__ import annotations

import os
from pathlib import Path


class SysRoot:
    """Reads files under a root directory; every miss is None, never an exception."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    def text(self, rel: str) -> str | None:
        try:
            return self.path(rel).read_text(errors="replace")
        except OSError:
            return None

    def line(self, rel: str) -> str | None:
        """The file as one stripped line; device-tree strings end in NUL, which is dropped."""
        text = self.text(rel)
        if text is None:
            return None
        return text.replace("\x00", " ").strip() or None

    def listdir(self, rel: str) -> list[str]:
        try:
            return sorted(os.listdir(self.path(rel)))
        except OSError:
            return []

    def exists(self, rel: str) -> bool:
        return os.path.lexists(self.path(rel))
