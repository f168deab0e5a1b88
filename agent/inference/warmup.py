"""A pipeline's model: loaded with the profile's constants and recurrent state wired, and (for a hot swap)
warmed on an input shaped like what the pipeline's source and preprocessing will produce, so that the
first real frame is not the slow one and a model that cannot take those frames fails before it serves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.config.profile import PipelineConfig, RuntimeConfig
from agent.inference.processing.pre import FrameRejectedError, Preprocessor
from agent.inference.runtime import Model, load_model
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
) -> Model:
    """`source` (a file or its bytes) as a model for this pipeline's stream, constants and state."""
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
    )


def example_input(config: PipelineConfig, model: Model) -> np.ndarray | None:
    """A blank input shaped like what preprocessing will produce, for warm-up before the first frame."""
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
    except FrameRejectedError:
        return None
    return None
