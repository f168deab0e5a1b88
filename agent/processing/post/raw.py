"""Model outputs published as they are (tensors as nested lists, maps as JSON)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from agent.configbase import Strict

KEY = "raw"


class Config(Strict):
    type: Literal["raw"] = "raw"
    outputs: tuple[str, ...] | None = Field(None, min_length=1, description="outputs to publish; all when unset")
    round: int | None = Field(6, ge=0, le=12, description="decimal places kept in floats")
