"""The base every profile object derives from: strict keys, immutable, typed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, Protocol

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, WithJsonSchema


class Strict(BaseModel):
    """Unknown keys are errors and objects cannot change after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class PluginConfig(Protocol):
    """What code outside a plug-in reads of its config: the `type` key that chose the plug-in."""

    @property
    def type(self) -> str: ...


def _resolve_path(value: object, info: ValidationInfo) -> object:
    if not isinstance(value, (str, Path)) or not str(value):
        return value
    path = Path(os.path.expanduser(str(value)))
    base = (info.context or {}).get("base_dir") if info.context else None
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return path


# What a sensor source does with NaN, infinity and numbers beyond float range (docs/sources.md).
InvalidValues = Annotated[
    Literal["reject", "pass"],
    Field(
        description="NaN, infinity and out-of-range values: reject (a frame.rejected event naming the value "
        "and line) or pass them to the model"
    ),
]


# A path in a profile is relative to the profile's own folder, as users expect when they keep a
# profile beside its models and keys.
ProfilePath = Annotated[Path, BeforeValidator(_resolve_path), WithJsonSchema({"type": "string", "minLength": 1})]
