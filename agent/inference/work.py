"""What one frame carries through a pipeline's stages, and the result message it becomes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.config.base import PluginConfig
from agent.inference.processing.post.base import BasePostprocessor
from agent.inference.processing.pre import Geometry
from agent.inference.runtime import Model
from agent.inference.sources.base import Frame
from agent.util.timefmt import utc_iso

if TYPE_CHECKING:
    from agent.inference.processing.post.base import OutputValue

Postprocessor = BasePostprocessor[PluginConfig]


@dataclass
class Work:
    """One frame on its way through the stages, with what each stage added."""

    frame: Frame
    tensor: np.ndarray
    geometry: Geometry | None
    pre_ms: float
    started: float  # perf_counter when preprocessing began
    frames: bool = False  # `tensor` is the frame itself, for a model that preprocesses in its graph
    infer_ms: float = 0.0
    outputs: dict[str, OutputValue] = field(default_factory=dict)
    model: Model | None = None
    post: Postprocessor | None = None


def result_payload(device: str, pipeline: str, work: Work, model: Model, output: Any, post_ms: float) -> dict[str, Any]:
    """The result message of one frame (see docs/mqtt.md): who, when, which model, stage latencies, output."""
    frame = work.frame
    payload: dict[str, Any] = {
        "device": device,
        "pipeline": pipeline,
        "ts": utc_iso(frame.ts),
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
    return payload
