"""A pipeline's hot swap: the new model loaded and warmed beside the serving one, on the last real input
(made again from its frame when the new model takes its stream otherwise: frames or tensors, see
agent.device.graphprep), then switched in between two frames by the inference stage. Frames already
preprocessed for the old model when the switch lands are made again for the new one."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.config.profile import PipelineConfig, RuntimeConfig
from agent.device.graphprep import StreamPlan
from agent.inference.processing.pre import FrameRejectedError, Preprocessor
from agent.inference.runtime import Model, ModelError, ModelState
from agent.inference.sources.base import Frame
from agent.inference.stats import Counts, Timings
from agent.inference.warmup import example_input, load_pipeline_model, preprocessor
from agent.inference.work import Postprocessor, Work
from agent.transport.events import EventSink


class HotSwap:
    """Mixed into `Pipeline`, whose attributes these are."""

    name: str
    config: PipelineConfig
    runtime: RuntimeConfig
    state_dir: Path
    plan: StreamPlan | None
    model: Model
    pre: Preprocessor
    post: Postprocessor
    timings: Timings
    _counts: Counts
    _emit_raw: EventSink
    _model_state: ModelState
    _pending: tuple[Model, threading.Event] | None
    _swap_lock: threading.Lock
    _last_input: np.ndarray | None
    _last_frame: np.ndarray | None
    _wake: Callable[[], None]

    def swap(
        self, model: Model | Path | bytes, *, version: str | None = None, name: str | None = None, timeout: float = 60.0
    ) -> Model:
        """Load and warm `model` beside the serving one, then switch between two frames.

        Raises ModelError (and the pipeline keeps serving the old model) when the new one does not load,
        lacks an input or output the pipeline uses, or fails on the last real input this pipeline saw.
        """
        runs = 1  # a Model given here was loaded (and warmed) by the caller: one run on this pipeline's input
        if not isinstance(model, Model):
            runs = 2
            model = load_pipeline_model(
                self.config,
                model,
                self.runtime,
                self.state_dir,
                name=name or self.model.name,
                version=version,
                warmup_runs=0,
                emit=self._emit_raw,
                plan=self.plan,
            )
        example = self._example_for(model)
        if example is not None or runs > 1:
            try:
                model.warmup(example, runs=runs)
            except ModelError:
                model.close()
                raise
        self._make_post(model, discard=True)  # the new outputs must suit the post-processor before the switch
        done = threading.Event()
        with self._swap_lock:
            self._pending = (model, done)
        self._wake()
        if not self._infer_alive():  # nobody to switch between frames
            self._apply_swap()
        elif not done.wait(timeout):
            raise ModelError(f"pipeline {self.name}: the swap to {model.version} did not happen within {timeout:.0f} s")
        return model

    def _example_for(self, model: Model) -> np.ndarray | None:
        """The last real input, made again from its frame when the new model takes its stream otherwise
        (frames or tensors; unchecked, so that a model that cannot take it fails its warm-up on it)."""
        if model.takes_frames == self.model.takes_frames:
            return self._last_input if self._last_input is not None else example_input(self.config, self.model)
        if self._last_frame is None:
            return example_input(self.config, model)
        pre = preprocessor(self.config, model)
        pre.expected = None
        try:
            return pre(self._last_frame)[0]
        except FrameRejectedError:  # the serving model never saw this frame either (a crop that does not fit)
            return None

    def _apply_swap(self) -> None:
        with self._swap_lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        model, done = pending
        old = self.model
        same_outputs = model.output_names == old.output_names
        self.post = self.post if same_outputs else self._make_post(model)
        if model.takes_frames != old.takes_frames:
            self.pre = preprocessor(self.config, model)  # frames still queued for the old one are made again
        self.pre.expected = model.stream_spec.shape
        self._model_state = model.new_state()
        self.model = model
        if old is not model:
            old.close()
        self.timings.restart("infer")  # a probation compares the versions' own latencies, never a mix
        self._counts["swaps"] += 1
        done.set()
        self.emit(
            "model.swapped", model=model.name, version=model.version, previous=old.version, provider=model.provider
        )

    def _prepare_again(self, work: Work) -> bool:
        """A frame preprocessed for the model before a swap that changed how its input is fed, made again."""
        try:
            tensor, work.geometry = self.pre(work.frame.data)
        except Exception as exc:  # noqa: BLE001 (as in _prepare: this frame is rejected, the next one runs)
            self._reject(work.frame, exc)
            return False
        assert tensor is not None  # an image, never a sensor window
        work.tensor, work.frames = tensor, self.pre.frames
        return True

    # -- the pipeline's own ------------------------------------------------------------------------

    def _infer_alive(self) -> bool:
        raise NotImplementedError

    def _make_post(self, model: Model, *, discard: bool = False) -> Postprocessor:
        raise NotImplementedError

    def emit(self, type_: str, **fields: Any) -> None:
        raise NotImplementedError

    def _reject(self, frame: Frame, exc: Exception) -> None:
        raise NotImplementedError
