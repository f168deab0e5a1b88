"""Class scores to the top-k labels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from agent.config.base import Field, ProfilePath, Strict

KEY = "classification"


@dataclass(frozen=True, kw_only=True)
class Config(Strict):
    type: Literal["classification"]
    output: str | None = Field(None, description="the scores output; the first output when unset")
    softmax: bool = Field(False, description="apply softmax to logits first")
    top_k: int = Field(5, gt=0, description="how many classes to report")
    threshold: float = Field(0.0, ge=0, le=1, description="leave out classes scoring below this")
    labels: ProfilePath | None = Field(None, description="a text file with one label per line")


from collections.abc import Mapping, Sequence

from agent.inference.processing.lazy import np
from agent.inference.processing.post.base import BasePostprocessor, PostContext, read_labels

if TYPE_CHECKING:
    from agent.inference.processing.post.base import Output, Outputs


class Postprocessor(BasePostprocessor[Config]):
    """Scores (a tensor [1, K], or the ZipMap map of a scikit-learn model) to the top-k classes."""

    def __init__(
        self, config: Config, output_names: Sequence[str], output_types: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(config, output_names, output_types)
        self.labels = read_labels(config.labels)

    def default_output(self) -> str:
        # scikit-learn models put the winning label first and the probabilities second: prefer scores.
        for name in self.output_names:
            kind = self.output_types.get(name, "")
            if kind.startswith("seq(map") or kind in ("tensor(float)", "tensor(double)", "tensor(float16)"):
                return name
        return self.output_names[0]

    def __call__(self, outputs: Outputs, ctx: PostContext) -> Output:
        cfg = self.config
        value = outputs[self.output]
        if isinstance(value, list):  # ZipMap: [{label: probability}]
            pairs = [(k, float(v)) for k, v in value[0].items()]
        else:
            scores = np.asarray(value, dtype=np.float64).reshape(-1)
            if cfg.softmax:
                e = np.exp(scores - scores.max())
                scores = e / e.sum()
            pairs = [(i, float(s)) for i, s in enumerate(scores)]
        pairs.sort(key=lambda p: -p[1])
        classes = []
        for key, score in pairs[: cfg.top_k]:
            if score < cfg.threshold:
                break
            entry: dict[str, Any] = {"class": key.item() if hasattr(key, "item") else key, "score": round(score, 6)}
            if self.labels is not None and isinstance(entry["class"], int) and 0 <= entry["class"] < len(self.labels):
                entry["label"] = self.labels[entry["class"]]
            classes.append(entry)
        return {"classes": classes}
