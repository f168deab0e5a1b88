"""The workers that run every camera pipeline's stages: one pool per process, sized from the thread budget.

Four threads per pipeline (capture, pre, infer, post) made four cameras on a 2-core device run 16 Python
threads that only competed for the same two cores. A camera pipeline keeps its capture thread (a source
blocks on its device) and hands its three processing stages to this pool: one worker per core of the
budget (`core_budget()`, and no more than there are cameras, nor than the sessions take runs at once: one for
an OpenVINO or GPU session) runs inferences, and one more worker is always there for pre- and
post-processing. With several cameras each CPU run has its share of the
budget's threads (`providers.run_threads`): on a 2-core device four PP-OCR cameras run two 1-thread
inferences at once, which made ~20% more results than one 2-thread run at a time (two 2-thread runs at
once did little better: their threads wait on each other); one camera keeps one 2-thread run.

Each stage runs on one worker at a time and takes its items in order, so a pipeline's frames keep
their order and its stages still overlap each other (pre of frame n+1 while frame n runs).

Inferences run on the same workers every time (the lowest-numbered, one per inference slot), which take
an inference before anything else; the last worker runs pre- and post-processing only. onnxruntime's
pool keeps state per calling thread: with inferences handed to whichever worker was free, PP-OCR's runs
took 77-80 ms against 59-71 ms from one thread (2 cores, interleaved runs), and a camera lost 12-15% of
its frames.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from agent.device.providers import core_budget
from agent.inference.sessions import POOL

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Stage:
    """One stage of one pipeline: `step` takes one item and is called only when `ready()` says so.

    `ready` must not block and reads only state that changes under a `kick()` (or in a step of this pool).
    """

    name: str
    ready: Callable[[], bool]
    step: Callable[[], None]
    heavy: bool = False  # an inference: runs only on the workers that run inferences
    running: bool = field(default=False, init=False)


class StagePool:
    """Worker threads shared by the stages of every pipeline attached; they exit when none is left."""

    def __init__(self, size: Callable[[], int] = core_budget, lanes: Callable[[], int | None] = lambda: None) -> None:
        self._size = size
        self._lanes = lanes  # how many inferences the sessions in use take at once; None: as many as come
        self._cond = threading.Condition()
        self._stages: list[Stage] = []
        self._ids: set[int] = set()  # the live workers' numbers: the lowest ones run the inferences
        self._turn = 0  # where the next search for a ready stage starts: every pipeline gets its turn
        self._heavy_turn = 0  # the same for inferences
        self._want = 0  # the workers wanted: those above it leave

    @property
    def workers(self) -> int:
        with self._cond:
            return len(self._ids)

    @property
    def inference_slots(self) -> int:
        """How many inferences may run at once: all workers but the one left for pre/post."""
        with self._cond:
            return self._slots()

    def attach(self, stages: Sequence[Stage]) -> None:
        with self._cond:
            self._stages.extend(stages)
            self._want = want = self._wanted()
            while len(self._ids) < want:
                number = min(set(range(1, want + 1)) - self._ids)
                self._ids.add(number)
                threading.Thread(target=self._work, args=(number,), name=f"stages-{number}", daemon=True).start()
            self._cond.notify_all()

    def resize(self) -> None:
        """The sessions now take fewer runs at once (an interim CPU session switched to OpenVINO): the
        workers above the new count leave once they are idle."""
        with self._cond:
            self._want = self._wanted()
            self._cond.notify_all()

    def _wanted(self) -> int:
        lanes = self._lanes()
        heavy = sum(1 for s in self._stages if s.heavy)
        return 1 + max(1, min(self._size(), heavy, heavy if lanes is None else lanes))

    def detach(self, stages: Sequence[Stage]) -> None:
        with self._cond:
            self._stages = [s for s in self._stages if s not in stages]
            self._cond.notify_all()

    def kick(self) -> None:
        """Something a stage waits for has changed (a frame came in, a swap is pending, a stop): every worker
        looks, since only some of them may run what is now ready."""
        with self._cond:
            self._cond.notify_all()

    def _slots(self) -> int:
        return max(1, len(self._ids) - 1)

    def _pick(self, number: int) -> Stage | None:
        """For a worker that runs inferences, the next inference in turn first, then pre- or post-processing;
        for the last worker, pre- and post-processing only."""
        if sum(1 for i in self._ids if i < number) < self._slots():  # one of the lowest-numbered workers
            return self._next(heavy=True) or self._next(heavy=False)
        return self._next(heavy=False)

    def _next(self, heavy: bool) -> Stage | None:
        """The next ready stage of the kind, in turn: inferences keep a pointer of their own, because a camera
        whose pre step refills its queue at once would otherwise win every free slot."""
        stages, n = self._stages, len(self._stages)
        start = self._heavy_turn if heavy else self._turn
        for i in range(n):
            stage = stages[(start + i) % n]
            if stage.heavy == heavy and not stage.running and stage.ready():
                if heavy:
                    self._heavy_turn = (start + i + 1) % n
                else:
                    self._turn = (start + i + 1) % n
                return stage
        return None

    def _work(self, number: int) -> None:
        with self._cond:
            while True:
                if number > self._want:
                    self._ids.discard(number)
                    self._cond.notify_all()  # the workers left may now take what this one would have
                    return
                stage = self._pick(number)
                if stage is None:
                    if not self._stages:
                        self._ids.discard(number)
                        return
                    self._cond.wait()
                    continue
                stage.running = True
                self._cond.release()
                try:
                    stage.step()
                except Exception:  # the pipeline guards its own steps: this is a bug in one, not a reason to stop
                    log.exception("pipeline stage failed stage=%s", stage.name)
                finally:
                    self._cond.acquire()
                    stage.running = False
                    self._cond.notify_all()  # its queues moved: stages up- and downstream may be ready now


# The process's pool: every camera pipeline's stages run on it, with no more inference workers than the
# process's sessions take runs at once (an OpenVINO or GPU session takes one: a second worker only waits).
STAGES = StagePool(lanes=POOL.lanes)
POOL.watch(STAGES.resize)
