"""An anomaly score (a model output, or the reconstruction error of an autoencoder) against a limit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from agent.config.base import Field, Strict

KEY = "anomaly"


@dataclass(frozen=True, kw_only=True)
class Config(Strict):
    type: Literal["anomaly"]
    output: str | None = Field(None, description="the score or reconstruction output; the first output when unset")
    method: Literal["score", "reconstruction"] = Field(
        "score",
        description="score: the output is the score; reconstruction: mean squared error between input and output",
    )
    threshold: float = Field(description="scores above this are anomalies")
    report: Literal["all", "anomalies"] = Field("all", description="publish every score, or only anomalies")


from agent.inference.processing.lazy import np
from agent.inference.processing.post.base import BasePostprocessor, PostContext

if TYPE_CHECKING:
    from agent.inference.processing.post.base import Output, Outputs


class Postprocessor(BasePostprocessor[Config]):
    """A score per window: the model's own output, or an autoencoder's reconstruction error."""

    @classmethod
    def needs_input(cls, config: Config) -> bool:
        return config.method == "reconstruction"

    def __call__(self, outputs: Outputs, ctx: PostContext) -> Output | None:
        cfg = self.config
        value = np.asarray(outputs[self.output], dtype=np.float64)
        if cfg.method == "reconstruction":
            if ctx.input is None or ctx.input.size != value.size:
                raise ValueError(
                    f"reconstruction needs an output the size of the input ({value.size} vs "
                    f"{None if ctx.input is None else ctx.input.size} values)"
                )
            score = float(np.mean((value.reshape(-1) - ctx.input.reshape(-1).astype(np.float64)) ** 2))
        else:
            score = float(value.reshape(-1).max())
        anomaly = score > cfg.threshold
        if cfg.report == "anomalies" and not anomaly:
            return None
        return {"score": round(score, 6), "anomaly": anomaly}
