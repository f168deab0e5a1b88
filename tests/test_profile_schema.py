"""The shipped JSON Schema is the validator's own, and editors see what `edge-agent check` sees."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pydantic
import pytest
import yaml

from agent.config.base import adapter
from agent.config.profile import profile_schema

REPO = Path(__file__).resolve().parent.parent
SCHEMA_FILE = REPO / "configs" / "profile.schema.json"
EXAMPLES = sorted((REPO / "configs").glob("*.yaml"))


def test_shipped_schema_equals_the_validators() -> None:
    shipped = json.loads(SCHEMA_FILE.read_text())
    assert shipped == profile_schema(), (
        "configs/profile.schema.json is stale: run `edge-agent check --schema > configs/profile.schema.json`"
    )


def test_schema_is_valid_draft_2020_12() -> None:
    jsonschema.Draft202012Validator.check_schema(profile_schema())


def test_there_are_examples_for_each_device_type() -> None:
    names = {p.stem for p in EXAMPLES}
    assert {"webcam", "raspberry-pi", "jetson-orin", "intel-nuc", "sensor-gateway", "demo"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_declare_and_pass_the_schema(path: Path) -> None:
    assert path.read_text().splitlines()[0] == "# yaml-language-server: $schema=profile.schema.json"
    jsonschema.Draft202012Validator(profile_schema()).validate(yaml.safe_load(path.read_text()))


# The same mistakes the validator reports must be flagged by an editor using the schema.
SCHEMA_REJECTS = [
    {"device": {"id": "d"}, "mqt": {}},
    {"device": {"id": "cam 01"}},
    {"device": {"id": "fleet"}},
    {"device": {"id": "d"}, "pipelines": [{"name": "cmd", "model": "m.onnx", "source": {"type": "synthetic"}}]},
    {"pipelines": []},
    {"device": {"id": "d"}, "health": {"interval": "soon"}},
    {"device": {"id": "d"}, "mqtt": {"url": "mqtt://b", "outbox": {"max_bytes": "lots"}}},
    {"device": {"id": "d"}, "runtime": {"providers": ["cpux"]}},
    {"device": {"id": "d"}, "runtime": {"providers": []}},
    {"device": {"id": "d"}, "pipelines": [{"name": "p", "model": "m.onnx", "source": {"type": "cam"}}]},
    {"device": {"id": "d"}, "pipelines": [{"name": "p", "model": "m.onnx", "source": {"type": "camera"}}]},
    {"device": {"id": "d"}, "pipelines": [{"name": "p", "model": "m.onnx", "source": {"type": "synthetic", "fps": 0}}]},
    {
        "device": {"id": "d"},
        "pipelines": [
            {
                "name": "p",
                "model": "m.onnx",
                "source": {"type": "synthetic"},
                "postprocess": {"type": "text-detection", "threshold": 2},
            }
        ],
    },
]


@pytest.mark.parametrize("doc", SCHEMA_REJECTS)
def test_schema_rejects_what_the_validator_rejects(doc: dict) -> None:
    from agent.config.profile import Profile

    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(profile_schema()).validate(doc)
    with pytest.raises(pydantic.ValidationError):
        adapter(Profile).validate_python(doc)


def test_schema_accepts_provider_spellings() -> None:
    doc = {
        "device": {"id": "d"},
        "runtime": {
            "providers": [
                {"tensorrt": {"trt_fp16_enable": True}},
                {"cuda": None},
                {"name": "cpu", "options": {}},
                "openvino",
            ]
        },
    }
    jsonschema.Draft202012Validator(profile_schema()).validate(doc)
