"""One background thread with an explicit start and stop, for every part that runs on its own."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Worker:
    """Runs `target` on a named daemon thread until `stopping` is set.

    `start()` is idempotent, `stop()` sets `stopping`, calls `wake` (for a part that sleeps on its own
    event or queue) and joins for at most `join_timeout` seconds, so shutdown order stays explicit in the
    owner while the thread bookkeeping lives here once.
    """

    def __init__(
        self,
        name: str,
        target: Callable[[], None],
        *,
        join_timeout: float | None = 5.0,
        wake: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.stopping = threading.Event()
        self._target = target
        self._join_timeout = join_timeout
        self._wake = wake
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        if self._thread is None:
            self.stopping.clear()
            self._thread = threading.Thread(target=self._target, name=self.name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self._wake is not None:
            self._wake()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(self._join_timeout)
