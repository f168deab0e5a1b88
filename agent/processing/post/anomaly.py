"""An anomaly score (a model output, or the reconstruction error of an autoencoder) against a limit."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from agent.configbase import Strict

KEY = "anomaly"


class Config(Strict):
    type: Literal["anomaly"]
    output: str | None = Field(None, description="the score or reconstruction output; the first output when unset")
    method: Literal["score", "reconstruction"] = Field("score", description="score: the output is the score; reconstruction: mean squared error between input and output")
    threshold: float = Field(description="scores above this are anomalies")
    report: Literal["all", "anomalies"] = Field("all", description="publish every score, or only anomalies")
