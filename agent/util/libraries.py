"""What the libraries the agent loads start on their own, kept quiet: one process set-up for every verb.

- numpy's BLAS (OpenBLAS) and OpenCV each start a pool of a thread per core when they are imported, and
  nothing on the agent's path uses them in parallel: inference has the device's thread budget (the
  sessions' pools, `agent.device.providers.core_budget`), and pre- and post-processing run on the
  pipelines' own workers (`agent.inference.stagepool`). Their pools would only be idle threads competing
  for the same cores: one thread each.
- onnxruntime's Linux wheels (1.32 here) start a telemetry thread at import that writes `$TMPDIR/.ses` and
  posts usage events to mobile.events.data.microsoft.com, from threads it starts while a session serves.
  A device fleet sends nothing nobody asked for: off (`ORT_DISABLE_TELEMETRY=1`).
- OpenCV decodes an image of up to 2^30 pixels: a 140 KB PNG of 12000x12000 pixels from a watched folder
  took 900 MB to decode. An image may have `MAX_SIDE` x `MAX_SIDE` pixels, the largest frame a profile
  may ask for; a larger one is refused by OpenCV before it allocates (`OPENCV_IO_MAX_IMAGE_PIXELS`).

Must run before numpy, OpenCV and onnxruntime are imported; an operator's own setting wins (for example
`ORT_DISABLE_TELEMETRY=0` to send onnxruntime's telemetry).
"""

from __future__ import annotations

import os

# The largest image side the agent handles: 8K video is 7680 pixels; a larger frame is gigabytes.
MAX_SIDE = 8192

LIBRARY_SETTINGS = {
    "OPENBLAS_NUM_THREADS": "1",
    "OPENCV_FOR_THREADS_NUM": "1",
    "ORT_DISABLE_TELEMETRY": "1",
    "OPENCV_IO_MAX_IMAGE_PIXELS": str(MAX_SIDE * MAX_SIDE),
}


def quiet_libraries() -> None:
    for name, value in LIBRARY_SETTINGS.items():
        os.environ.setdefault(name, value)
