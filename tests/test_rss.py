"""This process's RSS (agent.util.rss), read as psutil reads it, without psutil on a start's path."""

from __future__ import annotations

import numpy as np
import psutil

from agent.util.rss import rss_bytes

MIB = 1 << 20


def test_rss_is_psutils_figure_and_follows_what_the_process_touches() -> None:
    before = rss_bytes()
    assert before is not None and abs(before - psutil.Process().memory_info().rss) < 4 * MIB
    block = np.ones(64 * MIB, np.uint8)  # every page written: resident
    grown = rss_bytes()
    assert grown is not None and grown - before >= 60 * MIB
    del block
