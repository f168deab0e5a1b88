"""The base every profile object derives from: strict keys, immutable, typed, and no pydantic to build one.

Profile objects are frozen, keyword-only standard dataclasses. pydantic validates them (`agent.config.validate`,
imported only when a profile is checked) through its public hooks: a class's `__pydantic_config__`, the
pydantic `Field` arguments a dataclass field keeps in its metadata (`Field` below), and Annotated markers
that define `__get_pydantic_core_schema__` (`Check`, `JsonSchema`, `PluginChoice`). A device that starts from
its validated snapshot (`agent.config.snapshot`) therefore never imports pydantic: its import and its ~90
validators cost more than the whole cold-start budget (issue 15).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, ClassVar, Literal, Protocol, Union

from agent.util.libraries import MAX_SIDE as MAX_SIDE  # re-exported: profiles bound frame sides with it

# Bounds on what a profile may ask a device to allocate: a frame side (`MAX_SIDE`, also OpenCV's bound on a
# decoded image), and the samples or rows in one window (65 s of 16 kHz audio).
MAX_SAMPLES = 1 << 20


class Strict:
    """Unknown keys are errors; subclasses are `@dataclass(frozen=True, kw_only=True)`, so nothing changes
    after validation."""

    __pydantic_config__: ClassVar[Mapping[str, Any]] = {"extra": "forbid"}


def Field(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, **spec: Any) -> Any:  # noqa: N802 (pydantic's name, with its arguments)
    """A dataclass field whose metadata holds pydantic's `Field` arguments (`description`, `ge`, `pattern`,
    `max_length`, `json_schema_extra`): pydantic reads them from there when it validates or writes the JSON
    Schema, and the class is built without it."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata=spec)


@dataclass(frozen=True)
class Check:
    """An Annotated marker: `func` checks or converts the value after its type's own validation (`mode="after"`)
    or before it (`"before"`, the raw input); with `context`, it also gets the validation context (the profile's
    folder). A ValueError it raises is an error located at the key."""

    func: Callable[..., Any]
    mode: Literal["before", "after"] = "after"
    context: bool = False

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        inner = handler(source)
        if self.context:
            func = self.func

            def with_context(value: Any, info: Any) -> Any:
                return func(value, info.context or {})

            if self.mode == "before":
                return core_schema.with_info_before_validator_function(with_context, inner)
            return core_schema.with_info_after_validator_function(with_context, inner)
        if self.mode == "before":
            return core_schema.no_info_before_validator_function(self.func, inner)
        return core_schema.no_info_after_validator_function(self.func, inner)


class Constrain:
    """An Annotated marker for a type inside another (a list's items, a mapping's keys or values): pydantic's
    `Field` arguments (`ge`, `le`, `pattern`) for it, applied when it validates."""

    def __init__(self, **spec: Any) -> None:
        self.spec = spec

    def __repr__(self) -> str:
        return f"Constrain({self.spec})"

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        from pydantic import Field as PydanticField

        return handler(Annotated[source, PydanticField(**self.spec)])


@dataclass(frozen=True, eq=False)  # hashed by identity: it sits in Annotated types inside unions
class JsonSchema:
    """An Annotated marker: the JSON Schema editors see for the key, in place of the one its type implies (a
    duration is a number or a string with a unit); with `or_type`, offered beside the type's own (a custom-op
    library is a path or its mapping)."""

    schema: Mapping[str, Any]
    or_type: bool = False

    def __get_pydantic_json_schema__(self, core: Any, handler: Any) -> dict[str, Any]:
        if self.or_type:  # the type's own schema in line, as editors show it beside the alternative
            return {"anyOf": [dict(self.schema), dict(handler.resolve_ref_schema(handler(core)))]}
        return dict(self.schema)


class Secret:
    """A string kept out of reprs, logs and replies (a password); `get_secret_value()` is the one way to read it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Secret, (self._value,))

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        return core_schema.no_info_after_validator_function(cls, core_schema.str_schema())

    @classmethod
    def __get_pydantic_json_schema__(cls, core: Any, handler: Any) -> dict[str, Any]:
        return {"type": "string", "format": "password", "writeOnly": True}


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

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        return core_schema.with_info_plain_validator_function(self._validate)

    def __get_pydantic_json_schema__(self, schema: Any, handler: Any) -> Any:
        from pydantic import Field as PydanticField
        from pydantic import TypeAdapter

        configs = tuple(c for c in map(self.config_class, self.plugins) if c is not None)  # those that load
        union = Union[configs] if len(configs) > 1 else configs[0]  # noqa: UP007 (a union of types found at run time)
        tagged: Any = Annotated[union, PydanticField(discriminator="type")]
        return handler(TypeAdapter(tagged).core_schema)

    def config_class(self, tag: object) -> type[Any] | None:
        """The Config of the plug-in `tag` names, None for a tag no plug-in has (or one that cannot load)."""
        if not isinstance(tag, str) or tag not in self.plugins:
            return None
        try:
            config: type[Any] = self.plugins[tag].Config
        except ImportError:
            return None
        return config

    def _validate(self, value: Any, info: Any) -> Any:
        from pydantic_core import PydanticKnownError

        if dataclasses.is_dataclass(value) and self.config_class(getattr(value, "type", None)) is type(value):
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
        return adapter(config).validate_python(value, context=info.context)


_ADAPTERS: dict[type[Any], Any] = {}


def adapter(cls: type[Any]) -> Any:
    """pydantic's validator (a TypeAdapter) for a profile class, built once per process, when first needed."""
    if cls not in _ADAPTERS:
        from pydantic import TypeAdapter

        _ADAPTERS[cls] = TypeAdapter(cls)
    return _ADAPTERS[cls]


def resolve_path(value: object, context: Mapping[str, Any]) -> object:
    """A path as written, relative to the profile's own folder (`base_dir` in the validation context)."""
    if not isinstance(value, (str, Path)) or not str(value):
        return value
    path = Path(os.path.expanduser(str(value)))
    base = context.get("base_dir")
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return path


# What a sensor source does with NaN, infinity and numbers beyond float range (docs/sources.md).
INVALID_VALUES_DOC = (
    "NaN, infinity and out-of-range values: reject (a frame.rejected event naming the value and line) or pass "
    "them to the model"
)
InvalidValues = Literal["reject", "pass"]


# A path in a profile is relative to the profile's own folder, as users expect when they keep a
# profile beside its models and keys.
ProfilePath = Annotated[
    Path, Check(resolve_path, mode="before", context=True), JsonSchema({"type": "string", "minLength": 1})
]


def plain(value: Any) -> Any:
    """A profile object as JSON values (paths as strings, secrets masked): what replies and cache keys show."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Secret):
        return "**********"
    return value
