"""The bounded hand-offs between a pipeline's threads, and the end-of-stream marker they carry.

A camera must never wait for the pipeline, so its hand-off keeps only the newest frame and counts the
ones it replaced (`LatestSlot`). Every other source waits when the queue is full (backpressure), so
nothing is dropped (`Inbox` with `live=False`).
"""

from __future__ import annotations

import enum
import queue
import threading
from collections.abc import Callable
from typing import Final, Generic, Literal, TypeVar

T = TypeVar("T")


class _End(enum.Enum):
    END = "end"


END: Final = _End.END  # put after the last item: the stage that reads it finishes and passes it on
End = Literal[_End.END]

PUT_POLL_S = 0.5  # how often a producer blocked on a full queue checks whether it should give up


def take_waiting(q: queue.Queue[T | End], first: T, limit: int) -> tuple[list[T], bool]:
    """`first` and the items already waiting behind it, up to `limit` in all; True when END was taken."""
    batch = [first]
    while len(batch) < limit:
        try:
            item = q.get_nowait()
        except queue.Empty:
            return batch, False
        if item is END:
            return batch, True
        batch.append(item)
    return batch, False


class LatestSlot(Generic[T]):
    """A one-item queue where a new item replaces the waiting one (counted): the camera side."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: T | End = END
        self._closed = False
        self.replaced = 0

    def put(self, item: T) -> None:
        with self._cond:
            if self._item is not END:
                self.replaced += 1
            self._item = item
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def get(self) -> T | End:
        """The waiting item, or END once closed and empty."""
        with self._cond:
            while self._item is END and not self._closed:
                self._cond.wait()
            item, self._item = self._item, END
            return item

    def waiting(self) -> bool:
        """`get` would not wait: an item is there, or the slot is closed."""
        with self._cond:
            return self._item is not END or self._closed


class Inbox(Generic[T]):
    """What the capture thread hands on: the newest item only (`live`), or all of them, waiting for room."""

    def __init__(self, live: bool, size: int) -> None:
        self._slot: LatestSlot[T] | None = LatestSlot() if live else None
        self._queue: queue.Queue[T | End] = queue.Queue(size)

    @property
    def replaced(self) -> int:
        """Items a newer one replaced before they were read (always 0 unless live)."""
        return self._slot.replaced if self._slot is not None else 0

    def put(self, item: T, give_up: Callable[[], bool]) -> None:
        """Hand on `item`; while the queue is full, wait, unless `give_up()` says nobody will read it."""
        if self._slot is not None:
            self._slot.put(item)
            return
        while True:
            try:
                self._queue.put(item, timeout=PUT_POLL_S)
                return
            except queue.Full:
                if give_up():
                    return

    def close(self) -> None:
        """No more items: the reader gets END after the ones still waiting."""
        if self._slot is not None:
            self._slot.close()
        else:
            self._queue.put(END)

    def get(self) -> T | End:
        return self._slot.get() if self._slot is not None else self._queue.get()

    def waiting(self) -> bool:
        """`get` would not wait (for a stage pool's worker, which must never block on a source)."""
        return self._slot.waiting() if self._slot is not None else not self._queue.empty()
