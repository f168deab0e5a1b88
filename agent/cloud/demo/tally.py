"""Everything the demo counts from what arrives over MQTT: for the rows, the seq check and the summary."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

WINDOW = 200  # results kept for the rows' rates and percentiles


@dataclass
class Arrival:
    """One result as decoded from the broker, when it arrived, and whether a row has shown it yet."""

    result: dict[str, Any]
    at: float
    shown: bool = False


@dataclass
class Tally:
    results: int = 0
    seqs: set[int] = field(default_factory=set)
    source_seqs: set[int] = field(default_factory=set)
    duplicates: int = 0
    versions: list[str] = field(default_factory=list)
    swap_seq: int | None = None
    first_at: float | None = None
    window: deque[Arrival] = field(default_factory=lambda: deque(maxlen=WINDOW))
    health: dict[str, Any] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    status: str | None = None

    def add_result(self, msg: dict[str, Any]) -> None:
        seq = msg.get("seq")
        if isinstance(seq, int):
            if seq in self.seqs:
                self.duplicates += 1
            self.seqs.add(seq)
        if isinstance(msg.get("source_seq"), int):
            self.source_seqs.add(msg["source_seq"])
        self.results += 1
        if self.first_at is None:
            self.first_at = time.monotonic()
        version = str(msg.get("model_version"))
        if not self.versions or self.versions[-1] != version:
            if self.versions and self.swap_seq is None:
                self.swap_seq = seq if isinstance(seq, int) else None
            self.versions.append(version)
        self.window.append(Arrival(msg, time.monotonic()))

    @property
    def frames_skipped(self) -> int:
        """Camera frames between the first and the last result that were not inferred (a busy pipeline skips)."""
        s = self.source_seqs
        return (max(s) - min(s) + 1) - len(s) if s else 0

    @property
    def gaps(self) -> int:
        if not self.seqs:
            return 0
        return (max(self.seqs) - min(self.seqs) + 1) - len(self.seqs)
