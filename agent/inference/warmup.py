"""A pipeline's model: loaded as the pipeline feeds it (its stream plan: the input written into the model,
agent.device.graphprep) with the profile's constants and recurrent state wired, and (for a hot swap)
warmed on an input shaped like what the pipeline's source and preprocessing will produce, so that the
first real frame is not the slow one and a model that cannot take those frames fails before it serves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from agent.config.profile import PipelineConfig, RuntimeConfig
from agent.device.graphprep import StreamPlan
from agent.inference.processing.post import POSTPROCESSORS
from agent.inference.processing.pre import FrameRejectedError, Preprocessor, frame_prep
from agent.inference.runtime import Model, load_model
from agent.inference.sessions import POOL
from agent.inference.sources import source_class
from agent.transport.events import EventSink


def load_pipeline_model(
    config: PipelineConfig,
    source: Path | bytes,
    runtime: RuntimeConfig,
    state_dir: Path,
    *,
    name: str,
    version: str | None,
    emit: EventSink,
    example: np.ndarray | None = None,
    warmup_runs: int = 2,
    plan: StreamPlan | None = None,
    interim: bool = False,
) -> Model:
    """`source` (a file or its bytes) as a model for this pipeline's stream, constants and state;
    `plan`: how the pipeline feeds it, written into the model (`stream_plans`); `interim` as in `load_model`."""
    return load_model(
        source,
        runtime,
        state_dir,
        name=name,
        version=version,
        constants=config.inputs,
        state=config.state,
        stream_input=config.preprocess.input,
        example=example,
        warmup_runs=warmup_runs,
        emit=emit,
        plan=plan,
        interim=interim,
    )


def stream_plans(
    configs: Sequence[PipelineConfig], runtime: RuntimeConfig, *, endpoint: bool = False
) -> dict[str, StreamPlan | None]:
    """Each pipeline's `stream_plan`, by name; pipelines that run one model but would feed it otherwise get
    none, so that one session serves them all, and so do all where the inference endpoint serves the
    pipelines' sessions (its clients send the models' own tensors)."""
    plans = {config.name: None if endpoint else stream_plan(config, runtime) for config in configs}
    kinds: dict[str, set[StreamPlan | None]] = {}
    for config in configs:
        kinds.setdefault(config.model, set()).add(plans[config.name])
    return {config.name: plans[config.name] if len(kinds[config.model]) == 1 else None for config in configs}


def stream_plan(config: PipelineConfig, runtime: RuntimeConfig) -> StreamPlan | None:
    """How a camera pipeline feeds its model: the tensor's size where the profile fixes it (resize), a
    batch of one where no other camera can share the session, and frames in where preprocessing can run
    in the graph (not where the post-processor reads the preprocessed input). None for sensor pipelines."""
    pre = config.preprocess
    if source_class(config.source).sensor or pre.window is not None or pre.layout not in ("nchw", "nhwc"):
        return None
    needs_input = POSTPROCESSORS[config.postprocess.type].Postprocessor.needs_input(config.postprocess)
    return StreamPlan(
        input=pre.input,
        taken=frozenset(config.inputs) | frozenset(config.state),
        nhwc=pre.layout == "nhwc",
        size=pre.resize,
        batch_one=POOL.at_once <= 1 or runtime.batching.mode == "off",
        frames=None if needs_input else frame_prep(pre),
    )


def preprocessor(config: PipelineConfig, model: Model) -> Preprocessor:
    """The pipeline's preprocessing for this model's stream input."""
    return Preprocessor(config.preprocess, model.stream_spec.shape, model.stream_spec.type, model.takes_frames)


def example_input(config: PipelineConfig, model: Model) -> np.ndarray | None:
    """A blank input shaped like what preprocessing will produce, for warm-up before the first frame."""
    blank = source_class(config.source).example(config.source)
    pre = preprocessor(config, model)
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
    except FrameRejectedError:
        return None
    return None
