"""runtime.Model: signature, constants, recurrent state, batches, warm-up, outputs as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from agent.config.profile import RuntimeConfig
from agent.inference.processing.jsonvalues import to_json
from agent.inference.runtime import ModelError, load_model
from tests.helpers.models import linear_model, save

RUNTIME = RuntimeConfig(threads=1)


def accumulator_model() -> onnx.ModelProto:
    """y = x * gain + s; sN = y: the smallest recurrent model (state carried by the caller)."""
    nodes = [
        helper.make_node("Mul", ["x", "gain"], ["xg"]),
        helper.make_node("Add", ["xg", "s"], ["y"]),
        helper.make_node("Identity", ["y"], ["sN"]),
    ]
    graph = helper.make_graph(
        nodes,
        "acc",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 2]),
            helper.make_tensor_value_info("gain", TensorProto.FLOAT, []),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2]),
            helper.make_tensor_value_info("sN", TensorProto.FLOAT, [1, 2]),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


@pytest.mark.arm64
def test_a_file_model_has_its_signature_a_content_version_and_runs(tmp_path: Path) -> None:
    path = save(linear_model(np.eye(3) * 2), tmp_path / "lin.onnx")
    model = load_model(path, RUNTIME, tmp_path)
    assert (model.name, model.provider, model.stream_input) == ("lin", "CPUExecutionProvider", "x")
    assert model.version.startswith("sha256:") and len(model.version) == 19
    assert model.inputs["x"].shape == (None, 3) and model.batchable
    assert model.run(np.array([[1, 2, 3]], np.float32))["y"].tolist() == [[2, 4, 6]]
    outs = model.run_batch([np.array([[i, 0, 0]], np.float32) for i in range(3)])
    assert [o["y"].tolist() for o in outs] == [[[0, 0, 0]], [[2, 0, 0]], [[4, 0, 0]]]


@pytest.mark.arm64
def test_constants_and_recurrent_state_are_carried_between_runs(tmp_path: Path) -> None:
    path = save(accumulator_model(), tmp_path / "acc.onnx")
    model = load_model(path, RUNTIME, tmp_path, constants={"gain": 10}, state={"s": "sN"})
    assert model.stream_input == "x" and not model.batchable
    state = model.new_state()
    assert state.values["s"].tolist() == [[0, 0]]
    for _ in range(3):
        out = model.run(np.array([[1, 2]], np.float32), state)
    assert out["y"].tolist() == [[30, 60]] and state.values["s"].tolist() == [[30, 60]]
    fresh = model.new_state()
    assert model.run(np.array([[1, 1]], np.float32), fresh)["y"].tolist() == [[10, 10]]


@pytest.mark.arm64
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, r"has 3 inputs without a value \(x, s, gain\)"),
        ({"constants": {"gain": 1}, "state": {"s": "nope"}}, "no output 'nope' to carry as state"),
        ({"constants": {"gain": 1, "volume": 2}, "state": {"s": "sN"}}, "has no input 'volume'"),
        (
            {"constants": {"gain": 1}, "state": {"s": "sN"}, "stream_input": "gain"},
            r"no input 'gain' for the stream \(free inputs: x\)",
        ),
    ],
)
def test_a_signature_that_does_not_fit_the_pipeline_is_refused_with_the_names(
    tmp_path: Path, kwargs: dict, message: str
) -> None:
    path = save(accumulator_model(), tmp_path / "acc.onnx")
    with pytest.raises(ModelError, match=message):
        load_model(path, RUNTIME, tmp_path, **kwargs)


@pytest.mark.arm64
def test_a_corrupt_or_missing_model_file_is_a_model_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(ModelError, match="cannot load model bad"):
        load_model(bad, RUNTIME, tmp_path)
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "none.onnx", RUNTIME, tmp_path)


@pytest.mark.arm64
def test_warm_up_on_an_input_the_model_rejects_fails_the_load(tmp_path: Path) -> None:
    path = save(linear_model(np.eye(3)), tmp_path / "lin.onnx")
    with pytest.raises(ModelError, match="failed its warm-up run"):
        load_model(path, RUNTIME, tmp_path, example=np.zeros((1, 4), np.float32))


def test_scikit_learn_zipmap_outputs_become_plain_json(tmp_path: Path) -> None:
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    x = np.array([[0, 0], [0, 1], [5, 5], [6, 5]], dtype=np.float32)
    clf = LogisticRegression().fit(x, [0, 0, 1, 1])
    path = tmp_path / "clf.onnx"
    path.write_bytes(to_onnx(clf, x[:1], target_opset={"": 15, "ai.onnx.ml": 3}).SerializeToString())
    model = load_model(path, RUNTIME, tmp_path)
    assert model.outputs["output_probability"].type.startswith("seq(map(int64")
    out = model.run(np.array([[6, 6]], np.float32))
    doc = json.loads(json.dumps(to_json(out, 3)))
    assert doc["output_label"] == [1] and set(doc["output_probability"][0]) == {"0", "1"}
    assert doc["output_probability"][0]["1"] > 0.9


@pytest.mark.arm64
def test_to_json_turns_numpy_values_and_non_finite_floats_into_plain_json() -> None:
    out = to_json(
        {
            "a": np.array([[1.23456789, np.nan]], np.float32),
            "b": np.float64(np.inf),
            "c": np.int64(3),
            "d": np.bool_(True),
        },
        3,
    )
    assert json.dumps(out, allow_nan=False) == '{"a": [[1.235, null]], "b": null, "c": 3, "d": true}'


@pytest.mark.arm64
def test_the_stdout_sink_writes_numpy_values_left_by_a_plugin_and_keeps_seq_per_pipeline(tmp_path: Path) -> None:
    import io

    from agent.transport.sinks.stdout import StdoutSink

    stream = io.StringIO()
    sink = StdoutSink(tmp_path, stream=stream)
    sink.result("a", {"device": "d", "pipeline": "a", "output": {"score": np.float32(0.5), "n": np.int64(2)}}, 1)
    sink.result("b", {"device": "d", "pipeline": "b", "output": {}}, 1)
    sink.result("a", {"device": "d", "pipeline": "a", "output": {}}, 1)
    sink.close()
    lines = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert [(x["pipeline"], x["seq"]) for x in lines] == [("a", 1), ("b", 1), ("a", 2)]
    assert lines[0]["output"] == {"score": 0.5, "n": 2}
    again = StdoutSink(tmp_path, stream=io.StringIO())
    again.result("a", {"device": "d", "pipeline": "a", "output": {}}, 1)
    assert json.loads(again.stream.getvalue())["seq"] == 3


PROBES = """
import sys
from agent.config.profile import RuntimeConfig
from agent.device import compat
from agent.inference.runtime import load_model
load_model(sys.argv[1], RuntimeConfig(), sys.argv[2])
print(compat.installed_caps.cache_info().misses)
"""


@pytest.mark.arm64
def test_a_model_the_release_table_lets_through_loads_without_probing_the_runtime(tmp_path: Path) -> None:
    """Proving the runtime's limits loads probe models (20 ms of every start): only a refusal needs it."""
    import subprocess
    import sys

    path = save(linear_model(np.ones((3, 1))), tmp_path / "m.onnx")
    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", PROBES, str(path), str(tmp_path / "state")],
        capture_output=True,
        text=True,
        cwd=repo,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0"]


@pytest.mark.arm64
def test_a_model_the_table_wrongly_lets_through_is_refused_with_the_proven_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release table row higher than the runtime: onnxruntime fails, and the refusal says why, in our words."""
    from agent.device import compat
    from agent.inference import runtime
    from tests.helpers.models import unary_model

    proven = compat.installed_caps()
    monkeypatch.setattr(runtime, "_table_caps", lambda: proven.with_limits(ai_onnx=99))
    limit = proven.opsets[compat.AI_ONNX]
    path = save(unary_model(opset=limit + 1, ir_version=proven.ir_version), tmp_path / "new.onnx")
    with pytest.raises(ModelError) as info:
        load_model(path, RuntimeConfig(), tmp_path, version="1")
    assert (
        str(info.value)
        == f"cannot load model new 1: variant new needs ai.onnx opset {limit + 1}; this runtime loads up to {limit}"
    )


@pytest.mark.arm64
def test_a_file_model_too_new_for_this_runtime_is_refused_with_the_reason(tmp_path: Path) -> None:
    from agent.device import compat
    from tests.helpers.models import unary_model

    limit = compat.installed_caps().opsets[compat.AI_ONNX]
    path = save(unary_model(opset=limit + 1, ir_version=compat.installed_caps().ir_version), tmp_path / "new.onnx")
    with pytest.raises(ModelError) as info:
        load_model(path, RuntimeConfig(), tmp_path, version="1")
    assert (
        str(info.value)
        == f"cannot load model new 1: variant new needs ai.onnx opset {limit + 1}; this runtime loads up to {limit}"
    )
