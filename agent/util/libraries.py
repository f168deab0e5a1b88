"""What the libraries the agent loads start on their own, kept quiet: one process set-up for every verb.

- numpy's BLAS (OpenBLAS) and OpenCV each start a pool of a thread per core when they are imported, and
  nothing on the agent's path uses them in parallel: inference has the device's thread budget (the
  sessions' pools, `agent.device.providers.core_budget`), and pre- and post-processing run on the
  pipelines' own workers (`agent.inference.stagepool`). Their pools would only be idle threads competing
  for the same cores: one thread each.
- onnxruntime's Linux wheels (1.32 here) start a telemetry thread at import that writes `$TMPDIR/.ses` and
  posts usage events to mobile.events.data.microsoft.com, from threads it starts while a session serves.
  A device fleet sends nothing nobody asked for: off (`ORT_DISABLE_TELEMETRY=1`).

Must run before numpy, OpenCV and onnxruntime are imported; an operator's own setting wins (for example
`ORT_DISABLE_TELEMETRY=0` to send onnxruntime's telemetry).
"""

from __future__ import annotations

import os

LIBRARY_SETTINGS = {"OPENBLAS_NUM_THREADS": "1", "OPENCV_FOR_THREADS_NUM": "1", "ORT_DISABLE_TELEMETRY": "1"}


def quiet_libraries() -> None:
    for name, value in LIBRARY_SETTINGS.items():
        os.environ.setdefault(name, value)
