"""Tiny ONNX models made with the onnx helper API, at any opset and IR version.

onnx 1.23's make_model stamps IR 14 and opset 28 by default, which current onnxruntime refuses, so every
model here states its IR version and opsets explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def unary_model(
    op: str = "Relu",
    shape: Sequence[int | str] = ("N", 4),
    opset: int = 13,
    ir_version: int = 8,
    extra_opsets: dict[str, int] | None = None,
    elem: int = TensorProto.FLOAT,
) -> onnx.ModelProto:
    """y = op(x): the smallest model that exercises a session, an opset and an IR version."""
    node = helper.make_node(op, ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        f"{op.lower()}_graph",
        [helper.make_tensor_value_info("x", elem, list(shape))],
        [helper.make_tensor_value_info("y", elem, list(shape))],
    )
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    return helper.make_model(graph, opset_imports=opsets, ir_version=ir_version, producer_name="edge-agent-tests")


def custom_domain_model(domain: str = "com.example.vision", opset: int = 13) -> onnx.ModelProto:
    """A node from a custom domain no runtime knows: loading it must be refused with a reason."""
    node = helper.make_node("FancyOp", ["x"], ["y"], domain=domain)
    graph = helper.make_graph(
        [node],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(domain, 1)], ir_version=8
    )


def linear_model(
    weights: np.ndarray, bias: np.ndarray | None = None, opset: int = 13, ir_version: int = 8
) -> onnx.ModelProto:
    """y = x @ W + b with named inputs; `weights` shape [in, out]. Useful as a sensor model."""
    w = numpy_helper.from_array(weights.astype(np.float32), "W")
    b = numpy_helper.from_array((bias if bias is not None else np.zeros(weights.shape[1])).astype(np.float32), "B")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "B"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", weights.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", weights.shape[1]])],
        initializer=[w, b],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
