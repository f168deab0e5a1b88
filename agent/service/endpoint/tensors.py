"""KServe v2 tensors in and out: the JSON form (`data` as numbers) and the binary-data extension (raw
little-endian bytes after the JSON header, `Inference-Header-Content-Length` long).

Everything here is checked before anything large is allocated: a shape's element count against the
request's budget, a binary slice's size against what the shape and datatype need. Every fault is a
`RequestError` with the HTTP status and one line naming the tensor and what was expected.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.util.printable import quoted

MAX_RANK = 16
MAX_DEPTH = 40  # JSON nesting a request may have: a rank-16 tensor's data plus the request's own levels
MAX_TENSORS = 256

# ONNX Runtime's type strings -> KServe v2 datatypes (BYTES and BF16 have no numpy form served here).
KSERVE_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
    "tensor(bfloat16)": "BF16",
}
NUMPY_OF = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
KSERVE_OF_NUMPY = {dtype: name for name, dtype in NUMPY_OF.items()}


class RequestError(Exception):
    """A request the endpoint refuses: `status` is the HTTP code, the message one line for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def shown(value: object) -> str:
    """A client's value in a message, quoted and cut short (a hostile name must not fill a log line)."""
    return quoted(value, 64)


def kserve_type(onnx_type: str) -> str:
    return KSERVE_TYPES.get(onnx_type, onnx_type)


def parse_json(data: bytes, what: str) -> Any:
    """JSON bounded in depth (the body is already bounded in size); RequestError when it is not JSON."""
    try:
        doc = json.loads(data)
    except RecursionError:
        raise RequestError(400, f"{what} is nested deeper than {MAX_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestError(400, f"{what} is not valid JSON: {exc}") from None
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise RequestError(400, f"{what} is nested deeper than {MAX_DEPTH} levels")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        # Only containers go on the stack: a flat list of a million numbers is walked once, cheaply.
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return doc


@dataclass(frozen=True)
class InputSpec:
    """What the served model takes for one input: KServe datatype and shape (None for a free dimension)."""

    name: str
    datatype: str
    shape: tuple[int | None, ...] | None
    optional: bool = False  # the profile gives it as a constant


@dataclass(frozen=True)
class OutputRequest:
    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: tuple[OutputRequest, ...] | None  # None: every output
    binary_default: bool


def _shape(name: str, value: Any) -> tuple[int, ...]:
    if (
        not isinstance(value, list)
        or len(value) > MAX_RANK
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)
    ):
        raise RequestError(
            400, f"input {shown(name)}: shape must be a list of at most {MAX_RANK} non-negative integers"
        )
    return tuple(value)


def _check_against(spec: InputSpec, datatype: str, shape: tuple[int, ...]) -> None:
    if datatype != spec.datatype:
        raise RequestError(
            400, f"input {spec.name!r}: datatype {shown(datatype)} given, the model takes {spec.datatype}"
        )
    if spec.shape is not None:
        wanted = "[" + ", ".join("-1" if d is None else str(d) for d in spec.shape) + "]"
        if len(shape) != len(spec.shape) or any(
            w is not None and w != d for w, d in zip(spec.shape, shape, strict=True)
        ):
            raise RequestError(400, f"input {spec.name!r}: shape {list(shape)} given, the model takes {wanted}")


def decode_request(header: Any, binary: bytes, specs: Mapping[str, InputSpec], max_elements: int) -> InferRequest:
    """The request's inputs as arrays, checked against the model's inputs and the element budget."""
    if not isinstance(header, dict):
        raise RequestError(400, "the request must be a JSON object with an `inputs` list")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs or len(raw_inputs) > MAX_TENSORS:
        raise RequestError(400, f"the request needs an `inputs` list of 1 to {MAX_TENSORS} tensors")
    params = _params(header)
    budget = max_elements
    offset = 0
    inputs: dict[str, np.ndarray] = {}
    for raw in raw_inputs:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise RequestError(400, "each input must be an object with a `name`, `shape`, `datatype` and data")
        name = raw["name"]
        spec = specs.get(name)
        if spec is None:
            raise RequestError(400, f"the model has no input {shown(name)} (inputs: {', '.join(specs)})")
        if name in inputs:
            raise RequestError(400, f"input {name!r} is given twice")
        shape = _shape(name, raw.get("shape"))
        datatype = raw.get("datatype")
        _check_against(spec, str(datatype), shape)
        count = math.prod(shape)
        budget -= count
        if budget < 0:
            raise RequestError(
                413, f"the request holds more than {max_elements} tensor elements (endpoint.max_elements)"
            )
        dtype = NUMPY_OF.get(spec.datatype)
        if dtype is None:
            raise RequestError(400, f"input {name!r}: datatype {spec.datatype} is not served by this endpoint")
        size = _params(raw).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size != count * dtype.itemsize or offset + size > len(binary):
                raise RequestError(
                    400,
                    f"input {name!r}: binary_data_size {shown(size)} does not match the {count * dtype.itemsize} "
                    f"bytes that shape {list(shape)} of {spec.datatype} needs, or runs past the body",
                )
            array = np.frombuffer(binary, dtype, count, offset).reshape(shape)
            offset += size
        else:
            array = _from_json(name, raw.get("data"), dtype, shape, count)
        inputs[name] = array
    if offset != len(binary):
        raise RequestError(400, f"the body has {len(binary) - offset} bytes after the JSON that no input claims")
    missing = [s.name for s in specs.values() if not s.optional and s.name not in inputs]
    if missing:
        raise RequestError(400, f"the request misses input(s) {', '.join(missing)}")
    return InferRequest(
        id=str(header["id"])[:256] if "id" in header else None,
        inputs=inputs,
        outputs=_outputs(header.get("outputs"), bool(params.get("binary_data_output", False))),
        binary_default=bool(params.get("binary_data_output", False)),
    )


def _params(obj: dict[str, Any]) -> dict[str, Any]:
    params = obj.get("parameters")
    return params if isinstance(params, dict) else {}


def _from_json(name: str, data: Any, dtype: np.dtype, shape: tuple[int, ...], count: int) -> np.ndarray:
    if not isinstance(data, list):
        raise RequestError(400, f"input {name!r}: needs `data` (a list) or parameters.binary_data_size")
    try:
        array = np.array(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise RequestError(400, f"input {name!r}: data is not a list of {dtype.name} values ({exc})") from None
    if array.size != count:
        raise RequestError(400, f"input {name!r}: data holds {array.size} values, shape {list(shape)} needs {count}")
    return array.reshape(shape)


def _outputs(raw: Any, binary_default: bool) -> tuple[OutputRequest, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) > MAX_TENSORS:
        raise RequestError(400, f"`outputs` must be a list of at most {MAX_TENSORS} objects with a `name`")
    out = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise RequestError(400, "each requested output must be an object with a `name`")
        params = _params(item)
        out.append(OutputRequest(item["name"], bool(params.get("binary_data", binary_default))))
    return tuple(out)


def encode_response(
    model: str, version: str, request_id: str | None, outputs: Sequence[tuple[str, Any, bool]]
) -> tuple[bytes, int | None]:
    """(body, JSON header length when binary data follows it) for outputs as (name, value, binary)."""
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, value, binary in outputs:
        if not isinstance(value, np.ndarray):
            raise RequestError(400, f"output {name!r} is not a tensor; request only tensor outputs in `outputs`")
        datatype = KSERVE_OF_NUMPY.get(value.dtype.newbyteorder("<") if value.dtype.byteorder == ">" else value.dtype)
        if datatype is None:
            raise RequestError(400, f"output {name!r} has type {value.dtype}, which this endpoint does not serve")
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(value.shape)}
        if binary:
            blob = np.ascontiguousarray(value, NUMPY_OF[datatype]).tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = value.ravel().tolist()
        tensors.append(tensor)
    doc: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": tensors}
    if request_id is not None:
        doc["id"] = request_id
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)
