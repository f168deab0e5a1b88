"""The stream input as the pipeline will feed it, written into the model: its free dimensions fixed to
the frames' size, and (for camera frames) the preprocessing as the model's first nodes.

Why fixed dimensions: a provider that compiles the graph (OpenVINO, TensorRT) compiles it for those
shapes only. PP-OCRv4 det at 640x480 on 2 cores, the same float tensors, side by side: OpenVINO ran
83-85 frames/s with the input fixed to 1 x 3 x 480 x 640 against 65-67 with its dimensions free; the CPU
provider about 3% faster. Only a model no batch of several frames will reach gets its batch fixed to 1.

Why frames in: the runtime takes the frame as it comes (uint8, N x H x W x 3, BGR) and runs colour order,
layout, cast, scale and mean/std on its own threads, on a quarter of the bytes; the Python preprocessing
(1.8 ms a frame at 640x480 here) is gone.

The rewrite works on the protobuf wire (agent.device.onnxproto), so the device needs no onnx package:
the stream input's entry is replaced where it stands, the nodes are put first and their constants
last, and every other byte is copied as it is. A model it cannot rewrite exactly keeps its input and
the Python preprocessing, for the reason `NotRewritableError` gives.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from agent.device import hardware
from agent.device.compat import AI_ONNX, ModelFormatError, read_header
from agent.device.onnxproto import FLOAT, Buffer, decode_varint, encode_varint, field, node, spans, tensor
from agent.device.onnxproto import attribute as attr
from agent.util.files import read_small, write_atomic
from agent.util.hashing import checksum_file, sha256_bytes, sha256_file

PREFIX = "edge_agent.frame/"  # the names of the nodes and values added; a model using it is not rewritten
FRAME_SUFFIX = ".frame"  # the frame input is the stream input's name with this after it
MAX_BYTES = 256 << 20  # a larger model keeps its input (see _check_size)
UINT8, INT64 = 2, 7  # TensorProto.DataType
MIN_OPSET = 7  # Mul and Add broadcast from opset 7
MIN_IR = 4  # from IR 4 an initializer need not be a graph input too
FOLDER = "cache/fed-models"  # under the state folder: rewritten models, named by their digest
KEPT = 8  # files kept there, the most recently used
MAX_INDEX_BYTES = 64 * 1024  # what made a rewrite: a few hundred bytes


class NotRewritableError(Exception):
    """The model's stream input cannot be rewritten exactly; the reason says why."""


@dataclass(frozen=True)
class FramePrep:
    """What the graph does to a frame: per-channel x * scale + shift, in the model's channel order."""

    rgb: bool  # the model wants RGB: the frame's BGR channels are reversed
    scale: tuple[float, float, float]
    shift: tuple[float, float, float]


@dataclass(frozen=True)
class StreamPlan:
    """How a pipeline will feed the model's image input."""

    input: str | None = None  # the stream input; None: the only graph input nothing else feeds
    taken: frozenset[str] = frozenset()  # inputs fed by constants or recurrent state
    nhwc: bool = False  # channels last; else N x C x H x W
    size: tuple[int, int] | None = None  # (width, height) of every tensor, when the profile fixes it
    batch_one: bool = False  # no batch of several frames will ever run on this session
    frames: FramePrep | None = None  # preprocessing in the graph; None keeps the input's type


@dataclass(frozen=True)
class Rewritten:
    model: Path | bytes  # its file under the state folder (`kept`), or the bytes `rewrite` made
    input: str  # the stream input's name in this model
    frames: bool  # it takes BGR frames: the preprocessing is in the graph
    changes: str  # what was rewritten, for the log
    digest: str | None = None  # sha256 of the file, where it is one


@dataclass(frozen=True)
class _Input:
    name: str
    begin: int  # the graph field's span, replaced in place
    stop: int
    value: Buffer  # the ValueInfoProto


def rewrite(source: Path | bytes, plan: StreamPlan) -> Rewritten:
    """The model (a file or its bytes) with its stream input as `plan` says it will be fed."""
    _check_size(source.stat().st_size if isinstance(source, Path) else len(source))
    model = source.read_bytes() if isinstance(source, Path) else source
    try:
        header = read_header(model)
    except ModelFormatError as exc:
        raise NotRewritableError(str(exc)) from None
    ir, opset = header.ir_version, header.opsets.get(AI_ONNX, 0)
    buf = memoryview(model)
    graph = next(((b, s, e) for n, w, b, s, e in spans(buf) if n == 7 and w == 2), None)
    if graph is None:
        raise NotRewritableError("the file has no graph")
    if ir < MIN_IR or opset < MIN_OPSET:
        raise NotRewritableError(
            f"IR {ir}, opset {opset}: the rewrite needs IR {MIN_IR} and opset {MIN_OPSET} or newer"
        )
    gbegin, gstart, gstop = graph
    body = buf[gstart:gstop]
    stream, names = _stream_input(body, plan)
    elem, dims = _input_type(stream)
    dims, pinned = _pin(dims, plan)
    nodes = constants = b""
    name, changes = stream.name, [f"input {stream.name} fixed to {pinned}"] if pinned else []
    if plan.frames is not None:
        name = stream.name + FRAME_SUFFIX
        if name in names:
            raise NotRewritableError(f"the model already has a value named {name!r}")
        at = 3 if plan.nhwc else 1
        if elem != FLOAT or _dim_value(dims[at]) != 3:
            raise NotRewritableError(f"input {stream.name!r} is not float32 with 3 channels where the layout puts them")
        dims = [dims[0], dims[1], dims[2]] if plan.nhwc else [dims[0], dims[2], dims[3]]
        dims.append(field(1, 3))
        nodes, constants = _nodes(plan.frames, name, stream.name, plan.nhwc)
        elem = UINT8
        changes.append(f"{name} takes frames (uint8, N x H x W x 3, BGR): preprocessing in the graph")
    if not changes:
        raise NotRewritableError(f"input {stream.name!r} has nothing free to fix")
    parts: list[Buffer] = [nodes, body[: stream.begin], field(11, _value_info(name, elem, dims))]
    parts += [body[stream.stop :], constants]
    size = sum(len(p) for p in parts)
    out = b"".join([buf[:gbegin], encode_varint(7 << 3 | 2), encode_varint(size), *parts, buf[gstop:]])
    return Rewritten(out, name, plan.frames is not None, "; ".join(changes))


def _check_size(size: int) -> None:
    """The rewrite holds the model twice, and the session about to load it takes as much again: a model
    over MAX_BYTES, or over a quarter of the memory available now, keeps its input (a 512 MiB device
    must not run out of memory for a faster input)."""
    if size > MAX_BYTES:
        raise NotRewritableError(f"the model is over {MAX_BYTES >> 20} MiB")
    available = hardware.available_memory()
    if available is not None and 4 * size > available:
        raise NotRewritableError(
            f"the model is {size >> 20} MiB and {available >> 20} MiB of memory is available: the rewrite "
            "needs four times the model's size"
        )


def kept(state_dir: Path, source: Path | bytes, digest: str, plan: StreamPlan) -> Rewritten:
    """The rewrite of the model whose sha256 is `digest` for `plan`, as a file under the state folder: the one
    an earlier start made (checked against its checksum first), or made now. A start then pays one checksum
    instead of parsing and rewriting the model (PP-OCRv4 det, 4.7 MB: 1 ms instead of 15). The rewrite's bytes
    where the disk takes no file; NotRewritableError as `rewrite`."""
    index = state_dir / FOLDER / f"{_rewrite_key(digest, plan)}.json"
    try:
        record = json.loads(read_small(index, MAX_INDEX_BYTES))
        path = index.parent / f"{record['digest']}.onnx"
        if checksum_file(path) == record["checksum"]:
            os.utime(path)
            os.utime(index)
            return Rewritten(path, str(record["input"]), bool(record["frames"]), str(record["changes"]), path.stem)
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or damaged: made again
        pass
    made = rewrite(source, plan)
    try:
        path, fed = on_disk(state_dir, cast(bytes, made.model))  # `rewrite` makes bytes
        record = {"digest": fed, "checksum": checksum_file(path), "input": made.input, "frames": made.frames}
        record["changes"] = made.changes
        write_atomic(index, json.dumps(record).encode())
    except OSError:
        return made
    return Rewritten(path, made.input, made.frames, made.changes, fed)


def _rewrite_key(digest: str, plan: StreamPlan) -> str:
    """The model, the plan, and this module's code: a new release rewrites again."""
    code = os.stat(__file__)
    parts = [
        digest,
        repr(dataclasses.replace(plan, taken=frozenset())),
        sorted(plan.taken),
        code.st_size,
        code.st_mtime_ns,
    ]
    return sha256_bytes(json.dumps(parts).encode())[:32]


def on_disk(state_dir: Path, model: bytes) -> tuple[Path, str]:
    """The rewritten model as a file under the state folder, and its digest: onnxruntime keeps a model
    given as bytes for the session's life (as much memory again as the weights), and not one read from a
    file. Written once (atomically), checked before each use, the least recently used beyond KEPT removed.
    OSError where the disk takes no file: the caller loads the bytes."""
    digest = sha256_bytes(model)
    folder = state_dir / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{digest}.onnx"
    if not (path.is_file() and path.stat().st_size == len(model) and sha256_file(path) == digest):
        write_atomic(path, model)
    os.utime(path)
    for pattern in ("*.onnx", "*.json"):  # the rewrites, and what made each
        for old in sorted(folder.glob(pattern), key=lambda f: f.stat().st_mtime, reverse=True)[KEPT:]:
            old.unlink(missing_ok=True)
    return path, digest


def _text(value: Buffer) -> str:
    return bytes(value).decode("utf-8", "replace")


def _stream_input(body: Buffer, plan: StreamPlan) -> tuple[_Input, set[str]]:
    """The stream input's entry, and every name the graph defines (to refuse a clash)."""
    inputs: list[_Input] = []
    initializers: set[str] = set()
    names: set[str] = set()
    for number, wire, begin, start, stop in spans(body):
        if wire != 2:
            continue
        value = body[start:stop]
        if number == 11:
            name = _first_text(value, 1)
            inputs.append(_Input(name, begin, stop, value))
        elif number == 5:
            initializers.add(_tensor_name(value))
        elif number == 15:
            raise NotRewritableError("the graph has sparse initializers")
        elif number == 1:
            names.update(_text(value[s:e]) for n, w, _, s, e in spans(value) if n == 2 and w == 2)
    names |= initializers | {i.name for i in inputs}
    if any(name.startswith(PREFIX) for name in names):
        raise NotRewritableError(f"the model already names values {PREFIX}...")
    free = [i for i in inputs if i.name not in initializers and i.name not in plan.taken]
    chosen = [i for i in free if i.name == plan.input] if plan.input is not None else free
    if len(chosen) != 1:
        raise NotRewritableError("the stream input is not one free graph input")
    return chosen[0], names


def _first_text(message: Buffer, number: int) -> str:
    return next((_text(message[s:e]) for n, w, _, s, e in spans(message) if n == number and w == 2), "")


def _tensor_name(value: Buffer) -> str:
    name = ""
    for number, wire, _, start, stop in spans(value):
        if number == 8 and wire == 2:
            name = _text(value[start:stop])
        elif number == 14 and wire == 0 and decode_varint(value, start)[0] == 1:
            raise NotRewritableError("the model keeps tensors in external data files")
    return name


def _submessage(message: Buffer, number: int) -> Buffer:
    for n, wire, _, start, stop in spans(message):
        if n == number and wire == 2:
            return message[start:stop]
    raise NotRewritableError(f"field {number} is missing from the input's type")


def _input_type(stream: _Input) -> tuple[int, list[Buffer]]:
    """The element type and the dimensions (TensorShapeProto.Dimension messages) of a rank-4 input."""
    kind = _submessage(_submessage(stream.value, 2), 1)  # ValueInfoProto.type, TypeProto.tensor_type
    elem = next((decode_varint(kind, s)[0] for n, w, _, s, _e in spans(kind) if n == 1 and w == 0), 0)
    shape = _submessage(kind, 2)
    dims: list[Buffer] = [shape[s:e] for n, w, _, s, e in spans(shape) if n == 1 and w == 2]
    if len(dims) != 4:
        raise NotRewritableError(f"input {stream.name!r} has rank {len(dims)}, not 4")
    return elem, dims


def _dim_value(dim: Buffer) -> int | None:
    """A Dimension's fixed size; None for a named or unknown one."""
    return next((decode_varint(dim, s)[0] for n, w, _, s, _e in spans(dim) if n == 1 and w == 0), None)


def _pin(dims: list[Buffer], plan: StreamPlan) -> tuple[list[Buffer], str]:
    """The dimensions with the free ones the plan knows fixed, and the shape written (empty: none fixed)."""
    wanted: dict[int, int] = {0: 1} if plan.batch_one else {}
    if plan.size is not None:
        w, h = plan.size
        wanted.update({1: h, 2: w} if plan.nhwc else {2: h, 3: w})
    out, changed = list(dims), False
    for at, size in wanted.items():
        if _dim_value(dims[at]) is None:
            out[at], changed = field(1, size), True
    shown = "[" + ", ".join(str(_dim_value(d) or "?") for d in out) + "]"
    return out, shown if changed else ""


def _value_info(name: str, elem: int, dims: Sequence[Buffer]) -> bytes:
    """ValueInfoProto{name, type.tensor_type{elem_type, shape}}."""
    shape = b"".join(field(1, bytes(d)) for d in dims)
    return field(1, name) + field(2, field(1, field(1, elem) + field(2, shape)))


def _nodes(prep: FramePrep, frame: str, stream: str, nhwc: bool) -> tuple[bytes, bytes]:
    """(the graph's new first `node` fields, their `initializer` fields): layout, channel order, cast,
    multiply and add; layout and order move uint8 bytes, a quarter of what floats would be."""
    axis = 3 if nhwc else 1
    shape = [1, 1, 1, 3] if nhwc else [1, 3, 1, 1]
    steps: list[tuple[str, list[str], bytes]] = []  # (op, extra inputs, attributes)
    constants = b""
    if not nhwc:
        steps.append(("Transpose", [], attr("perm", [0, 3, 1, 2])))
    if prep.rgb:
        steps.append(("Gather", [PREFIX + "bgr_to_rgb"], attr("axis", axis)))
        constants += field(5, tensor(PREFIX + "bgr_to_rgb", INT64, [3], struct.pack("<3q", 2, 1, 0)))
    steps.append(("Cast", [], attr("to", FLOAT)))
    for op, values in (("Mul", prep.scale), ("Add", prep.shift)):
        if any(v != (1.0 if op == "Mul" else 0.0) for v in values):
            steps.append((op, [PREFIX + op.lower()], b""))
            constants += field(5, tensor(PREFIX + op.lower(), FLOAT, shape, struct.pack("<3f", *values)))
    out = b""
    value = frame
    for i, (op, extra, attributes) in enumerate(steps):
        result = stream if i == len(steps) - 1 else f"{PREFIX}{i}_{op.lower()}"
        out += field(1, node(op, [value, *extra], [result], f"{PREFIX}{op.lower()}", attributes))
        value = result
    return out, constants
