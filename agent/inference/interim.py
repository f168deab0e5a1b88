"""An interim CPU session and its successor: a start served on the CPU provider while the provider chosen
opens beside it (`runtime.start_on_cpu`; which providers, `agent.device.session._opens_slowly_on_cpu`).

OpenVINO on the CPU compiles the model at every open (0.2 s for PP-OCR on two cores, with its blob cache),
while the CPU provider opens in 0.04 s from its optimised-graph cache: the first result comes at the CPU
provider's time. After the first run (the first result is out), the chosen provider opens on a thread,
runs that first run's input once (its first run allocates: better before it serves than on a frame),
and the shared session switches between two runs: every pipeline holding it, at once, losing no frame.
A provider that fails to open, or to run that input, is a `provider.fallback` to the CPU provider, which
then stays.

Where several pipelines stream into the session and `runtime.batching.mode` is `auto`, whether a batch
pays is judged on the session that stays, once it serves (its runs wait for the measure). A provider that
keeps a batch's buffers until its session is freed (agent.device.build.KEEPS_BATCH_MEMORY: OpenVINO) is,
where a batch does not pay, opened afresh: four PP-OCR cameras served in 1.70x one camera's RSS with the
measured batch's buffers kept, 1.08x opened afresh (bench/bench_runtime.py). Never two sessions of it at
once (OpenVINO's thread pool grows for both and stays grown: 5 -> 7 threads), and never a moment without
one: the CPU provider's session serves between the two, opened again from its optimised-graph cache (0.05
s; its weights alone until it runs). The batch is measured once the successor serves: measured before the
switch, its buffers came on top of both sessions (a first start's peak of 546 MiB against 390).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.device.build import KEEPS_BATCH_MEMORY
from agent.device.providers import CPU
from agent.device.session import OpenedSession
from agent.transport.events import Event, EventSink
from agent.util.malloc import give_back_freed

if TYPE_CHECKING:
    import numpy as np

    from agent.inference.sessions import SessionPool, SharedSession

log = logging.getLogger(__name__)

# How long an interim session waits for its first run before the provider chosen opens anyway (a camera
# that has not delivered yet): the open takes the same cores as the first frame.
FIRST_RUN_WAIT_S = 2.0
RUN_END_WAIT_S = 2.0  # for a run under way on the interim session to end, before its memory is given back


def upgrade_when_served(
    pool: SessionPool,
    shared: SharedSession,
    upgrade: Callable[[], OpenedSession | None],
    again: Callable[[], OpenedSession | None] | None,
    emit: EventSink,
    label: str,
) -> None:
    """Open the provider chosen for `shared` once it has served its first run, and switch to it (`again`: the
    interim CPU session opened anew, the way to renew it; see the module). On a thread that is not a daemon
    one: a process that exits waits for an open under way (the runtime's libraries unload at exit), and a
    release cuts the wait for the first run short."""
    shared.successor_pending = True
    work = _Upgrade(pool, shared, upgrade, again, emit, label)
    threading.Thread(target=work.run, name="session-upgrade").start()


@dataclass(frozen=True)
class _Upgrade:
    """One interim session's way to the provider chosen (`upgrade`) and back to the CPU provider (`again`)."""

    pool: SessionPool
    shared: SharedSession
    upgrade: Callable[[], OpenedSession | None]
    again: Callable[[], OpenedSession | None] | None
    emit: EventSink
    label: str

    def run(self) -> None:
        shared = self.shared
        try:
            shared.wake.wait(FIRST_RUN_WAIT_S)
            if self.pool.holds(shared):
                self._switch()
        except Exception as exc:  # a bug here must not end the process: the CPU session serves on
            log.warning(
                "model %s stays on the CPU provider: %s", self.label, exc, exc_info=log.isEnabledFor(logging.DEBUG)
            )
        finally:
            first, shared.first = shared.first, None  # held for this alone
            shared.successor_pending = False
        if first is not None and self.pool.holds(shared):
            # With `auto` batching, whether a batch pays is the staying session's to say: the interim one
            # skipped it (a batch measured on a session about to go would only hold up the first frames).
            name, feeds = first
            try:
                verdict = shared.batching_verdict(name, feeds[name])  # None: nothing to judge
                if verdict is not None:
                    if not (verdict.pays or verdict.cached) and shared.provider in KEEPS_BATCH_MEMORY:
                        self._renew(feeds)
                    shared.judge(name, feeds[name], verdict)
            except Exception as exc:  # noqa: BLE001 (ORT's errors derive from Exception: batching stays off)
                log.warning("model %s: batching not judged: %s", self.label, str(exc).strip()[:300])

    def _switch(self) -> None:
        """Open the successor and switch to it, or leave the CPU session serving (the fallbacks emitted)."""
        started = time.perf_counter()
        opened = self._opened(self.shared.first[1] if self.shared.first is not None else None)
        previous = self._swap(opened) if opened is not None else None
        if opened is None or previous is None:  # it stays on the CPU provider, or nobody holds it any more
            return
        seconds = round(time.perf_counter() - started, 3)
        provider = opened.provider
        log.info(
            "provider switched model=%s provider=%s previous=%s seconds=%.3f", self.label, provider, previous, seconds
        )
        fields = {"model": self.label, "provider": provider, "previous": previous, "seconds": seconds}
        self.emit(Event("provider.switched", fields))

    def _renew(self, feeds: dict[str, np.ndarray]) -> None:
        """The session, which holds the buffers of a batch it measured, opened afresh by way of the CPU
        provider's session (see the module); where either does not open, the session serving goes on."""
        interim = self.again() if self.again is not None else None
        provider = self.shared.provider
        if interim is None or self._swap(interim) is None:
            log.info("model %s: %s keeps the buffers of the batch it measured", self.label, provider)
            return
        del interim  # serving now: `shared` holds it, and it goes when the fresh session replaces it
        log.info("model %s: %s opens afresh, without the buffers of the batch it measured", self.label, provider)
        opened = self._opened(feeds)
        if opened is not None:
            self._swap(opened)

    def _opened(self, feeds: dict[str, np.ndarray] | None) -> OpenedSession | None:
        """The successor, opened and run once on the first run's `feeds`; None (the fallbacks emitted) when
        it does not open or fails that run (no frame came: its first frame pays the first run)."""
        opened = self.upgrade()  # each provider that fails is a provider.fallback to the CPU provider
        if opened is None:
            log.info("model %s stays on the CPU provider: the provider chosen did not open", self.label)
            return None
        if feeds is None:
            return opened
        try:
            opened.session.run(None, feeds)
        except Exception as exc:  # noqa: BLE001 (ORT's errors derive from Exception: the CPU session stays)
            reason = f"its first run failed: {str(exc).strip()[:300]}"
            log.warning("provider %s not used: %s", opened.provider, reason)
            self.emit(Event("provider.fallback", {"provider": opened.provider, "reason": reason, "next": CPU}))
            return None
        return opened

    def _swap(self, opened: OpenedSession) -> str | None:
        """The session serves from `opened`, and the memory of the one it switched from goes back; that
        one's provider, or None when nobody holds the session any more."""
        replaced = self.pool.switch(self.shared, opened)
        if replaced is None:
            return None
        previous, gone = replaced.provider, weakref.ref(replaced.session)
        del replaced  # it goes with the run under way on it, if any
        _given_back(gone)
        self.shared.settle_memory()
        return previous


def _given_back(gone: weakref.ref[object]) -> None:
    """Once the interim session is freed (a run under way on it may hold it a little longer), its memory
    goes back to the kernel: freed in small blocks all over the heap, 17 MiB of PP-OCR's stayed in RSS."""
    deadline = time.monotonic() + RUN_END_WAIT_S
    while gone() is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    give_back_freed()
