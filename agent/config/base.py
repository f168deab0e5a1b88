"""The base every profile object derives from: strict keys, immutable, typed."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, Literal, Protocol, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    TypeAdapter,
    ValidationInfo,
    WithJsonSchema,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticKnownError, core_schema

from agent.util.libraries import MAX_SIDE as MAX_SIDE  # re-exported: profiles bound frame sides with it

# Bounds on what a profile may ask a device to allocate: a frame side (`MAX_SIDE`, also OpenCV's bound on a
# decoded image), and the samples or rows in one window (65 s of 16 kHz audio).
MAX_SAMPLES = 1 << 20


class Strict(BaseModel):
    """Unknown keys are errors and objects cannot change after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class PluginConfig(Protocol):
    """What code outside a plug-in reads of its config: the `type` key that chose the plug-in."""

    @property
    def type(self) -> str: ...


@dataclass(frozen=True)
class PluginChoice:
    """Marks a profile key whose `type` picks a plug-in (a pipeline's `source`, its `postprocess`).

    The value is validated by the chosen plug-in's `Config` alone, imported at that moment: a start builds
    the classes of the plug-ins its profile names and no others (a tagged union of every plug-in built them
    all). Errors are pydantic's tagged-union errors (`union_tag_invalid`, `union_tag_not_found`), with the
    plug-in's own errors under the key; the JSON Schema is the union of every plug-in's.
    """

    plugins: Mapping[str, ModuleType]

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.with_info_plain_validator_function(self._validate)

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        configs = tuple(c for c in map(self.config_class, self.plugins) if c is not None)  # those that load
        union = Union[configs] if len(configs) > 1 else configs[0]  # noqa: UP007 (a union of types found at run time)
        tagged: Any = Annotated[union, Field(discriminator="type")]
        return handler(TypeAdapter(tagged).core_schema)

    def config_class(self, tag: object) -> type[BaseModel] | None:
        """The Config of the plug-in `tag` names, None for a tag no plug-in has (or one that cannot load)."""
        if not isinstance(tag, str) or tag not in self.plugins:
            return None
        try:
            config: type[BaseModel] = self.plugins[tag].Config
        except ImportError:
            return None
        return config

    def _validate(self, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, BaseModel) and self.config_class(getattr(value, "type", None)) is type(value):
            return value  # built in code: a default, a test
        if not isinstance(value, dict):
            raise PydanticKnownError("dict_type")
        if "type" not in value:
            raise PydanticKnownError("union_tag_not_found", {"discriminator": "'type'"})
        tag = value["type"]
        if not isinstance(tag, str) or tag not in self.plugins:
            expected = ", ".join(repr(key) for key in self.plugins)
            raise PydanticKnownError(
                "union_tag_invalid", {"discriminator": "'type'", "tag": str(tag), "expected_tags": expected}
            )
        try:
            config = self.plugins[tag].Config
        except ImportError as exc:
            raise ValueError(f"the {tag!r} plug-in cannot load here: {exc}") from None
        return config.model_validate(value, context=info.context)


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
