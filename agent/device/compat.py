"""What this runtime can load, and what a model file needs, without the onnx package.

A device decides from the signed manifest whether a variant can run here *before* downloading it, so
the limits of the installed onnxruntime are kept as a table (measured per release, see FACTS.md) and
checked against the real runtime at start-up by loading two tiny probe models per limit: one at the
limit (must load) and one just above it (must fail).

What a model needs is read from its ONNX protobuf (through agent.device.onnxproto): ModelProto field 1
is the IR version, field 8 the opset imports (domain "" means ai.onnx), field 7 the graph, which the
header reader skips unread.
"""

from __future__ import annotations

import io
import platform
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

from agent.device.onnxproto import AI_ONNX as AI_ONNX  # re-exported: callers name domains as compat.AI_ONNX
from agent.device.onnxproto import WireError, fields, identity_model, stream_fields

AI_ONNX_ML = "ai.onnx.ml"

# (onnxruntime release, max ai.onnx opset, max IR version, max ai.onnx.ml opset), oldest first.
RUNTIME_TABLE: tuple[tuple[tuple[int, int], int, int, int], ...] = (
    ((1, 10), 15, 8, 2),
    ((1, 11), 16, 8, 2),
    ((1, 12), 17, 8, 3),
    ((1, 14), 18, 8, 3),
    ((1, 15), 18, 9, 3),
    ((1, 16), 19, 9, 3),
    ((1, 17), 20, 9, 4),
    ((1, 18), 21, 10, 5),
    ((1, 21), 22, 10, 5),
    ((1, 23), 23, 11, 5),
    ((1, 24), 25, 13, 5),
    ((1, 25), 26, 13, 5),
    ((1, 32), 28, 14, 5),
)

# Domains every onnxruntime build implements besides the two standard ones (contrib ops).
BUILTIN_DOMAINS = {"com.microsoft": 1, "com.microsoft.nchwc": 1, "ai.onnx.preview.training": 1}

ELEM_TYPES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    4: "uint16",
    5: "int16",
    6: "int32",
    7: "int64",
    8: "string",
    9: "bool",
    10: "float16",
    11: "float64",
    12: "uint32",
    13: "uint64",
    14: "complex64",
    15: "complex128",
    16: "bfloat16",
    17: "float8e4m3fn",
    18: "float8e4m3fnuz",
    19: "float8e5m2",
    20: "float8e5m2fnuz",
    21: "uint4",
    22: "int4",
    23: "float4e2m1",
}


class ModelFormatError(ValueError):
    """The bytes are not an ONNX model this reader understands."""


def normalize_arch(machine: str) -> str:
    m = machine.lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8l": "aarch64"}.get(m, m)


def normalize_domain(domain: str) -> str:
    return AI_ONNX if domain in ("", AI_ONNX) else domain


def parse_version(text: str) -> tuple[int, ...]:
    """The leading numeric parts: "1.32.0" -> (1, 32, 0), "1.18.0rc1" -> (1, 18, 0)."""
    parts = []
    for piece in text.split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
        if m.end() != len(piece):
            break
    return tuple(parts)


def version_str(v: tuple[int, ...]) -> str:
    return ".".join(str(p) for p in v)


@dataclass(frozen=True)
class RuntimeCaps:
    """The limits of one onnxruntime on one machine."""

    ort_version: str
    ir_version: int
    opsets: dict[str, int]
    arch: str = field(default_factory=lambda: normalize_arch(platform.machine()))
    custom_domains: frozenset[str] = frozenset()  # provided by custom-op libraries registered here
    verified: bool = False
    # Libraries whose domains nobody declared (the profile's runtime.custom_ops) are registered here: any
    # custom domain may be theirs, and loading the model proves it.
    undeclared_custom_ops: bool = False

    def with_limits(self, ai_onnx: int | None = None, ir_version: int | None = None) -> RuntimeCaps:
        """A copy capped lower (tests, or `--target-ort`): what an older runtime would accept."""
        opsets = dict(self.opsets)
        if ai_onnx is not None:
            opsets[AI_ONNX] = ai_onnx
        return replace(self, opsets=opsets, ir_version=ir_version if ir_version is not None else self.ir_version)


def caps_for(ort_version: str, arch: str | None = None, custom_domains: frozenset[str] = frozenset()) -> RuntimeCaps:
    """Limits from the table for a release; a release newer than the table gets the last row."""
    wanted = parse_version(ort_version)[:2]
    row = RUNTIME_TABLE[0]
    for candidate in RUNTIME_TABLE:
        if candidate[0] <= wanted:
            row = candidate
    _, ai_onnx, ir, ml = row
    return RuntimeCaps(
        ort_version=ort_version,
        ir_version=ir,
        opsets={AI_ONNX: ai_onnx, AI_ONNX_ML: ml, **BUILTIN_DOMAINS},
        arch=normalize_arch(arch or platform.machine()),
        custom_domains=frozenset(custom_domains),
    )


def min_runtime(ir_version: int, opsets: dict[str, int]) -> str | None:
    """The oldest onnxruntime release in the table that loads this; None when none does."""
    for release, ai_onnx, ir, ml in RUNTIME_TABLE:
        if ir_version <= ir and opsets.get(AI_ONNX, 0) <= ai_onnx and opsets.get(AI_ONNX_ML, 0) <= ml:
            return version_str(release)
    return None


@lru_cache(maxsize=1)
def installed_caps() -> RuntimeCaps:
    """The installed runtime's limits: the table's row, then proven by loading probe models."""
    import onnxruntime as ort  # here: reading headers and checking manifests (the publish side) need no runtime

    return verify_caps(caps_for(ort.__version__))


def verify_caps(caps: RuntimeCaps) -> RuntimeCaps:
    """Correct each limit by probing: step down while the limit fails to load, up while limit+1 loads."""
    import onnxruntime as ort  # here, as in installed_caps

    def loads(ir: int, opsets: dict[str, int]) -> bool:
        try:
            ort.InferenceSession(identity_model(ir, opsets), providers=["CPUExecutionProvider"])
            return True
        except Exception:  # noqa: BLE001 (onnxruntime raises its own Fail, which derives from Exception)
            return False

    base = {AI_ONNX: 7}

    def settle(value: int, test: Callable[[int], bool], floor: int) -> int:
        while value > floor and not test(value):
            value -= 1
        for _ in range(8):  # a newer runtime than the table knows: find its real limit
            if not test(value + 1):
                break
            value += 1
        return value

    ai_onnx = settle(caps.opsets[AI_ONNX], lambda v: loads(3, {AI_ONNX: v}), 7)
    ir = settle(caps.ir_version, lambda v: loads(v, base), 3)
    ml = settle(caps.opsets.get(AI_ONNX_ML, 1), lambda v: loads(3, {**base, AI_ONNX_ML: v}), 1)
    opsets = {**caps.opsets, AI_ONNX: ai_onnx, AI_ONNX_ML: ml}
    return replace(caps, opsets=opsets, ir_version=ir, verified=True)


def refusal(
    caps: RuntimeCaps,
    label: str,
    ir_version: int,
    opsets: dict[str, int],
    architectures: tuple[str, ...] = (),
    min_runtime_version: str | None = None,
) -> str | None:
    """Why a model needing this cannot run here, or None when it can. One sentence, for events."""
    if architectures and caps.arch not in {normalize_arch(a) for a in architectures}:
        return f"variant {label} is built for {', '.join(architectures)}; this device is {caps.arch}"
    for domain, version in sorted(opsets.items()):
        domain = normalize_domain(domain)
        limit = caps.opsets.get(domain)
        if limit is None:
            if domain in caps.custom_domains or caps.undeclared_custom_ops:
                continue
            return (
                f"variant {label} needs custom domain {domain!r} (opset {version}); "
                "no custom-op library for it is registered here"
            )
        if version > limit:
            return f"variant {label} needs {domain} opset {version}; this runtime loads up to {limit}"
    if ir_version > caps.ir_version:
        return f"variant {label} needs IR version {ir_version}; this runtime loads up to {caps.ir_version}"
    if min_runtime_version and parse_version(caps.ort_version) < parse_version(min_runtime_version):
        return f"variant {label} needs onnxruntime {min_runtime_version} or newer; this is {caps.ort_version}"
    return None


@dataclass(frozen=True)
class ModelHeader:
    ir_version: int
    opsets: dict[str, int]
    producer: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


def _opset(buf: bytes) -> tuple[str, int]:
    domain, version = "", 0
    for number, value in fields(buf):
        if number == 1 and isinstance(value, bytes):
            domain = value.decode("utf-8", "replace")
        elif number == 2 and isinstance(value, int):
            version = value
    return normalize_domain(domain), version


def read_header(source: Path | str | bytes) -> ModelHeader:
    """IR version, opset imports, producer and metadata of an ONNX file, skipping the graph."""
    try:
        if isinstance(source, bytes):
            return _read_header(io.BytesIO(source), len(source))
        path = Path(source)
        with path.open("rb") as f:
            return _read_header(f, path.stat().st_size)
    except WireError as exc:
        raise ModelFormatError(f"not an ONNX model ({exc})") from None


def _read_header(f: BinaryIO, size: int) -> ModelHeader:
    ir_version: int | None = None
    opsets: dict[str, int] = {}
    producer: list[str] = []
    metadata: dict[str, str] = {}
    # 1 ir_version, 2 producer_name, 3 producer_version, 8 opset_import, 14 metadata_props
    for number, value in stream_fields(f, size, keep=(2, 3, 8, 14)):
        if isinstance(value, int):
            if number == 1:
                ir_version = value
        elif number == 8:
            domain, version = _opset(value)
            opsets[domain] = max(version, opsets.get(domain, 0))
        elif number == 14:
            entry = dict(fields(value))
            metadata[_text(entry.get(1))] = _text(entry.get(2))
        else:
            producer.append(value.decode("utf-8", "replace"))
    if ir_version is None or not opsets:
        raise ModelFormatError("not an ONNX model (no IR version or no opset imports)")
    return ModelHeader(ir_version, opsets, " ".join(p for p in producer if p), metadata)


def _text(value: int | bytes | None) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else ""


# --- the graph, for `models inspect` and publishing ------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str
    shape: tuple[int | str | None, ...] | None  # None: rank unknown; a str: a named dynamic dim

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "type": self.type, "shape": list(self.shape) if self.shape is not None else None}


@dataclass(frozen=True)
class ModelSummary:
    header: ModelHeader
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    ops: Counter[str]
    initializer_types: Counter[str]
    graph_name: str = ""


def _value_info(buf: bytes) -> TensorInfo:
    name, kind, shape = "", "unknown", None
    for number, value in fields(buf):
        if number == 1 and isinstance(value, bytes):
            name = value.decode("utf-8", "replace")
        elif number == 2 and isinstance(value, bytes):
            for tnum, tval in fields(value):
                if tnum == 1 and isinstance(tval, bytes):  # tensor_type
                    for n, v in fields(tval):
                        if n == 1 and isinstance(v, int):
                            kind = ELEM_TYPES.get(v, f"type{v}")
                        elif n == 2 and isinstance(v, bytes):
                            dims: list[int | str | None] = []
                            for dn, dv in fields(v):
                                if dn == 1 and isinstance(dv, bytes):
                                    dim: int | str | None = None
                                    for k, x in fields(dv):
                                        if k == 1 and isinstance(x, int):
                                            dim = x if x < 1 << 63 else x - (1 << 64)
                                        elif k == 2 and isinstance(x, bytes):
                                            dim = x.decode("utf-8", "replace")
                                    dims.append(dim)
                            shape = tuple(dims)
                elif tnum in (4, 5, 8, 9):
                    kind = {4: "sequence", 5: "map", 8: "optional", 9: "sparse_tensor"}[tnum]
    return TensorInfo(name, kind, shape)


def _walk_graph(
    buf: bytes, ops: Counter[str], init_types: Counter[str]
) -> tuple[str, list[TensorInfo], list[TensorInfo]]:
    name, inputs, outputs, initializers = "", [], [], set()
    for number, value in fields(buf):
        if not isinstance(value, bytes):
            continue
        if number == 1:  # node
            op, domain = "", ""
            for n, v in fields(value):
                if n == 4 and isinstance(v, bytes):
                    op = v.decode("utf-8", "replace")
                elif n == 7 and isinstance(v, bytes):
                    domain = v.decode("utf-8", "replace")
                elif n == 5 and isinstance(v, bytes):  # attribute: subgraphs of If, Loop, Scan
                    for an, av in fields(v):
                        if an in (6, 11) and isinstance(av, bytes):
                            _walk_graph(av, ops, init_types)
            ops[op if normalize_domain(domain) == AI_ONNX else f"{domain}:{op}"] += 1
        elif number == 2:
            name = value.decode("utf-8", "replace")
        elif number == 5:  # initializer
            for n, v in fields(value):
                if n == 8 and isinstance(v, bytes):
                    initializers.add(v.decode("utf-8", "replace"))
                elif n == 2 and isinstance(v, int):
                    init_types[ELEM_TYPES.get(v, f"type{v}")] += 1
        elif number == 11:
            inputs.append(_value_info(value))
        elif number == 12:
            outputs.append(_value_info(value))
    # Before IR 4 initializers were listed among the inputs too; they are not inputs a caller feeds.
    return name, [i for i in inputs if i.name not in initializers], outputs


def summarize(source: Path | str | bytes) -> ModelSummary:
    """Header, inputs, outputs and an op histogram (subgraphs included), read by hand."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    header = read_header(data)
    ops: Counter[str] = Counter()
    init_types: Counter[str] = Counter()
    inputs: list[TensorInfo] = []
    outputs: list[TensorInfo] = []
    graph_name = ""
    try:
        for number, value in fields(data):
            if number == 7 and isinstance(value, bytes):
                graph_name, inputs, outputs = _walk_graph(value, ops, init_types)
    except WireError as exc:
        raise ModelFormatError(f"not an ONNX model ({exc})") from None
    return ModelSummary(header, tuple(inputs), tuple(outputs), ops, init_types, graph_name)
