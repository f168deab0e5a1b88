"""Device profiles the end-to-end tests run `edge-agent run` with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def one_pipeline(tmp_path: Path, model: Path, source: dict[str, Any], **pipeline: Any) -> Path:
    """`tmp_path/profile.json`: device `d` (state under `tmp_path/state`), one pipeline `p` of `model` fed by
    `source`, with any other pipeline keys given (preprocess, postprocess, ...)."""
    profile = tmp_path / "profile.json"
    doc = {
        "device": {"id": "d", "state_dir": str(tmp_path / "state")},
        "pipelines": [{"name": "p", "model": str(model), "source": source, **pipeline}],
    }
    profile.write_text(json.dumps(doc))
    return profile


def validated(cls: type[T], **fields: Any) -> T:
    """A profile object built from `fields` as a profile gives them (lists, mappings, strings for paths),
    validated as `edge-agent run` validates them: a dataclass's constructor takes them as they are."""
    from agent.config.base import adapter

    built: T = adapter(cls).validate_python(fields)
    return built
