"""The ONNX protobuf wire format, by hand: the device side must not need the onnx package.

Reading: varints and the fields of one message, in memory or streamed from a file (a streamed reader
skips a large field by its length prefix, so that a 500 MB model's header costs a few reads). What the
fields mean is the reader's business (agent.device.compat). Writing: the tiny models that prove a
runtime's limits and a provider, and that tests use as fixtures.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Container, Iterator, Mapping, Sequence
from typing import BinaryIO

# The default operator set's domain: files write it as "", everything else names it "ai.onnx".
AI_ONNX = "ai.onnx"
FLOAT = 1  # TensorProto.DataType.FLOAT

Value = int | bytes  # a varint or fixed-width field is an int, a length-delimited one its bytes


class WireError(ValueError):
    """The bytes are not protobuf as ONNX files write it."""


# ---- reading -----------------------------------------------------------------------------------


Buffer = bytes | memoryview  # a memoryview walks a large model without copying its fields


def decode_varint(buf: Buffer, pos: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it."""
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise WireError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("varint too long")


def spans(buf: Buffer) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, where the field begins, where its value begins, where it ends) for each
    field of one message held in memory: a rewrite copies the fields it keeps byte for byte."""
    pos, end = 0, len(buf)
    while pos < end:
        begin = pos
        key, pos = decode_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            start = pos
            _, pos = decode_varint(buf, pos)
        elif wire in (1, 5):
            start, pos = pos, pos + (8 if wire == 1 else 4)
        elif wire == 2:
            length, start = decode_varint(buf, pos)
            pos = start + length
        else:
            raise WireError(f"wire type {wire} in field {number}")
        if pos > end:
            raise WireError(f"field {number} runs past the end of its message")
        yield number, wire, begin, start, pos


def fields(buf: bytes) -> Iterator[tuple[int, Value]]:
    """(field number, value) for each field of one message held in memory."""
    for number, wire, _, start, stop in spans(buf):
        if wire == 0:
            yield number, decode_varint(buf, start)[0]
        elif wire == 2:
            yield number, buf[start:stop]
        else:
            yield number, struct.unpack_from("<Q" if wire == 1 else "<I", buf, start)[0]


def read_varint(f: BinaryIO) -> int | None:
    """The next varint in the stream; None at a clean end of the stream."""
    result = shift = 0
    while True:
        b = f.read(1)
        if not b:
            if shift == 0:
                return None
            raise WireError("truncated varint")
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            raise WireError("varint too long")


def stream_fields(f: BinaryIO, size: int, keep: Container[int]) -> Iterator[tuple[int, Value]]:
    """The top-level fields of a message `size` bytes long: varints, and the length-delimited fields
    numbered in `keep`; every other field is skipped with a seek, unread."""
    while True:
        key = read_varint(f)
        if key is None:
            return
        number, wire = key >> 3, key & 7
        if wire == 0:
            value = read_varint(f)
            if value is None:
                raise WireError("truncated varint")
            yield number, value
        elif wire == 2:
            length = read_varint(f) or 0
            if f.tell() + length > size:
                raise WireError(f"field {number} is {length} bytes but the file ends first: truncated?")
            if number in keep:
                yield number, f.read(length)
            else:
                f.seek(length, io.SEEK_CUR)
        elif wire in (1, 5):
            f.seek(8 if wire == 1 else 4, io.SEEK_CUR)
        else:
            raise WireError(f"wire type {wire} in field {number}")


# ---- writing -----------------------------------------------------------------------------------


def encode_varint(value: int) -> bytes:
    """A varint; a negative number as its 64-bit two's complement, as protobuf writes int64."""
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        b = value & 0x7F
        value >>= 7
        if not value:
            out.append(b)
            return bytes(out)
        out.append(b | 0x80)


def field(number: int, value: int | bytes | str) -> bytes:
    """One field: an int as a varint, bytes or a str (UTF-8) length-delimited."""
    if isinstance(value, int):
        return encode_varint(number << 3) + encode_varint(value)
    data = value.encode() if isinstance(value, str) else value
    return encode_varint(number << 3 | 2) + encode_varint(len(data)) + data


def _tensor_info(name: str, elem: int, dims: Sequence[int]) -> bytes:
    shape = b"".join(field(1, field(1, d)) for d in dims)  # TensorShapeProto.dim[].dim_value
    tensor = field(1, elem) + field(2, shape)  # TypeProto.Tensor{elem_type, shape}
    return field(1, name) + field(2, field(1, tensor))  # ValueInfoProto{name, TypeProto{tensor_type}}


def node(op: str, inputs: Sequence[str], outputs: Sequence[str], name: str = "", attributes: bytes = b"") -> bytes:
    """NodeProto{input, output, name, op_type, attribute[]}; `attributes` as `attribute` writes them."""
    out = b"".join(field(1, i) for i in inputs) + b"".join(field(2, o) for o in outputs)
    return out + (field(3, name) if name else b"") + field(4, op) + attributes


def attribute(name: str, value: int | Sequence[int]) -> bytes:
    """A node's `attribute` field holding an INT (type 2) or INTS (type 7) AttributeProto."""
    if isinstance(value, int):
        return field(5, field(1, name) + field(20, 2) + field(3, value))
    return field(5, field(1, name) + field(20, 7) + b"".join(field(8, v) for v in value))


def tensor(name: str, elem: int, dims: Sequence[int], raw: bytes) -> bytes:
    """TensorProto{dims, data_type, name, raw_data}: an initializer, its data little-endian."""
    return b"".join(field(1, d) for d in dims) + field(2, elem) + field(8, name) + field(9, raw)


def _model(
    ir_version: int, opsets: Mapping[str, int], nodes: Sequence[bytes], graph_name: str, x: bytes, y: bytes, doc: bytes
) -> bytes:
    """ModelProto{ir_version, producer_name, graph, opset_import[]} with one input and one output."""
    graph = b"".join(field(1, n) for n in nodes) + field(2, graph_name) + field(11, x) + field(12, y)
    if doc:
        graph += field(10, doc)
    model = field(1, ir_version) + field(2, "edge-agent") + field(7, graph)
    for domain, version in opsets.items():
        model += field(8, field(1, "" if domain == AI_ONNX else domain) + field(2, version))
    return model


def identity_model(
    ir_version: int, opsets: Mapping[str, int], dims: Sequence[int] = (1, 4), elem: int = FLOAT, doc: bytes = b""
) -> bytes:
    """y = Identity(x) at any IR version and opset imports: proves a runtime's limits, and makes fixtures.

    `doc` becomes the graph's doc string: tests use it to make larger, distinct files.
    """
    x, y = _tensor_info("x", elem, dims), _tensor_info("y", elem, dims)
    return _model(ir_version, opsets, [node("Identity", ["x"], ["y"])], "probe", x, y, doc)


def add_relu_model(size: int = 64) -> bytes:
    """y = relu(x + x) on float32 [1, size], IR 8, opset 13: proves a provider (every provider takes Add and Relu)."""
    nodes = [node("Add", ["x", "x"], ["s"], "add"), node("Relu", ["s"], ["y"], "relu")]
    x, y = _tensor_info("x", FLOAT, (1, size)), _tensor_info("y", FLOAT, (1, size))
    return _model(8, {AI_ONNX: 13}, nodes, "edge_agent_probe", x, y, b"")
