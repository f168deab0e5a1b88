"""The local status page: `/healthz` for probes, `/metrics` for Prometheus, `/api/status` as JSON,
`/frame/<pipeline>.jpg` with the latest boxes drawn, and `/` (one self-contained HTML page).

Like health, it knows none of the agent's parts: the daemon hands in three callables,

    server = StatusServer(profile.runtime.http, snapshot=status_snapshot, frame=latest_frame, alive=why_unhealthy)
    server.start()      # raises StatusPageError when the address cannot be bound
    ...
    server.stop()

- `snapshot()` -> a `StatusSnapshot` (snapshot.py): every endpoint renders that one typed document.
- `frame(pipeline)` -> (image, boxes) or None (frames.py): image is JPEG bytes or a BGR uint8 array
  (encoded only when someone looks), boxes are result boxes ({"box": [x1, y1, x2, y2], "score", "label"}).
- `alive()` -> None when healthy, otherwise the reason /healthz answers 503 with.

Modules: server.py (HTTP), snapshot.py (the typed document), metrics.py (Prometheus text),
frames.py (JPEG drawing), page.html (the page, package data).
"""

from agent.service.statuspage.frames import Frame, FrameGetter, draw_boxes
from agent.service.statuspage.metrics import render_metrics
from agent.service.statuspage.server import MAX_CLIENTS, StatusPageError, StatusServer, parse_address
from agent.service.statuspage.snapshot import ConnectionStatus, StatusSnapshot

__all__ = [
    "MAX_CLIENTS",
    "ConnectionStatus",
    "Frame",
    "FrameGetter",
    "StatusPageError",
    "StatusServer",
    "StatusSnapshot",
    "draw_boxes",
    "parse_address",
    "render_metrics",
]
