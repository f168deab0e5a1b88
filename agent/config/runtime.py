"""The profile's `runtime` section: execution providers, threads, graph optimisation, the optimised model
cache, dynamic batching across pipelines, and the status page's address."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from agent.config.base import Check, Constrain, Field, JsonSchema, ProfilePath, Strict
from agent.config.checks import Problem, raise_problems
from agent.config.errors import PATTERN_WORDS, did_you_mean
from agent.config.units import Duration

HTTP_ADDRESS_PATTERN = r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):[0-9]{1,5}$"
PATTERN_WORDS[HTTP_ADDRESS_PATTERN] = "host:port such as 127.0.0.1:8790 (an IPv6 host in brackets: [::1]:8790)"

# Short names people type, mapped to ONNX Runtime's provider names.
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "directml": "DmlExecutionProvider",
    "dml": "DmlExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "acl": "ACLExecutionProvider",
    "armnn": "ArmNNExecutionProvider",
    "rknpu": "RknpuExecutionProvider",
    "vitisai": "VitisAIExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
    "nv_tensorrt_rtx": "NvTensorRTRTXExecutionProvider",
}
KNOWN_PROVIDERS = tuple(sorted(set(PROVIDER_ALIASES.values())))


@dataclass(frozen=True, kw_only=True)
class ProviderChoice(Strict):
    name: str = Field(description="an ONNX Runtime execution provider")
    options: dict[str, str | int | float | bool] = Field(default_factory=dict, description="provider options")


def _provider_choice(value: Any) -> Any:
    # `cuda`, `CUDAExecutionProvider` and `{cuda: {device_id: 0}}` all mean the same provider.
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, dict) and len(value) == 1 and "name" not in value:
        ((name, options),) = value.items()
        return {"name": name, "options": options if options is not None else {}}
    return value


_PROVIDER_NAME = {"type": "string", "enum": sorted(PROVIDER_ALIASES) + list(KNOWN_PROVIDERS)}
_PROVIDER_OPTIONS = {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]}}
_PROVIDERS_SCHEMA = {
    "anyOf": [
        {"const": "auto"},
        {
            "type": "array",
            "minItems": 1,
            "items": {
                "anyOf": [
                    _PROVIDER_NAME,
                    {
                        "type": "object",
                        "minProperties": 1,
                        "maxProperties": 1,
                        "propertyNames": _PROVIDER_NAME,
                        "additionalProperties": {"anyOf": [_PROVIDER_OPTIONS, {"type": "null"}]},
                    },
                    {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {"name": _PROVIDER_NAME, "options": _PROVIDER_OPTIONS},
                    },
                ]
            },
        },
    ],
    "default": "auto",
    "description": "auto (ranked from the hardware) or an ordered list of providers: a name, {name: options}, or {name, options}",
}


Optimization = Literal["disabled", "basic", "extended", "all"]  # ONNX Runtime's graph optimisation levels

CUSTOM_DOMAIN_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"
PATTERN_WORDS[CUSTOM_DOMAIN_PATTERN] = "an operator domain such as ai.onnx.contrib (1 to 128 letters, digits, `_ . -`)"
CustomDomain = Annotated[str, Constrain(pattern=CUSTOM_DOMAIN_PATTERN)]


def _domains(value: Any) -> Any:
    # Before pydantic's own checks, so that each message names the domain (theirs name a dict key).
    if not isinstance(value, dict):
        return value
    if not 1 <= len(value) <= 64:
        raise ValueError(f"expected 1 to 64 domains, got {len(value)}")
    for domain, version in value.items():
        if not isinstance(domain, str) or not re.fullmatch(CUSTOM_DOMAIN_PATTERN, domain):
            raise ValueError(f"expected {PATTERN_WORDS[CUSTOM_DOMAIN_PATTERN]}, got {domain!r}")
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= 1000:
            raise ValueError(f"{domain}: expected the highest opset version it provides (1 to 1000), got {version!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class LocalLibrary(Strict):
    """A custom-op library already on the device (`runtime.custom_ops`), and what it says it provides."""

    path: ProfilePath = Field(description="the library file (.so), relative to the profile's folder")
    domains: Annotated[
        dict[CustomDomain, Annotated[int, Constrain(ge=1, le=1000)]] | None, Check(_domains, "before")
    ] = Field(
        None,
        min_length=1,
        max_length=64,
        description="custom domain -> highest opset version it provides, e.g. {ai.onnx.contrib: 1}: a model "
        "that needs another domain or a newer opset is refused before any download or load; unset: it may "
        "provide any custom domain, and loading the model decides",
    )


def _local_library(value: Any) -> Any:
    # A plain path is a library that declares nothing: the form profiles had first.
    if isinstance(value, (str, Path)):
        return {"path": value}
    if not isinstance(value, dict):
        raise ValueError("expected a library path, or {path, domains}")
    return value


def _providers(value: Any) -> Any:
    if isinstance(value, list):
        if not value:
            raise ValueError("expected auto or a list of at least one provider, got an empty list")
        return tuple(_provider_choice(v) for v in value)
    return value


def _known_providers(
    value: Literal["auto"] | tuple[ProviderChoice, ...],
) -> Literal["auto"] | tuple[ProviderChoice, ...]:
    if value == "auto":
        return value
    out: list[ProviderChoice] = []
    problems: list[Problem] = []
    for i, choice in enumerate(value):
        name = PROVIDER_ALIASES.get(choice.name.lower(), choice.name)
        if name not in KNOWN_PROVIDERS:
            hint = did_you_mean(choice.name, list(PROVIDER_ALIASES) + list(KNOWN_PROVIDERS))
            problems.append(((i,), f"unknown execution provider {choice.name!r}{hint}"))
        out.append(ProviderChoice(name=name, options=choice.options))
    raise_problems(problems)
    return tuple(out)


def _threads(value: Literal["auto"] | int) -> Literal["auto"] | int:
    if value != "auto" and value < 1:
        raise ValueError(f"expected auto or a number > 0, got {value!r}")
    return value


def check_port(value: str | None) -> str | None:
    """`value` (host:port, or None) if its port is from 1 to 65535."""
    if value is not None and not 1 <= int(value.rsplit(":", 1)[1]) <= 65535:
        raise ValueError(f"the port in {value!r} is not a number from 1 to 65535")
    return value


@dataclass(frozen=True, kw_only=True)
class BatchingConfig(Strict):
    mode: Literal["auto", "on", "off"] = Field(
        "auto",
        description="run the frames several pipelines have waiting on one model as one batch: auto (when a "
        "measurement on this device says it pays; cached per model), on, or off",
    )
    max_size: int = Field(8, ge=1, le=256, description="most frames in one batch")
    latency_budget: Duration = Field(
        0.01, ge=0, description="longest a frame waits for other pipelines' frames to join its batch"
    )


@dataclass(frozen=True, kw_only=True)
class RuntimeConfig(Strict):
    providers: Annotated[
        Literal["auto"] | tuple[ProviderChoice, ...],
        Check(_providers, "before"),
        Check(_known_providers),
        JsonSchema(_PROVIDERS_SCHEMA),
    ] = Field(
        "auto",
        description="auto (ranked from the hardware) or an ordered list of providers, each optionally with options",
    )
    threads: Annotated[Literal["auto"] | int, Check(_threads)] = Field(
        "auto",
        description="intra-op threads: auto (physical cores, shared out among the camera pipelines' CPU runs) or a "
        "number > 0",
    )
    autotune: bool = Field(
        False, description="time each usable provider and thread count on the model and keep the fastest"
    )
    require_accelerator: bool = Field(False, description="fail instead of falling back to the CPU provider")
    start_on_cpu: bool = Field(
        True,
        description="at a start, where OpenVINO on the CPU is chosen, serve the first frames on the CPU provider "
        "while OpenVINO compiles the model, then switch between two runs",
    )
    optimization: Optimization = Field(
        "all", description="graph optimisation level (ONNX Runtime's): disabled, basic, extended or all"
    )
    cache: bool = Field(
        True,
        description="keep each optimised model under the state folder, per device, so that later starts skip "
        "graph optimisation",
    )
    batching: BatchingConfig = Field(
        default_factory=BatchingConfig, description="dynamic batching across the pipelines that share a model"
    )
    custom_ops: tuple[
        Annotated[
            LocalLibrary,
            Check(_local_library, "before"),
            JsonSchema({"type": "string", "minLength": 1}, or_type=True),
        ],
        ...,
    ] = Field(
        (),
        max_length=16,
        description="custom-op libraries (.so) on this device that every session registers, for models whose "
        "opsets name a custom domain (e.g. onnxruntime-extensions' library): a path, or {path, domains} to "
        "declare the custom domains and highest opsets it provides; each must be a shared library for this "
        "machine (checked at start). Registry models bring their own: docs/custom-ops.md",
    )
    http: Annotated[str | None, Check(check_port)] = Field(
        None,
        pattern=HTTP_ADDRESS_PATTERN,
        description="host:port to serve /healthz, /metrics and a status page on, e.g. 127.0.0.1:8790; off when unset",
    )
