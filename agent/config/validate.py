"""The one place pydantic meets the profile: it validates the raw document into the profile's dataclasses,
and its errors are mapped back to YAML lines, to the key path a person wrote (under a plug-in key, through
the plug-in its `type` names), and to one wording: "expected <what>, got <value>". Values that are secrets,
or came from the environment, are never printed.

Imported only when a profile is checked: a start from a validated snapshot never loads pydantic.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from agent.config.base import PluginChoice, Secret, adapter
from agent.config.checks import ProblemsError
from agent.config.errors import PATTERN_WORDS, Issue, did_you_mean, format_path
from agent.config.yamldoc import KeyPath, YamlDoc

T = typing.TypeVar("T")


def validate(
    cls: type[T], data: Any, context: dict[str, Any], doc: YamlDoc, file: str, secret_paths: set[KeyPath]
) -> tuple[T | None, list[Issue]]:
    """`data` (the document once its environment variables are expanded) as a `cls`, or every problem."""
    try:
        validated: T = adapter(cls).validate_python(data, context=context)
        return validated, []
    except ValidationError as exc:
        return None, issues_from_validation(exc, cls, doc, file, secret_paths, data)


def fields_of(cls: type[Any]) -> dict[str, FieldInfo]:
    """A profile class's fields as pydantic sees them (annotation, description, bounds)."""
    return _fields(cls) if dataclasses.is_dataclass(cls) else {}


@functools.cache
def _fields(cls: type[Any]) -> dict[str, FieldInfo]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: FieldInfo.from_annotated_attribute(hints[f.name], f) for f in dataclasses.fields(cls)}


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _union_members(tp: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return tuple(_unwrap(a) for a in typing.get_args(tp))
    return ()


@dataclass
class _Resolved:
    path: KeyPath
    field: FieldInfo | None
    model: type[Any] | None


def _plugin_choice(field: FieldInfo | None) -> PluginChoice | None:
    return next((m for m in field.metadata if isinstance(m, PluginChoice)), None) if field is not None else None


def _value_at(data: Any, path: KeyPath) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _resolve(root: type[Any], loc: tuple[Any, ...], data: Any) -> _Resolved:
    """Walk the model types along pydantic's loc: the user's key path, the field, and its model. Under a
    plug-in key the model is the plug-in its `type` in `data` (the validated input) names."""
    tp: Any = root
    path: list[str | int] = []
    field: FieldInfo | None = None
    parent: type[Any] | None = root
    for part in loc:
        tp = _unwrap(tp)
        members = _union_members(tp)
        if members:
            models = [m for m in members if _is_model(m)]
            seqs = [m for m in members if typing.get_origin(m) in (tuple, list)]
            if isinstance(part, int) and seqs:
                tp = seqs[0]
            elif models:
                tp = models[0]
            elif part in ("literal['auto']", "tuple[ProviderChoice, ...]") or (isinstance(part, str) and "[" in part):
                continue  # pydantic names union branches by type in the loc
        path.append(part)
        if _is_model(tp):
            parent = tp
            field = fields_of(tp).get(str(part))
            tp = field.annotation if field else None
            choice = _plugin_choice(field)
            if choice is not None:
                value = _value_at(data, tuple(path))
                tp = choice.config_class(value.get("type")) if isinstance(value, dict) else None
        elif typing.get_origin(tp) in (tuple, list):
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
            field = None
        else:
            tp = None
    return _Resolved(tuple(path), field, parent)


def _describe_type(tp: Any) -> str:
    tp = _unwrap(tp)
    members = [m for m in _union_members(tp) if m is not type(None)]
    if members:
        return " or ".join(dict.fromkeys(_describe_type(m) for m in members))
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        return "a list"
    if origin is dict:
        return "a mapping"
    names = {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        Path: "a path",
        Secret: "a string",
    }
    if tp in names:
        return names[tp]
    if _is_model(tp):
        return "a mapping"
    return "a value"


def _bounds(field: FieldInfo) -> str:
    words = []
    for meta in field.metadata:
        for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            value = getattr(meta, attr, None)
            if value is not None and isinstance(
                meta, (annotated_types.Gt, annotated_types.Ge, annotated_types.Lt, annotated_types.Le)
            ):
                words.append(f"{op} {value}")
    return " and ".join(words)


def expectation(field: FieldInfo | None) -> str:
    if field is None:
        return "a valid value"
    if _plugin_choice(field) is not None:
        return "a mapping"
    if field.metadata and any(
        getattr(m, "func", None) and "duration" in getattr(m.func, "__name__", "") for m in field.metadata
    ):
        base = "a duration like 30s or 5min"
    else:
        base = _describe_annotation(field)
    bounds = _bounds(field)
    return f"{base} {bounds}" if bounds else base


def _describe_annotation(field: FieldInfo) -> str:
    tp = field.annotation
    text = repr(field.rebuild_annotation()) if hasattr(field, "rebuild_annotation") else ""
    if "parse_duration" in text:
        return "a duration like 30s or 5min"
    if "parse_size" in text:
        return "a size like 64MiB or 1GB"
    return _describe_type(tp)


def _show(value: Any, secret: bool) -> str:
    if secret:
        return "<redacted>"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def issues_from_validation(
    exc: ValidationError, root: type[Any], doc: YamlDoc, file: str, secret_paths: set[KeyPath], data: Any
) -> list[Issue]:
    """Every error located (lines from `doc`) and worded; `data` is what was validated (the document once its
    environment variables are expanded)."""
    issues: list[Issue] = []
    for error in exc.errors(include_url=False):
        resolved = _resolve(root, tuple(error["loc"]), data)
        path = resolved.path
        kind = error["type"]
        ctx = error.get("ctx") or {}
        secret = path in secret_paths or _is_secret(resolved.field)
        if kind == "value_error" and isinstance(ctx.get("error"), ProblemsError):
            for sub, message in ctx["error"].problems:
                issues.append(Issue(file, doc.line_of(path + tuple(sub)), format_path(path + tuple(sub)), message))
            continue
        if kind in ("extra_forbidden", "unexpected_keyword_argument"):
            known = list(fields_of(resolved.model)) if resolved.model else []
            hint = did_you_mean(str(path[-1]), known)
            allowed = f"; expected one of: {', '.join(known)}" if known and not hint else ""
            message = f"unknown key{hint}{allowed}"
        elif kind == "missing":
            what = (
                resolved.field.description
                if resolved.field and resolved.field.description
                else expectation(resolved.field)
            )
            message = f"required key missing: {what}"
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            tags = [t.strip(" '") for t in str(ctx.get("expected_tags", "")).split(",") if t.strip()]
            choice = _plugin_choice(resolved.field)
            if not tags and choice is not None:
                tags = list(choice.plugins)
            got = ctx.get("tag")
            if kind == "union_tag_not_found":
                path = path + ("type",)
                message = f"required key missing: expected one of {', '.join(tags)}"
            else:
                path = path + ("type",)
                message = f"expected one of {', '.join(tags)}, got {got!r}{did_you_mean(str(got), tags)}"
        elif kind == "value_error":
            message = str(ctx.get("error", error["msg"]))
            if message.startswith("expected") and ", got" not in message:
                message += f", got {_show(error.get('input'), secret)}"
        elif kind == "string_pattern_mismatch":
            words = PATTERN_WORDS.get(ctx.get("pattern", ""), f"a string matching {ctx.get('pattern')}")
            message = f"expected {words}, got {_show(error.get('input'), secret)}"
        else:
            message = f"expected {expectation(resolved.field)}, got {_show(error.get('input'), secret)}"
        issues.append(Issue(file, doc.line_of(path), format_path(path), message))
    return issues


def _is_secret(field: FieldInfo | None) -> bool:
    return field is not None and "Secret" in repr(field.annotation)
