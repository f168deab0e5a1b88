"""The agent's cache folder: what can be made again (sample models, validated profiles), never state.

One place decides it, in this order: `EDGE_AGENT_CACHE` (the user's choice), systemd's `CACHE_DIRECTORY`
(the service's `CacheDirectory=`), `$XDG_CACHE_HOME/edge-agent`, `~/.cache/edge-agent`.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_folder() -> Path | None:
    """The cache folder, None where there is none (no home folder and nothing set)."""
    chosen = os.environ.get("EDGE_AGENT_CACHE") or os.environ.get("CACHE_DIRECTORY", "").split(":")[0]
    if chosen:
        return Path(chosen)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "edge-agent" if os.path.isabs(xdg) else None
