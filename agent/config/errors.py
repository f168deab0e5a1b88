"""Profile errors as users need them: `FILE:LINE: key.path: message`, all of them at once.

Pydantic's errors are mapped back to YAML lines, to the key path a person wrote (under a plug-in key,
through the plug-in its `type` names), and to one wording: "expected <what>, got <value>". Values that
are secrets, or came from the environment, are never printed.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel, SecretStr, ValidationError
from pydantic.fields import FieldInfo

from agent.config.base import PluginChoice
from agent.config.yamldoc import KeyPath, YamlDoc


@dataclass(frozen=True)
class Issue:
    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.file}:{self.line}: {where}{self.message}"


MAX_ISSUES = 100  # printed of one profile: a hostile one can have thousands


class ProfileError(Exception):
    """A profile that cannot be used; carries every problem found, each located."""

    def __init__(self, issues: list[Issue]) -> None:
        if len(issues) > MAX_ISSUES:  # a hostile profile can have thousands: the first ones and a count
            last = issues[MAX_ISSUES - 1]
            more = Issue(last.file, last.line, "", f"... and {len(issues) - MAX_ISSUES + 1} more problems")
            issues = issues[: MAX_ISSUES - 1] + [more]
        super().__init__("\n".join(str(i) for i in issues))
        self.issues = issues


# Human words for the regular expressions the profile uses; filled in by the modules that own them.
PATTERN_WORDS: dict[str, str] = {}


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    matches = difflib.get_close_matches(str(word), list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def format_path(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


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
    model: type[BaseModel] | None


def _plugin_choice(field: FieldInfo | None) -> PluginChoice | None:
    return next((m for m in field.metadata if isinstance(m, PluginChoice)), None) if field is not None else None


def _value_at(data: Any, path: KeyPath) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _resolve(root: type[BaseModel], loc: tuple[Any, ...], data: Any) -> _Resolved:
    """Walk the model types along pydantic's loc: the user's key path, the field, and its model. Under a
    plug-in key the model is the plug-in its `type` in `data` (the validated input) names."""
    tp: Any = root
    path: list[str | int] = []
    field: FieldInfo | None = None
    parent: type[BaseModel] | None = root
    for part in loc:
        tp = _unwrap(tp)
        members = _union_members(tp)
        if members:
            models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
            seqs = [m for m in members if typing.get_origin(m) in (tuple, list)]
            if isinstance(part, int) and seqs:
                tp = seqs[0]
            elif models:
                tp = models[0]
            elif part in ("literal['auto']", "tuple[ProviderChoice, ...]") or (isinstance(part, str) and "[" in part):
                continue  # pydantic names union branches by type in the loc
        path.append(part)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            parent = tp
            field = tp.model_fields.get(str(part))
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
        SecretStr: "a string",
    }
    if tp in names:
        return names[tp]
    if isinstance(tp, type) and issubclass(tp, BaseModel):
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
    exc: ValidationError, root: type[BaseModel], doc: YamlDoc, file: str, secret_paths: set[KeyPath], data: Any
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
        if kind == "cross_field":
            for sub, message in ctx["problems"]:
                issues.append(Issue(file, doc.line_of(path + tuple(sub)), format_path(path + tuple(sub)), message))
            continue
        if kind == "extra_forbidden":
            known = list(resolved.model.model_fields) if resolved.model else []
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
    return field is not None and "SecretStr" in repr(field.annotation)
