"""The profile's named checks: across sections, URLs, topic words; several located problems at once.

A check across fields reports each problem with its key path, so that `edge-agent check` prints
`FILE:LINE: key.path: message` for every one of them in a single run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from pydantic.config import JsonDict
from pydantic_core import InitErrorDetails, PydanticCustomError

from agent.transport.topics import RESERVED

Problem = tuple[tuple[str | int, ...], str]  # (key path relative to the object checked, message)

# The same refusal in the JSON Schema, so that an editor flags what `edge-agent check` refuses.
NOT_RESERVED_SCHEMA: JsonDict = {"not": {"enum": [*sorted(RESERVED)]}}


def not_reserved(value: str, what: str) -> str:
    """`value` unless it is a topic level the agent uses itself."""
    # A device named `fleet` would own `<prefix>/fleet/...`, the group deployment topics (and the ACL's
    # admin user); a pipeline named `cmd` would publish its results as a command to its own device.
    if value in RESERVED:
        words = ", ".join(sorted(RESERVED))
        raise ValueError(f"{value!r} is a topic level the agent itself uses ({words}); choose another {what}")
    return value


def check_url(value: str, schemes: tuple[str, ...], expected: str) -> str:
    """`value` if it is a URL with one of `schemes`, a host, and a port (when given) that is a number."""
    parts = urlsplit(value)
    if parts.scheme not in schemes or not parts.hostname:
        raise ValueError(f"expected {expected}, got {value!r}")
    try:
        _ = parts.port  # urlsplit checks the port only when it is read
    except ValueError:
        raise ValueError(f"the port in {value!r} is not a number from 1 to 65535") from None
    return value


def looks_like_path(model: str) -> bool:
    """A pipeline's model names a file (rather than a registry model)."""
    return model.endswith((".onnx", ".ort")) or os.sep in model or model.startswith(".")


def cross_field_problems(data: dict[str, Any]) -> list[Problem]:
    """Checks across sections, on the raw document so that they are reported beside field errors."""
    problems: list[Problem] = []
    pipelines = data.get("pipelines")
    seen: set[str] = set()
    for i, pipeline in enumerate(pipelines if isinstance(pipelines, list) else []):
        if not isinstance(pipeline, dict):
            continue
        name, model, source = pipeline.get("name"), pipeline.get("model"), pipeline.get("source")
        if isinstance(name, str):
            if name in seen:
                problems.append((("pipelines", i, "name"), f"two pipelines are named {name!r}; names must be unique"))
            seen.add(name)
        if isinstance(model, str) and model and not looks_like_path(model) and not data.get("registry"):
            problems.append(
                (
                    ("pipelines", i, "model"),
                    f"pipeline {name!r}: model {model!r} is a registry name, but the profile has no registry section "
                    "(give a path to an .onnx file, or add registry)",
                )
            )
        if isinstance(source, dict) and source.get("type") == "mqtt" and not data.get("mqtt"):
            problems.append((("pipelines", i, "source"), f"pipeline {name!r}: an mqtt source needs the mqtt section"))
    return problems


def problems_error(problems: Sequence[Problem], data: object) -> InitErrorDetails:
    """The problems as one entry among pydantic's own errors."""
    return InitErrorDetails(type=_problems(problems), loc=(), input=data)


def _problems(problems: Sequence[Problem]) -> PydanticCustomError:
    return PydanticCustomError(
        "cross_field", "{count} problem(s) across fields", {"count": len(problems), "problems": problems}
    )


def raise_problems(problems: Sequence[Problem]) -> None:
    """One validation error carrying several located problems (paths relative to the object checked)."""
    if problems:
        raise _problems(problems)
