"""One inference loop: source -> preprocess -> infer -> postprocess -> sink, in stages joined by bounded
hand-offs (`handoff`), so that capture, preprocessing and publishing overlap inference.

- Each stage of a sensor or file pipeline has a thread of its own. A camera pipeline has only its capture
  thread: its other stages run on the process's shared workers (`stagepool`), so that N cameras cost
  N threads plus a pool sized from the device's cores, not 4N.

- Live sources (cameras) never wait: the newest frame wins and the ones replaced are counted as dropped.
  Every other source waits for the pipeline (backpressure): nothing is dropped.
- Bad input is an event, never an exception out of the pipeline: a frame the model cannot take is
  `frame.rejected`, a source failure is `source.error` and the source is restarted with backoff, a failed
  inference is `inference.error`. Repeats of one event kind are folded (`throttle`).
- `swap()` loads and warms a new model beside the serving one (on the caller's thread), then the
  inference thread switches between two frames: no frame is dropped, none runs on a half-loaded model,
  and each result names the model version that produced it.
- `stop()` ends the source, lets the frame in hand (and, for sensors, every sample already read) finish
  and be published, and joins the threads.

`loader.open_pipelines` builds pipelines from the profile; `stats` holds what a pipeline reports.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.config.base import PluginConfig
from agent.config.profile import MqttConfig, PipelineConfig, RuntimeConfig
from agent.device.graphprep import StreamPlan
from agent.inference.handoff import END, End, Inbox, take_waiting
from agent.inference.pooled import PooledStages
from agent.inference.processing.post import make_postprocessor
from agent.inference.processing.post.base import PostContext, boxes_of
from agent.inference.processing.pre import FrameRejectedError
from agent.inference.runtime import Model, ModelError, ModelState
from agent.inference.sources import make_source
from agent.inference.sources.base import BaseSource, Frame, SourceContext, SourceFailedError, Subscriptions, Window
from agent.inference.stagepool import STAGES, Stage
from agent.inference.stats import PipelineState, PipelineStats, RateMeter, Timings, has_nan, zero_counts
from agent.inference.swap import HotSwap
from agent.inference.throttle import EventThrottle
from agent.inference.warmup import preprocessor
from agent.inference.work import Postprocessor, Work, result_payload
from agent.transport.events import Event, EventSink, Sink, log_event
from agent.util.backoff import Backoff
from agent.util.timeline import START

log = logging.getLogger(__name__)

QUEUE_SIZE = 4  # frames between two stages: enough to overlap them, small enough to keep latency low
SENSOR_QUEUE_SIZE = 256  # samples are small; deep queues turn per-sample thread hand-offs into bursts
MAX_BATCH = 64  # sensor samples run together when several are waiting and the model takes a batch
SOURCE_BACKOFF_CAP = 30.0
IDLE_POLL_S = 0.05  # how often an idle inference thread looks for a pending swap


class Pipeline(HotSwap, PooledStages):
    """Build with a loaded `Model` (see `loader.open_pipeline` to load from the profile), then `start()`."""

    def __init__(
        self,
        config: PipelineConfig,
        model: Model,
        sink: Sink,
        *,
        device: str,
        runtime: RuntimeConfig | None = None,
        state_dir: Path | None = None,
        emit: EventSink = log_event,
        source: BaseSource[PluginConfig] | None = None,
        qos: int = 1,
        mqtt: MqttConfig | None = None,
        connection: Subscriptions | None = None,
        plan: StreamPlan | None = None,
    ) -> None:
        self.config = config
        self.plan = plan  # how a swap's model is fed, as the first one was (agent.inference.warmup.stream_plans)
        self.name = config.name
        self.device = device
        self.sink = sink
        self.runtime = runtime or RuntimeConfig()
        self.state_dir = Path(state_dir) if state_dir is not None else Path(".")
        self._emit_to = emit
        self._throttled = EventThrottle(self._emit_raw)
        self._announced = False
        self._announcing = threading.RLock()
        self.qos = config.qos if config.qos is not None else qos
        self.source = source or make_source(
            config.source,
            SourceContext(
                pipeline=config.name,
                emit=self._source_emit,
                mqtt=mqtt,
                device=device,
                connection=connection,
            ),
        )
        self.live = self.source.live
        # A camera's stages run on the shared workers; sensors keep theirs (a tiny model runs thousands of
        # times a second, and a hand-off through the pool would cost it more than the run).
        self.pooled = self.live
        self._stages: list[Stage] = []
        self._wake: Callable[[], None] = STAGES.kick if self.pooled else _nothing
        self._period = 1.0 / config.rate if config.rate else 0.0
        self._next_slot = 0.0
        self._pre_ended = self._infer_ended = False
        self.model = model
        self._model_state: ModelState = model.new_state()
        self.pre = preprocessor(config, model)
        self.post = self._make_post(model)
        self._pending: tuple[Model, threading.Event] | None = None
        self._swap_lock = threading.Lock()
        self._last_input: np.ndarray | None = None
        self._last_frame: np.ndarray | None = None  # the frame behind it
        self._stop = threading.Event()
        self._finished = threading.Event()
        self._served = threading.Event()  # the first result is out, or the pipeline ended without one
        self._threads: list[threading.Thread] = []  # capture, and pre, infer, post unless pooled
        self._infer_thread: threading.Thread | None = None
        size = SENSOR_QUEUE_SIZE if self.source.sensor else QUEUE_SIZE
        self._in: Inbox[Frame] = Inbox(self.live, size)
        # A live frame waits at most one inference before it runs: stale frames are worse than dropped ones.
        self._to_infer: queue.Queue[Work | End] = queue.Queue(1 if self.live else size)
        self._to_post: queue.Queue[Work | End] = queue.Queue(size)
        self.timings = Timings(("pre", "infer", "post", "total"))
        self._counts = zero_counts()
        self._results_rate = RateMeter()
        self._state: PipelineState = "created"
        self._last_error: str | None = None
        self._busy_since: float | None = None  # when the inference in progress began: a watchdog reads it
        self._latest: tuple[np.ndarray, list[dict[str, Any]]] | None = None  # the last published image, its boxes

    # -- public API ------------------------------------------------------------------------------

    def start(self, announce: bool = True) -> Pipeline:
        """Start serving; `announce=False` leaves `pipeline.started` to `announce` (the daemon's start sends it
        once the first result is out), though never after another event of this pipeline."""
        if self._threads:
            raise RuntimeError(f"pipeline {self.name} already started")
        self._state = "running"
        if self.pooled:
            self._stages = self._pooled_stages()
            STAGES.attach(self._stages)
        threads = (("pre", self._preprocess), ("infer", self._infer), ("post", self._postprocess))
        for name, target in (("capture", self._capture), *(() if self.pooled else threads)):
            thread = threading.Thread(target=self._guard(name, target), name=f"{self.name}-{name}", daemon=True)
            self._threads.append(thread)
            if name == "infer":
                self._infer_thread = thread
            thread.start()
        if announce:
            self.announce()
        return self

    def announce(self) -> None:
        """`pipeline.started`, once, and before any other event of this pipeline."""
        with self._announcing:
            if self._announced or not self._threads:
                return
            self._emit_raw(
                self._event(
                    "pipeline.started",
                    model=self.model.name,
                    version=self.model.version,
                    provider=self.model.provider,
                    source=self.config.source.type,
                )
            )
            self._announced = True  # after it is out: another thread's event waits on the lock until then

    def wait_served(self, timeout: float) -> bool:
        """Until the first result is published, or the pipeline ended without one."""
        return self._served.wait(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """End the source; finish and publish the frame in hand; join the threads."""
        self._stop.set()
        self._wake()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if self._stages and not self._finished.wait(max(0.0, deadline - time.monotonic())):
            alive.append(f"{self.name} stages")
        if alive:
            log.warning("pipeline threads still running after stop name=%s threads=%s", self.name, alive)
        if self._state == "running":
            self._state = "stopped"

    def wait(self, timeout: float | None = None) -> bool:
        """Until a finite source has ended and its last result is published (or the pipeline stopped)."""
        return self._finished.wait(timeout)

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def busy_for(self) -> float | None:
        """Seconds the inference in progress has run, None when idle: a watchdog's stuck check."""
        busy = self._busy_since
        return time.monotonic() - busy if busy is not None else None

    def latest_frame(self) -> tuple[np.ndarray, list[dict[str, Any]]] | None:
        """The last image a result was published for (BGR, never written to) and its boxes, for a
        status page; None for sensor pipelines and before the first result."""
        return self._latest

    def stats(self) -> PipelineStats:
        """A snapshot for health: counters, per-stage p50/p95 in ms, rate, model, state and memory."""
        busy = self._busy_since
        return {
            "pipeline": self.name,
            "state": self._state,
            "source": self.config.source.type,
            "model": self.model.name,
            "model_version": self.model.version,
            "provider": self.model.provider,
            **self._counts,
            "dropped": self._in.replaced,
            "results_per_s": round(self._results_rate.rate(), 2),
            "inference_running_s": round(time.monotonic() - busy, 3) if busy is not None else 0.0,
            "latency_ms": self.timings.snapshot(),
            "last_error": self._last_error,
            **self.model.memory_share(),
        }

    # -- stages ----------------------------------------------------------------------------------

    def _capture(self) -> None:
        backoff = Backoff(SOURCE_BACKOFF_CAP)
        try:
            while not self._stop.is_set():
                try:
                    for frame in self.source.frames(self._stop):
                        self._counts["frames"] += 1
                        self._in.put(frame, self._nobody_reads)
                        self._wake()
                        backoff.reset()
                        if self._stop.is_set():
                            break
                    break  # the source ended (a finite file) or we were stopped
                except SourceFailedError as exc:
                    self._counts["source_errors"] += 1
                    self._error("source.error", str(exc), source=self.config.source.type, retry=False)
                    break
                except Exception as exc:  # a source bug or a device error must not end the daemon
                    self._counts["source_errors"] += 1
                    delay = backoff.next_delay()
                    self._error(
                        "source.error", _reason(exc), source=self.config.source.type, retry_in_s=round(delay, 2)
                    )
                    log.debug("source failed", exc_info=True)
                    self._stop.wait(delay)
        finally:
            try:
                self.source.close()
            except Exception:
                log.debug("source close failed", exc_info=True)
            self._in.close()
            self._wake()

    def _nobody_reads(self) -> bool:
        """Backpressure waits, but lets stop() through when the stages downstream have ended."""
        return self._stop.is_set() and not any(t.is_alive() for t in self._threads[1:])

    def _preprocess(self) -> None:
        while (frame := self._in.get()) is not END:
            self._prepare(frame)
        self._to_infer.put(END)

    def _prepare(self, frame: Frame) -> None:
        """One frame preprocessed and handed to inference, unless skipped (rate), rejected or a window filling."""
        period = self._period
        if period:
            now = time.monotonic()
            if now < self._next_slot:
                if self.live:  # cameras: frames between two slots are skipped and counted
                    self._counts["skipped"] += 1
                    return
                self._stop.wait(self._next_slot - now)  # sensors: wait, nothing is dropped
                now = time.monotonic()
            # Drift-free, but after a stall at most one slot is caught up, never a burst.
            self._next_slot = max(self._next_slot, now - period) + period
        started = time.perf_counter()
        try:
            tensor, geometry = self.pre(frame.data)
        except Exception as exc:  # noqa: BLE001 (any failure to prepare one frame rejects that frame only)
            self._reject(frame, exc)
            return
        if tensor is None:  # a sensor window still filling
            return
        pre_ms = (time.perf_counter() - started) * 1000
        self._to_infer.put(Work(frame, tensor, geometry, pre_ms, started, frames=self.pre.frames))

    def _reject(self, frame: Frame, exc: Exception) -> None:
        self._counts["rejected"] += 1
        reason = str(exc) if isinstance(exc, FrameRejectedError) else _reason(exc)
        self._folded("frame.rejected", reason=reason, source_seq=frame.seq)

    def _infer_alive(self) -> bool:
        if self.pooled:
            return bool(self._stages) and not self._infer_ended and not self._finished.is_set()
        return self._infer_thread is not None and self._infer_thread.is_alive()

    def _infer(self) -> None:
        while True:
            if self._pending is not None:
                self._apply_swap()
            try:
                item = self._to_infer.get(timeout=IDLE_POLL_S)
            except queue.Empty:
                continue
            if item is END:
                break
            model = self.model
            if item.frames != model.takes_frames and not self._prepare_again(item):
                continue
            # Only sensor samples are gathered into batches: for images a batch would add its
            # latency to every frame for little gain on a CPU.
            if model.batchable and not self.live and isinstance(item.frame, Window):
                batch, end_after = take_waiting(self._to_infer, item, MAX_BATCH)
            else:
                batch, end_after = [item], False
            self._run(model, batch)
            if end_after:
                break
        self._end_inference()

    def _end_inference(self) -> None:
        if self._pending is not None:
            self._apply_swap()
        self._infer_ended = True
        self.model.close()  # no run is left: the shared session is freed once no pipeline holds it
        self._to_post.put(END)

    def _run(self, model: Model, batch: list[Work]) -> None:
        post = self.post
        started = time.perf_counter()
        self._busy_since = time.monotonic()
        try:
            if len(batch) == 1:
                company = STAGES.inference_slots if self.pooled else None
                outputs = [model.run(batch[0].tensor, self._model_state, company)]
            else:
                try:
                    outputs = model.run_batch([w.tensor for w in batch])
                except Exception:  # noqa: BLE001 (the model said it takes a batch but does not: stop trying)
                    model.batchable = False
                    outputs = [model.run(w.tensor, self._model_state) for w in batch]
        except Exception as exc:  # noqa: BLE001 (ORT's errors derive from Exception)
            self._counts["inference_errors"] += len(batch)
            reason = f"{exc.__class__.__name__}: {str(exc).strip()[:300]}"
            self._folded(
                "inference.error", reason=reason, model=model.name, version=model.version, source_seq=batch[0].frame.seq
            )
            return
        finally:
            self._busy_since = None
        infer_ms = (time.perf_counter() - started) * 1000
        self._counts["inferences"] += len(batch)
        self._last_input, self._last_frame = batch[-1].tensor, batch[-1].frame.data
        for work, out in zip(batch, outputs, strict=True):
            work.outputs, work.infer_ms, work.model, work.post = out, infer_ms, model, post
            self.timings.add("infer", infer_ms)
            self._to_post.put(work)

    def _postprocess(self) -> None:
        while (work := self._to_post.get()) is not END:
            self._publish(work)
        self._finish()

    def _publish(self, work: Work) -> None:
        """One frame's outputs post-processed and handed to the sink as its result."""
        frame, model = work.frame, work.model
        assert model is not None and work.post is not None
        self._counts["nan_outputs"] += has_nan(work.outputs)
        started = time.perf_counter()
        try:
            output = work.post(work.outputs, PostContext(work.geometry, frame.t, frame.ts, work.tensor))
        except Exception as exc:  # noqa: BLE001 (a plug-in's failure on one output is an event, not the end)
            self._counts["post_errors"] += 1
            self._folded("postprocess.error", reason=_reason(exc), source_seq=frame.seq)
            return
        post_ms = (time.perf_counter() - started) * 1000
        self.timings.add("pre", work.pre_ms)
        self.timings.add("post", post_ms)
        if output is None:
            return
        try:
            self.sink.result(self.name, result_payload(self.device, self.name, work, model, output, post_ms), self.qos)
        except Exception as exc:  # noqa: BLE001 (the sink's failure is counted and reported; the loop goes on)
            self._counts["sink_errors"] += 1
            self._folded("sink.error", reason=_reason(exc))
            return
        self._counts["results"] += 1
        if self._counts["results"] == 1:
            START.first_result(self.name)
            self._served.set()
        self._results_rate.mark(time.monotonic())
        if frame.data.ndim >= 2:
            self._latest = (frame.data, boxes_of(output))
        self.timings.add("total", (time.perf_counter() - work.started) * 1000)

    def _finish(self) -> None:
        self._finished.set()
        self._served.set()
        if self._state == "running":
            self._state = "finished" if not self._stop.is_set() else "stopped"
            self.emit(
                "pipeline.finished" if self._state == "finished" else "pipeline.stopped",
                results=self._counts["results"],
            )

    # -- helpers ---------------------------------------------------------------------------------

    def _make_post(self, model: Model, *, discard: bool = False) -> Postprocessor:
        try:
            return make_postprocessor(
                self.config.postprocess, model.output_names, {k: v.type for k, v in model.outputs.items()}
            )
        except ValueError as exc:
            if discard:
                model.close()
            raise ModelError(f"pipeline {self.name}: {exc}") from exc

    def _guard(self, stage: str, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except Exception as exc:  # a bug in one stage must not take the process down
                self._state = "failed"
                self._error("pipeline.failed", f"{stage}: {_reason(exc)}")
                log.exception("pipeline stage failed name=%s stage=%s", self.name, stage)
                self._stop.set()
                STAGES.detach(self._stages)
                self._finished.set()
                self._served.set()

        return run

    def _event(self, type_: str, **fields: Any) -> Event:
        return Event(type_, {"pipeline": self.name, **fields})

    def emit(self, type_: str, **fields: Any) -> None:
        self._emit_raw(self._event(type_, **fields))

    def _emit_raw(self, event: Event) -> None:
        if not self._announced and event.type != "pipeline.started":
            self.announce()  # pipeline.started first, whichever thread reports first (announce holds the lock)
        self._emit_to(event)

    def _source_emit(self, event: Event) -> None:
        if event.type.startswith("source.") and event.fields.get("reason"):
            self._last_error = f"{event.type}: {event.fields['reason']}"
        if event.type == "frame.rejected":
            self._counts["rejected"] += 1
            self._throttled(event)
        else:
            self._emit_raw(event)

    def _folded(self, type_: str, **fields: Any) -> None:
        """An event whose repeats are folded into a count (see `throttle`)."""
        self._throttled(self._event(type_, **fields))

    def _error(self, type_: str, reason: str, **fields: Any) -> None:
        self._last_error = f"{type_}: {reason}"
        self._folded(type_, reason=reason, **fields)


def _nothing() -> None:
    """A threaded pipeline's stages wait on their queues: nobody needs waking."""


def _reason(exc: BaseException) -> str:
    return f"{exc.__class__.__name__}: {exc}"
