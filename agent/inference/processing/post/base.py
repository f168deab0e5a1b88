"""What every post-processor gets and the small contract it implements.

A post-processor plug-in module has `KEY`, `Config` and `Postprocessor` (a subclass of
`BasePostprocessor`). It is called once per inference with the model's outputs by name and returns the
result's `output` object, or None when there is nothing to publish (a threshold that did not change).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from agent.inference.processing.pre import Geometry


@dataclass(frozen=True)
class PostContext:
    """The frame's side of an inference: geometry back to source pixels, times, the input tensor."""

    geometry: Geometry | None = None
    t: float | None = None  # offset in the stream (file sources)
    ts: float = 0.0  # capture time, seconds since the epoch
    input: np.ndarray | None = None


class BasePostprocessor:
    def __init__(self, config: Any, output_names: Sequence[str], output_types: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.output_names = list(output_names)
        self.output_types = dict(output_types or {})
        wanted = getattr(config, "output", None)
        if wanted is not None and wanted not in self.output_names:
            raise ValueError(f"the model has no output {wanted!r} (outputs: {', '.join(self.output_names)})")
        self.output = wanted if wanted is not None else self.default_output()

    def default_output(self) -> str:
        return self.output_names[0]

    def __call__(self, outputs: Mapping[str, Any], ctx: PostContext) -> dict[str, Any] | None:  # pragma: no cover
        raise NotImplementedError

    def reset(self) -> None:
        """Forget state carried across frames (called when the model is swapped or the stream restarts)."""


def read_labels(path: Path | None) -> list[str] | None:
    if path is None:
        return None
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def make_postprocessor(
    config: Any, output_names: Sequence[str], output_types: Mapping[str, str] | None = None
) -> BasePostprocessor:
    """The plug-in registered for `config.type`, built for a model with these outputs."""
    from agent.inference.processing.post import POSTPROCESSORS

    return POSTPROCESSORS[config.type].Postprocessor(config, output_names, output_types)
