"""Models that go wrong in the ways a fleet must survive: NaN outputs, errors on some runs, a load so slow
that a test can kill the process in the middle of it, outputs test vectors cannot hold.

Each is deterministic: the failing model draws from a seeded generator whose first draws pass, so that
publishing, the test vectors and the warm-up succeed and only the pipeline's later runs fail.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.helpers.daemon_proc import slow_on_data
from tests.helpers.models import linear_model, save

OPSET = [helper.make_opsetid("", 13)]


def _model(path: Path, name: str, nodes: list[onnx.NodeProto], output: onnx.ValueInfoProto, **graph: Any) -> Path:
    """A model of one input x [1, 3] (the test CSV's rows) and one output."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    model = helper.make_model(helper.make_graph(nodes, name, [x], [output], **graph), opset_imports=OPSET, ir_version=8)
    return save(model, path)


def nan_model(path: Path) -> Path:
    """y = x @ W with NaN weights: every output is NaN, and the model loads and runs without error."""
    return save(linear_model(np.full((3, 1), np.nan)), path)


def flaky_model(path: Path, seed: int = 3, threshold: float = 0.9) -> Path:
    """y = sum(x), except that about a quarter of the runs fail (a Gather out of range), drawn from a seeded
    RandomUniformLike: with seed 3 the first nine runs of a session pass (publish, test vectors, warm-up),
    then failures come in 13 of the next 31 runs."""
    inits = [
        numpy_helper.from_array(np.ones((3, 1), np.float32), "W"),
        numpy_helper.from_array(np.zeros(2, np.float32), "table"),
        numpy_helper.from_array(np.array(threshold, np.float32), "threshold"),
        numpy_helper.from_array(np.array(7, np.int64), "far"),
    ]
    nodes = [
        helper.make_node("RandomUniformLike", ["x"], ["r"], seed=float(seed)),
        helper.make_node("ReduceMax", ["r"], ["rmax"], keepdims=0),
        helper.make_node("Greater", ["rmax", "threshold"], ["bad"]),
        helper.make_node("Cast", ["bad"], ["bad_int"], to=TensorProto.INT64),
        helper.make_node("Mul", ["bad_int", "far"], ["index"]),  # 0, or 7: past the end of a 2-element table
        helper.make_node("Gather", ["table", "index"], ["zero"]),
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "zero"], ["y"]),
    ]
    return _model(
        path, "flaky", nodes, helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1]), initializer=inits
    )


def slow_model(path: Path, iterations: int = 40000) -> Path:
    """`slow_on_data` with a fixed trip count: seconds per run on any input, zeros included, so that its
    load and warm-up take long enough for a test to kill the process in the middle of them (3.3 s a run on
    a quiet 2-core EPYC; 9,000 iterations took 0.74 s there, less than the tests' 1 s before the kill)."""
    model = onnx.load(str(slow_on_data(path, iterations_per_unit=1)))
    model.graph.initializer.append(numpy_helper.from_array(np.array(iterations, np.int64), "fixed_count"))
    loop = next(n for n in model.graph.node if n.op_type == "Loop")
    loop.input[0] = "fixed_count"
    return save(model, path)


def sequence_model(path: Path) -> Path:
    """An output that is a sequence of tensors: a model the device runs, whose outputs vectors cannot hold."""
    seq = helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, [1, 3])
    return _model(path, "sequence", [helper.make_node("SequenceConstruct", ["x", "x"], ["seq"])], seq)


def zipmap_classifier(path: Path) -> Path:
    """A scikit-learn classifier of three features (the test CSV's columns) with ZipMap probabilities."""
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(0, 1, (40, 3)), rng.normal(4, 1, (40, 3))]).astype(np.float32)
    clf = LogisticRegression().fit(x, [0] * 40 + [1] * 40)
    model: onnx.ModelProto = to_onnx(clf, x[:1], target_opset={"": 15, "ai.onnx.ml": 3})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path
