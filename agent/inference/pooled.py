"""A camera pipeline's pre, infer and post stages as steps for the process's shared workers (`stagepool`).

A step is offered to a worker only when it has an item and room downstream, so it never waits on a
queue: a worker blocked on one camera would be a worker taken from all the others. The steps call the
same per-item methods as a threaded pipeline's loops (`Pipeline`), so both run the same code per frame.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from agent.inference.handoff import END, End, Inbox
from agent.inference.runtime import Model
from agent.inference.sources.base import Frame
from agent.inference.stagepool import STAGES, Stage
from agent.inference.work import Work


class PooledStages:
    """Mixed into `Pipeline`, whose attributes and per-item methods these are."""

    name: str
    model: Model
    _in: Inbox[Frame]
    _to_infer: queue.Queue[Work | End]
    _to_post: queue.Queue[Work | End]
    _pending: tuple[Model, threading.Event] | None
    _pre_ended: bool
    _infer_ended: bool
    _stages: list[Stage]

    def _pooled_stages(self) -> list[Stage]:
        return [
            Stage(f"{self.name}-pre", self._pre_ready, self._guard("pre", self._pre_step)),
            Stage(f"{self.name}-infer", self._infer_ready, self._guard("infer", self._infer_step), heavy=True),
            Stage(f"{self.name}-post", self._post_ready, self._guard("post", self._post_step)),
        ]

    def _pre_ready(self) -> bool:
        return not self._pre_ended and self._in.waiting() and not self._to_infer.full()

    def _pre_step(self) -> None:
        frame = self._in.get()
        if frame is END:
            self._pre_ended = True
            self._to_infer.put(END)
        else:
            self._prepare(frame)

    def _infer_ready(self) -> bool:
        return self._pending is not None or (
            not self._infer_ended and not self._to_infer.empty() and not self._to_post.full()
        )

    def _infer_step(self) -> None:
        if self._pending is not None:
            self._apply_swap()
        try:
            item = self._to_infer.get_nowait()
        except queue.Empty:
            return
        if item is END:
            self._end_inference()
        else:
            self._run(self.model, [item])

    def _post_ready(self) -> bool:
        return not self._to_post.empty()

    def _post_step(self) -> None:
        work = self._to_post.get_nowait()
        if work is END:
            STAGES.detach(self._stages)
            self._finish()
        else:
            self._publish(work)

    # -- the pipeline's own, per item ---------------------------------------------------------------

    def _guard(self, stage: str, target: Callable[[], None]) -> Callable[[], None]:
        raise NotImplementedError

    def _prepare(self, frame: Frame) -> None:
        raise NotImplementedError

    def _apply_swap(self) -> None:
        raise NotImplementedError

    def _run(self, model: Model, batch: list[Work]) -> None:
        raise NotImplementedError

    def _end_inference(self) -> None:
        raise NotImplementedError

    def _publish(self, work: Work) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError
