"""Model outputs published as they are (tensors as nested lists, maps as JSON)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from agent.config.base import Field, Strict

KEY = "raw"


@dataclass(frozen=True, kw_only=True)
class Config(Strict):
    type: Literal["raw"] = "raw"
    outputs: tuple[str, ...] | None = Field(None, min_length=1, description="outputs to publish; all when unset")
    round: int | None = Field(6, ge=0, le=12, description="decimal places kept in floats")


from collections.abc import Mapping, Sequence

from agent.inference.processing.jsonvalues import to_json
from agent.inference.processing.post.base import BasePostprocessor, PostContext

if TYPE_CHECKING:
    from agent.inference.processing.post.base import Output, Outputs


class Postprocessor(BasePostprocessor[Config]):
    def __init__(
        self, config: Config, output_names: Sequence[str], output_types: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(config, output_names, output_types)
        missing = [n for n in (config.outputs or ()) if n not in self.output_names]
        if missing:
            raise ValueError(f"the model has no output {missing[0]!r} (outputs: {', '.join(self.output_names)})")
        self.names = list(config.outputs or self.output_names)

    def __call__(self, outputs: Outputs, ctx: PostContext) -> Output:
        return {name: to_json(outputs[name], self.config.round) for name in self.names}
