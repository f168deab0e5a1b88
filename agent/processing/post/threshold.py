"""A score over a threshold opens an event and under a lower one closes it (e.g. voice activity)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from agent.configbase import Strict
from agent.units import Duration

KEY = "threshold"


class Config(Strict):
    type: Literal["threshold"]
    output: str | None = Field(None, description="the score output; the first output when unset")
    threshold: float = Field(0.5, description="a score at or above this opens an event")
    off_threshold: float | None = Field(None, description="a score below this closes it; threshold - 0.15 when unset")
    min_off: Duration = Field(0.1, ge=0, description="the score must stay low this long before the event closes")
    min_on: Duration = Field(0.0, ge=0, description="events shorter than this are not reported")

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if self.off_threshold is not None and self.off_threshold > self.threshold:
            raise ValueError(
                f"off_threshold {self.off_threshold} is above threshold {self.threshold}; it must be at or below it"
            )
        return self
