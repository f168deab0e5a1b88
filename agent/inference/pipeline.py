"""One inference loop: source -> preprocess -> infer -> postprocess -> sink, on four threads joined by
bounded queues, so that capture, preprocessing and publishing overlap inference.

- Live sources (cameras) never wait: the newest frame wins and the ones replaced are counted as dropped.
  Every other source waits for the pipeline (backpressure): nothing is dropped.
- Bad input is an event, never an exception out of the pipeline: a frame the model cannot take is
  `frame.rejected`, a source failure is `source.error` and the source is restarted with backoff, a failed
  inference is `inference.error`. Repeats of one event kind are folded (first one, then one per
  `EVENT_REPEAT_S` with a count).
- `swap()` loads and warms a new model beside the serving one (on the caller's thread), then the
  inference thread switches between two frames: no frame is dropped, none runs on a half-loaded model,
  and each result names the model version that produced it.
- `stop()` ends the source, lets the frame in hand (and, for sensors, every sample already read) finish
  and be published, and joins the threads.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.config.profile import PipelineConfig, RuntimeConfig
from agent.inference.processing.post.base import BasePostprocessor, PostContext, make_postprocessor
from agent.inference.processing.pre import FrameRejected, Geometry, Preprocessor
from agent.inference.runtime import Model, ModelError, ModelState, load_model
from agent.inference.sources.base import Backoff, BaseSource, Frame, SourceContext, SourceFailed, Window, make_source
from agent.transport.events import Event, EventSink, Sink, log_event

log = logging.getLogger(__name__)

QUEUE_SIZE = 4  # frames between two stages: enough to overlap them, small enough to keep latency low
SENSOR_QUEUE_SIZE = 256  # samples are small; deep queues turn per-sample thread hand-offs into bursts
MAX_BATCH = 64  # sensor samples run together when several are waiting and the model takes a batch
TIMINGS_KEPT = 2048  # per-stage timings kept for percentiles
EVENT_REPEAT_S = 10.0
SOURCE_BACKOFF_CAP = 30.0
IDLE_POLL_S = 0.05  # how often an idle inference thread looks for a pending swap
_END = object()


_iso_cache: tuple[int, str] = (-1, "")


def iso_ms(ts: float) -> str:
    """Seconds since the epoch as UTC ISO 8601 with milliseconds: 2026-11-25T10:31:02.417Z."""
    global _iso_cache
    ms = int(round(ts * 1000))
    secs, ms = divmod(ms, 1000)
    cached_secs, text = _iso_cache  # one tuple read: safe across pipeline threads
    if cached_secs != secs:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
        _iso_cache = (secs, text)
    return f"{text}.{ms:03d}Z"


class LatestSlot:
    """A one-item queue where a new item replaces the waiting one (counted): the camera side."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Any = None
        self._has = False
        self._closed = False
        self.replaced = 0

    def put(self, item: Any) -> None:
        with self._cond:
            if self._has:
                self.replaced += 1
            self._item, self._has = item, True
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def get(self) -> Any:
        with self._cond:
            while not self._has and not self._closed:
                self._cond.wait()
            if self._has:
                item, self._item, self._has = self._item, None, False
                return item
            return _END


@dataclass
class Work:
    frame: Frame
    tensor: np.ndarray
    geometry: Geometry | None
    pre_ms: float
    started: float  # perf_counter when preprocessing began
    infer_ms: float = 0.0
    outputs: dict[str, Any] = field(default_factory=dict)
    model: Model | None = None
    post: BasePostprocessor | None = None


class Timings:
    """Recent durations per stage, for p50/p95 in health."""

    def __init__(self, stages: Iterable[str]) -> None:
        self._data = {s: deque(maxlen=TIMINGS_KEPT) for s in stages}

    def add(self, stage: str, ms: float) -> None:
        self._data[stage].append(ms)

    def snapshot(self) -> dict[str, dict[str, float]]:
        out = {}
        for stage, values in self._data.items():
            arr = np.fromiter(list(values), dtype=np.float64)
            if arr.size:
                p50, p95 = np.percentile(arr, [50, 95])
                out[stage] = {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "n": int(arr.size)}
            else:
                out[stage] = {"p50": None, "p95": None, "n": 0}
        return out


class _Throttle:
    """The first event of a kind at once, then one per interval carrying how many were folded.

    Without this a camera of the wrong size would send an event per frame."""

    def __init__(self, emit: EventSink, interval: float = EVENT_REPEAT_S) -> None:
        self.emit = emit
        self.interval = interval
        self._last: dict[str, float] = {}
        self._folded: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        now = time.monotonic()
        # Repeats are the same kind and reason, line numbers and counts aside.
        key = event.type + ":" + re.sub(r"\d+", "#", str(event.fields.get("reason", "")))
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._folded[key] = self._folded.get(key, 0) + 1
                return
            folded = self._folded.pop(key, 0)
            self._last[key] = now
        if folded:
            event = Event(event.type, {**event.fields, "repeated": folded}, event.ts)
        self.emit(event)


class Pipeline:
    """Build with a loaded `Model` (see `open_pipeline` to load from the profile), then `start()`."""

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
        source: BaseSource | None = None,
        qos: int = 1,
        mqtt: Any = None,
        connection: Any = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.device = device
        self.sink = sink
        self.runtime = runtime or RuntimeConfig()
        self.state_dir = Path(state_dir) if state_dir is not None else Path(".")
        self._emit_raw = emit
        self._throttled = _Throttle(emit)
        self.qos = config.qos if config.qos is not None else qos
        self.source = source or make_source(
            config.source,
            SourceContext(
                pipeline=config.name,
                emit=self._source_emit,
                state_dir=self.state_dir,
                mqtt=mqtt,
                device=device,
                connection=connection,
            ),
        )
        self.live = self.source.live
        self.model = model
        self._model_state: ModelState = model.new_state()
        self.pre = Preprocessor(config.preprocess, model.stream_spec.shape, model.stream_spec.type)
        self.post = self._make_post(model)
        self._pending: tuple[Model, threading.Event] | None = None
        self._swap_lock = threading.Lock()
        self._last_input: np.ndarray | None = None
        self._stop = threading.Event()
        self._finished = threading.Event()
        self._threads: list[threading.Thread] = []
        size = SENSOR_QUEUE_SIZE if self.source.sensor else QUEUE_SIZE
        self._in: LatestSlot | queue.Queue[Any] = LatestSlot() if self.live else queue.Queue(size)
        # A live frame waits at most one inference before it runs: stale frames are worse than dropped ones.
        self._to_infer: queue.Queue[Any] = queue.Queue(1 if self.live else size)
        self._to_post: queue.Queue[Any] = queue.Queue(size)
        self.timings = Timings(("pre", "infer", "post", "total"))
        self._counts = dict.fromkeys(
            (
                "frames",
                "skipped",
                "rejected",
                "inferences",
                "results",
                "inference_errors",
                "post_errors",
                "sink_errors",
                "source_errors",
                "swaps",
            ),
            0,
        )
        self._result_times: deque[float] = deque(maxlen=256)
        self._state = "created"
        self._last_error: str | None = None
        self._started_at: float | None = None
        self._busy_since: float | None = None  # when the inference in progress began: a watchdog reads it
        self._latest: tuple[Any, list[Any]] | None = None  # the last published image and its boxes

    # -- public API ------------------------------------------------------------------------------

    def start(self) -> Pipeline:
        if self._threads:
            raise RuntimeError(f"pipeline {self.name} already started")
        self._state = "running"
        self._started_at = time.time()
        for name, target in (
            ("capture", self._capture),
            ("pre", self._preprocess),
            ("infer", self._infer),
            ("post", self._postprocess),
        ):
            thread = threading.Thread(target=self._guard(name, target), name=f"{self.name}-{name}", daemon=True)
            self._threads.append(thread)
            thread.start()
        self.emit(
            "pipeline.started",
            model=self.model.name,
            version=self.model.version,
            provider=self.model.provider,
            source=self.config.source.type,
        )
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """End the source; finish and publish the frame in hand; join the threads."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
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

    def swap(
        self, model: Model | Path | bytes, *, version: str | None = None, name: str | None = None, timeout: float = 60.0
    ) -> Model:
        """Load and warm `model` beside the serving one, then switch between two frames.

        Raises ModelError (and the pipeline keeps serving the old model) when the new one does not load,
        lacks an input or output the pipeline uses, or fails on the last real input this pipeline saw.
        """
        example = self._last_input if self._last_input is not None else example_input(self.config, self.model)
        if not isinstance(model, Model):
            model = load_model(
                model,
                self.runtime,
                self.state_dir,
                name=name or self.model.name,
                version=version,
                constants=self.config.inputs,
                state=self.config.state,
                stream_input=self.config.preprocess.input,
                example=example,
                emit=self._emit_raw,
            )
        elif example is not None:
            model.warmup(example, runs=1)
        post = self._make_post(model)  # the new outputs must suit the post-processor before the switch
        del post
        done = threading.Event()
        with self._swap_lock:
            self._pending = (model, done)
        if not self._threads or not self._threads[2].is_alive():  # no inference thread to switch between frames
            self._apply_swap()
        elif not done.wait(timeout):
            raise ModelError(f"pipeline {self.name}: the swap to {model.version} did not happen within {timeout:.0f} s")
        return model

    def busy_for(self) -> float | None:
        """Seconds the inference in progress has run, None when idle: a watchdog's stuck check."""
        busy = self._busy_since
        return time.monotonic() - busy if busy is not None else None

    def latest_frame(self) -> tuple[Any, list[dict[str, Any]]] | None:
        """The last image a result was published for (BGR, never written to) and its boxes, for a
        status page; None for sensor pipelines and before the first result."""
        return self._latest

    def stats(self) -> dict[str, Any]:
        """A snapshot for health: counters, per-stage p50/p95 in ms, rate, model and state."""
        times = list(self._result_times)
        rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
        dropped = self._in.replaced if isinstance(self._in, LatestSlot) else 0
        return {
            "pipeline": self.name,
            "state": self._state,
            "source": self.config.source.type,
            "model": self.model.name,
            "model_version": self.model.version,
            "provider": self.model.provider,
            **self._counts,
            "dropped": dropped,
            "results_per_s": round(rate, 2),
            "inference_running_s": round(time.monotonic() - busy, 3) if (busy := self._busy_since) is not None else 0.0,
            "latency_ms": self.timings.snapshot(),
            "last_error": self._last_error,
        }

    # -- stages ----------------------------------------------------------------------------------

    def _capture(self) -> None:
        backoff = Backoff(SOURCE_BACKOFF_CAP)
        try:
            while not self._stop.is_set():
                try:
                    for frame in self.source.frames(self._stop):
                        self._counts["frames"] += 1
                        self._put_in(frame)
                        backoff.attempt = 0
                        if self._stop.is_set():
                            break
                    break  # the source ended (a finite file) or we were stopped
                except SourceFailed as exc:
                    self._counts["source_errors"] += 1
                    self._error("source.error", str(exc), retry=False)
                    break
                except Exception as exc:  # a source bug or a device error must not end the daemon
                    self._counts["source_errors"] += 1
                    delay = backoff.next_delay()
                    self._error("source.error", f"{exc.__class__.__name__}: {exc}", retry_in_s=round(delay, 2))
                    log.debug("source failed", exc_info=True)
                    self._stop.wait(delay)
        finally:
            try:
                self.source.close()
            except Exception:
                log.debug("source close failed", exc_info=True)
            if isinstance(self._in, LatestSlot):
                self._in.close()
            else:
                self._in.put(_END)

    def _put_in(self, frame: Frame) -> None:
        if isinstance(self._in, LatestSlot):
            self._in.put(frame)
            return
        while True:  # backpressure, but still let stop() through if the pipeline is wedged downstream
            try:
                self._in.put(frame, timeout=0.5)
                return
            except queue.Full:
                if self._stop.is_set() and not any(t.is_alive() for t in self._threads[1:]):
                    return

    def _preprocess(self) -> None:
        period = 1.0 / self.config.rate if self.config.rate else 0.0
        next_slot = 0.0
        while True:
            frame = self._in.get()
            if frame is _END:
                break
            if period:
                now = time.monotonic()
                if now < next_slot:
                    if self.live:  # cameras: frames between two slots are skipped and counted
                        self._counts["skipped"] += 1
                        continue
                    self._stop.wait(next_slot - now)  # sensors: wait, nothing is dropped
                    now = time.monotonic()
                # Drift-free, but after a stall at most one slot is caught up, never a burst.
                next_slot = max(next_slot, now - period) + period
            started = time.perf_counter()
            try:
                tensor, geometry = self.pre(frame.data)
            except FrameRejected as exc:
                self._counts["rejected"] += 1
                self._throttled(self._event("frame.rejected", reason=str(exc), source_seq=frame.seq))
                continue
            except Exception as exc:  # noqa: BLE001
                self._counts["rejected"] += 1
                self._throttled(
                    self._event("frame.rejected", reason=f"{exc.__class__.__name__}: {exc}", source_seq=frame.seq)
                )
                continue
            if tensor is None:  # a sensor window still filling
                continue
            pre_ms = (time.perf_counter() - started) * 1000
            self._to_infer.put(Work(frame, tensor, geometry, pre_ms, started))
        self._to_infer.put(_END)

    def _infer(self) -> None:
        while True:
            if self._pending is not None:
                self._apply_swap()
            try:
                item = self._to_infer.get(timeout=IDLE_POLL_S)
            except queue.Empty:
                continue
            if item is _END:
                break
            batch = [item]
            end_after = False
            model = self.model
            # Only sensor samples are gathered into batches: for images a batch would add its
            # latency to every frame for little gain on a CPU.
            if model.batchable and not self.live and isinstance(item.frame, Window):
                while len(batch) < MAX_BATCH:
                    try:
                        more = self._to_infer.get_nowait()
                    except queue.Empty:
                        break
                    if more is _END:
                        end_after = True
                        break
                    batch.append(more)
            self._run(model, batch)
            if end_after:
                break
        if self._pending is not None:
            self._apply_swap()
        self._to_post.put(_END)

    def _run(self, model: Model, batch: list[Work]) -> None:
        post = self.post
        started = time.perf_counter()
        self._busy_since = time.monotonic()
        try:
            if len(batch) == 1:
                outputs = [model.run(batch[0].tensor, self._model_state)]
            else:
                try:
                    outputs = model.run_batch([w.tensor for w in batch])
                except Exception:  # noqa: BLE001 (the model said it takes a batch but does not: stop trying)
                    model.batchable = False
                    outputs = [model.run(w.tensor, self._model_state) for w in batch]
        except Exception as exc:  # noqa: BLE001 (ORT's errors derive from Exception)
            self._counts["inference_errors"] += len(batch)
            self._throttled(
                self._event(
                    "inference.error",
                    reason=f"{exc.__class__.__name__}: {str(exc).strip()[:300]}",
                    model=model.name,
                    version=model.version,
                    source_seq=batch[0].frame.seq,
                )
            )
            return
        finally:
            self._busy_since = None
        infer_ms = (time.perf_counter() - started) * 1000
        self._counts["inferences"] += len(batch)
        self._last_input = batch[-1].tensor
        for work, out in zip(batch, outputs):
            work.outputs, work.infer_ms, work.model, work.post = out, infer_ms, model, post
            self.timings.add("infer", infer_ms)
            self._to_post.put(work)

    def _postprocess(self) -> None:
        name, device = self.name, self.device
        while True:
            work = self._to_post.get()
            if work is _END:
                break
            frame, model = work.frame, work.model
            assert model is not None and work.post is not None
            started = time.perf_counter()
            try:
                output = work.post(work.outputs, PostContext(work.geometry, frame.t, frame.ts, work.tensor))
            except Exception as exc:  # noqa: BLE001
                self._counts["post_errors"] += 1
                self._throttled(
                    self._event("postprocess.error", reason=f"{exc.__class__.__name__}: {exc}", source_seq=frame.seq)
                )
                continue
            post_ms = (time.perf_counter() - started) * 1000
            self.timings.add("pre", work.pre_ms)
            self.timings.add("post", post_ms)
            if output is None:
                continue
            payload: dict[str, Any] = {
                "device": device,
                "pipeline": name,
                "ts": iso_ms(frame.ts),
                "source_seq": frame.seq,
                "model": model.name,
                "model_version": model.version,
                "provider": model.provider,
                "latency_ms": {
                    "pre": round(work.pre_ms, 3),
                    "infer": round(work.infer_ms, 3),
                    "post": round(post_ms, 3),
                },
                "output": output,
            }
            if frame.t is not None:
                payload["t"] = round(frame.t, 3)
            try:
                self.sink.result(name, payload, self.qos)
            except Exception as exc:  # noqa: BLE001
                self._counts["sink_errors"] += 1
                self._throttled(self._event("sink.error", reason=f"{exc.__class__.__name__}: {exc}"))
                continue
            self._counts["results"] += 1
            self._result_times.append(time.monotonic())
            if frame.data.ndim >= 2:
                self._latest = (frame.data, _boxes(output))
            self.timings.add("total", (time.perf_counter() - work.started) * 1000)
        self._finished.set()
        if self._state == "running":
            self._state = "finished" if not self._stop.is_set() else "stopped"
            self.emit(
                "pipeline.finished" if self._state == "finished" else "pipeline.stopped",
                results=self._counts["results"],
            )

    # -- helpers ---------------------------------------------------------------------------------

    def _apply_swap(self) -> None:
        with self._swap_lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        model, done = pending
        old = self.model
        same_outputs = model.output_names == old.output_names
        self.post = self.post if same_outputs else self._make_post(model)
        self.pre.expected = tuple(d for d in model.stream_spec.shape) if model.stream_spec.shape is not None else None
        self._model_state = model.new_state()
        self.model = model
        self._counts["swaps"] += 1
        done.set()
        self.emit(
            "model.swapped", model=model.name, version=model.version, previous=old.version, provider=model.provider
        )

    def _make_post(self, model: Model) -> BasePostprocessor:
        try:
            return make_postprocessor(
                self.config.postprocess, model.output_names, {k: v.type for k, v in model.outputs.items()}
            )
        except ValueError as exc:
            raise ModelError(f"pipeline {self.name}: {exc}") from exc

    def _guard(self, stage: str, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except Exception as exc:  # a bug in one stage must not take the process down
                self._state = "failed"
                self._error("pipeline.failed", f"{stage}: {exc.__class__.__name__}: {exc}")
                log.exception("pipeline stage failed name=%s stage=%s", self.name, stage)
                self._stop.set()
                self._finished.set()

        return run

    def _event(self, type_: str, **fields: Any) -> Event:
        return Event(type_, {"pipeline": self.name, **fields})

    def emit(self, type_: str, **fields: Any) -> None:
        self._emit_raw(self._event(type_, **fields))

    def _source_emit(self, event: Event) -> None:
        if event.type == "frame.rejected":
            self._counts["rejected"] += 1
        if event.type.startswith("source.") and event.fields.get("reason"):
            self._last_error = f"{event.type}: {event.fields['reason']}"
        self._throttled(event) if event.type in ("frame.rejected",) else self._emit_raw(event)

    def _error(self, type_: str, reason: str, **fields: Any) -> None:
        self._last_error = f"{type_}: {reason}"
        self._throttled(self._event(type_, reason=reason, **fields))


def _boxes(output: dict[str, Any]) -> list[dict[str, Any]]:
    """Boxes of a detection or text-detection output, in the result's own form."""
    for key in ("boxes", "detections"):
        value = output.get(key)
        if isinstance(value, list):
            return value
    return []


def open_pipeline(
    config: PipelineConfig,
    sink: Sink,
    *,
    device: str,
    runtime: RuntimeConfig,
    state_dir: Path,
    emit: EventSink = log_event,
    model_path: Path | bytes | None = None,
    model_name: str | None = None,
    model_version: str | None = None,
    qos: int = 1,
    mqtt: Any = None,
    connection: Any = None,
) -> Pipeline:
    """Load the pipeline's model (a file from the profile, or what the store resolved) and build it."""
    source = model_path if model_path is not None else Path(config.model)
    model = load_model(
        source,
        runtime,
        state_dir,
        name=model_name or (Path(config.model).stem if config.model_is_file else config.model),
        version=model_version,
        constants=config.inputs,
        state=config.state,
        stream_input=config.preprocess.input,
        warmup_runs=0,
        emit=emit,
    )
    example = example_input(config, model)
    if example is not None:
        model.warmup(example)
    else:
        model.warmup_if_possible()
    return Pipeline(
        config,
        model,
        sink,
        device=device,
        runtime=runtime,
        state_dir=state_dir,
        emit=emit,
        qos=qos,
        mqtt=mqtt,
        connection=connection,
    )


def example_input(config: PipelineConfig, model: Model) -> np.ndarray | None:
    """A blank input shaped like what preprocessing will produce, for warm-up before the first frame."""
    from agent.inference.sources.base import source_class

    blank = source_class(config.source).example(config.source)
    pre = Preprocessor(config.preprocess, model.stream_spec.shape, model.stream_spec.type)
    if blank is None:
        if config.preprocess.resize is None:
            return None
        w, h = config.preprocess.resize
        blank = np.zeros((h, w, 3), dtype=np.uint8)
    try:
        for _ in range(config.preprocess.window or 1):
            tensor, _geometry = pre(blank)
            if tensor is not None:
                return tensor
    except FrameRejected:
        return None
    return None


def open_pipelines(
    profile: Any,
    sink: Sink,
    emit: EventSink = log_event,
    resolve: Callable[[PipelineConfig], tuple[Path | bytes, str | None]] | None = None,
    mqtt: Any = None,
) -> list[Pipeline]:
    """Every enabled pipeline of a profile whose model loads; the others are reported and skipped.

    `resolve` maps a registry model name to (file or bytes, version): the store's job. Without it only
    file models run. `mqtt` is the daemon's broker connection (agent.mqtt.Connection), which mqtt
    sources then share; without it they open their own from the profile's mqtt section. A pipeline that
    cannot start never keeps the others from starting.
    """
    state_dir = Path(profile.device.state_dir)
    default_qos = profile.mqtt.qos if profile.mqtt is not None else 1
    pipelines = []
    for config in profile.pipelines:
        if not config.enabled:
            continue
        try:
            if config.model_is_file:
                path, version = Path(config.model), None
            elif resolve is not None:
                path, version = resolve(config)
            else:
                raise ModelError(f"model {config.model!r} comes from the registry, and no model store is wired here")
            pipelines.append(
                open_pipeline(
                    config,
                    sink,
                    device=profile.device.id,
                    runtime=profile.runtime,
                    state_dir=state_dir,
                    emit=emit,
                    model_path=path,
                    model_version=version,
                    qos=default_qos,
                    mqtt=profile.mqtt,
                    connection=mqtt,
                )
            )
        except (ModelError, OSError, ValueError) as exc:
            emit(Event("pipeline.failed", {"pipeline": config.name, "model": config.model, "reason": str(exc)}))
    return pipelines
