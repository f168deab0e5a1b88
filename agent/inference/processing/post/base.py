"""What every post-processor gets and the small contract it implements.

A post-processor plug-in module has `KEY`, `Config` and `Postprocessor` (a subclass of
`BasePostprocessor`). It is called once per inference with the model's outputs by name and returns the
result's `output` object, or None when there is nothing to publish (a threshold that did not change).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from agent.config.base import PluginConfig
from agent.util.files import read_small

if TYPE_CHECKING:
    from typing import TypeAlias

    import numpy as np

    from agent.inference.processing.pre import Geometry

    # What ONNX Runtime returns for one output: a tensor, or a list of maps (scikit-learn's ZipMap).
    OutputValue: TypeAlias = np.ndarray | list[dict[Any, float]]
    Outputs: TypeAlias = Mapping[str, OutputValue]
    Output: TypeAlias = dict[str, Any]  # a result's `output` object, as JSON will carry it


@dataclass(frozen=True)
class PostContext:
    """The frame's side of an inference: geometry back to source pixels, times, the input tensor."""

    geometry: Geometry | None = None
    t: float | None = None  # offset in the stream (file sources)
    ts: float = 0.0  # capture time, seconds since the epoch
    input: np.ndarray | None = None


ConfigT = TypeVar("ConfigT", bound=PluginConfig)


class BasePostprocessor(Generic[ConfigT]):
    def __init__(
        self, config: ConfigT, output_names: Sequence[str], output_types: Mapping[str, str] | None = None
    ) -> None:
        self.config = config
        self.output_names = list(output_names)
        self.output_types = dict(output_types or {})
        wanted = getattr(config, "output", None)  # the plug-ins that read one output name it `output`
        if wanted is not None and wanted not in self.output_names:
            raise ValueError(f"the model has no output {wanted!r} (outputs: {', '.join(self.output_names)})")
        self.output: str = wanted if wanted is not None else self.default_output()

    def default_output(self) -> str:
        return self.output_names[0]

    @classmethod
    def needs_input(cls, config: ConfigT) -> bool:
        """Whether this reads the model's input tensor (`PostContext.input`) as preprocessing made it: the
        preprocessing then stays out of the model's graph (agent.device.graphprep)."""
        return False

    def __call__(self, outputs: Outputs, ctx: PostContext) -> Output | None:  # pragma: no cover - interface
        raise NotImplementedError


def boxes_of(output: Output) -> list[dict[str, Any]]:
    """The boxes of a detection or text-detection output, in the result's own form; [] for others."""
    for key in ("boxes", "detections"):
        value = output.get(key)
        if isinstance(value, list):
            return value
    return []


MAX_LABELS_BYTES = 1 << 20  # a label per line: ImageNet's thousand are 20 KB


def read_labels(path: Path | None) -> list[str] | None:
    """The labels file's lines; ValueError naming the file when it is not a small UTF-8 text file."""
    if path is None:
        return None
    try:
        data = read_small(path, MAX_LABELS_BYTES)
        if len(data) > MAX_LABELS_BYTES:
            raise ValueError(f"larger than {MAX_LABELS_BYTES} bytes; a labels file holds one label per line")
        text = data.decode("utf-8")
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"labels file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]
