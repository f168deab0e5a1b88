"""The thread pools that libraries start on their own, kept to one thread each.

numpy's BLAS (OpenBLAS) and OpenCV each start a pool of a thread per core when they are imported, and
nothing on the agent's path uses them in parallel: inference has the device's thread budget (the
sessions' pools, `agent.device.providers.core_budget`), and pre- and post-processing run on the
pipelines' own workers (`agent.inference.stagepool`). Their pools would only be idle threads competing
for the same cores. Must run before numpy and OpenCV are imported; an operator's own setting wins.
"""

from __future__ import annotations

import os

LIBRARY_POOLS = ("OPENBLAS_NUM_THREADS", "OPENCV_FOR_THREADS_NUM")


def limit_library_pools() -> None:
    for name in LIBRARY_POOLS:
        os.environ.setdefault(name, "1")
