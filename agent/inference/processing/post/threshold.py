"""A score over a threshold opens an event and under a lower one closes it (e.g. voice activity)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from agent.config.base import Field, Strict
from agent.config.units import Duration

KEY = "threshold"


@dataclass(frozen=True, kw_only=True)
class Config(Strict):
    type: Literal["threshold"]
    output: str | None = Field(None, description="the score output; the first output when unset")
    threshold: float = Field(0.5, description="a score at or above this opens an event")
    off_threshold: float | None = Field(None, description="a score below this closes it; threshold - 0.15 when unset")
    min_off: Duration = Field(0.1, ge=0, description="the score must stay low this long before the event closes")
    min_on: Duration = Field(0.0, ge=0, description="events shorter than this are not reported")

    def __post_init__(self) -> None:
        if self.off_threshold is not None and self.off_threshold > self.threshold:
            raise ValueError(
                f"off_threshold {self.off_threshold} is above threshold {self.threshold}; it must be at or below it"
            )


from collections.abc import Mapping, Sequence

from agent.inference.processing.lazy import np
from agent.inference.processing.post.base import BasePostprocessor, PostContext

if TYPE_CHECKING:
    from agent.inference.processing.post.base import Output, Outputs


class Postprocessor(BasePostprocessor[Config]):
    """Hysteresis over a score: `open` when it reaches `threshold`, `close` once it has stayed under
    `off_threshold` for `min_off`. Only changes are published. Times are the stream offset `t` for
    file sources and capture time otherwise; a close reports when the score fell, not when the
    `min_off` wait ended, so that the event's span is the activity's span.
    """

    def __init__(
        self, config: Config, output_names: Sequence[str], output_types: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(config, output_names, output_types)
        self.off = config.off_threshold if config.off_threshold is not None else config.threshold - 0.15
        self.active = False  # an event is open (possibly not yet reported, waiting for min_on)
        self.reported = False
        self.start = 0.0
        self.low_since: float | None = None
        self.peak = 0.0

    def __call__(self, outputs: Outputs, ctx: PostContext) -> Output | None:
        cfg = self.config
        score = float(np.asarray(outputs[self.output]).reshape(-1)[0])
        now = ctx.t if ctx.t is not None else ctx.ts
        if not self.active:
            if score < cfg.threshold:
                return None
            self.active, self.reported, self.start, self.low_since, self.peak = True, False, now, None, score
        self.peak = max(self.peak, score)
        out: dict[str, Any] | None = None
        if score < self.off:
            if self.low_since is None:
                self.low_since = now
            if now - self.low_since >= cfg.min_off:
                if self.reported:
                    out = {
                        "event": "close",
                        "t": round(self.low_since, 3),
                        "duration": round(self.low_since - self.start, 3),
                        "score": round(score, 4),
                        "peak": round(self.peak, 4),
                    }
                self.active = False
                return out
        else:
            self.low_since = None
        if not self.reported and now - self.start >= cfg.min_on:
            self.reported = True
            out = {"event": "open", "t": round(self.start, 3), "score": round(score, 4)}
        return out
