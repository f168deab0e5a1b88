"""The stream input written into the model (agent.device.graphprep): frames in with the preprocessing as the
graph's first nodes, free dimensions fixed to the frames; what it cannot rewrite exactly it refuses, and a
pipeline then runs the model as it is. Real ONNX Runtime sessions and real pipelines."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.config.base import adapter
from agent.config.profile import PipelineConfig, RuntimeConfig, load_profile
from agent.device import graphprep
from agent.device.graphprep import (
    FOLDER,
    KEPT,
    PREFIX,
    FramePrep,
    NotRewritableError,
    Rewritten,
    StreamPlan,
    kept,
    on_disk,
    rewrite,
)
from agent.device.onnxproto import WireError
from agent.inference.loader import open_pipeline, open_pipelines
from agent.inference.processing.pre import Preprocessor, frame_prep
from agent.inference.runtime import ModelError
from agent.inference.sessions import POOL
from agent.inference.warmup import stream_plan, stream_plans
from agent.util.hashing import sha256_bytes
from tests.helpers import media
from tests.helpers.models import linear_model, save
from tests.helpers.profiles import validated
from tests.test_pipeline import Recorder

pytestmark = pytest.mark.arm64
RUNTIME = RuntimeConfig(threads=1)
RNG = np.random.default_rng(7)


def image_model(
    layout: str = "nchw",
    dims: tuple[int | str, ...] | None = None,
    *,
    elem: int = TensorProto.FLOAT,
    ir: int = 8,
    opset: int = 13,
    conv: bool = True,
    name: str = "x",
) -> onnx.ModelProto:
    """y = Conv(x) (3x3, padded: the padding sees what preprocessing made) and z = x, on [N,3,H,W] or [N,H,W,3]."""
    shape = dims or (("N", 3, "H", "W") if layout == "nchw" else ("N", "H", "W", 3))
    nodes = [helper.make_node("Identity", [name], ["z"])]
    inits = []
    if conv:
        x = name
        if layout == "nhwc":
            nodes.append(helper.make_node("Transpose", [name], ["t"], perm=[0, 3, 1, 2]))
            x = "t"
        nodes.append(helper.make_node("Conv", [x, "w"], ["y"], pads=[1, 1, 1, 1]))
        inits.append(numpy_helper.from_array(RNG.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"))
    outputs = [helper.make_tensor_value_info("z", elem, None)]
    if conv:
        outputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "img", [helper.make_tensor_value_info(name, elem, list(shape))], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)


def preprocess(**fields: Any) -> Any:
    return (
        adapter(PipelineConfig)
        .validate_python({"name": "p", "model": "m.onnx", "source": {"type": "synthetic"}, "preprocess": fields})
        .preprocess
    )


def frames(n: int = 3, w: int = 32, h: int = 24) -> list[np.ndarray]:
    return [RNG.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize(
    "fields",
    [
        {
            "color": "rgb",
            "layout": "nchw",
            "scale": 1 / 255,
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
        },
        {"color": "bgr", "layout": "nchw", "scale": 1 / 255},
        {"color": "rgb", "layout": "nhwc", "mean": [127.5], "std": [127.5]},
        {"color": "bgr", "layout": "nhwc"},
    ],
)
def test_frames_in_give_exactly_the_tensor_python_preprocessing_gives(fields: dict[str, Any]) -> None:
    cfg = preprocess(**fields)
    prep = frame_prep(cfg)
    assert prep is not None
    model = image_model(cfg.layout).SerializeToString()
    out = rewrite(model, StreamPlan(nhwc=cfg.layout == "nhwc", frames=prep))
    assert out.input == "x.frame" and out.frames
    fused = ort.InferenceSession(out.model, providers=["CPUExecutionProvider"])
    plain = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    assert [(i.name, i.type, i.shape) for i in fused.get_inputs()] == [("x.frame", "tensor(uint8)", ["N", "H", "W", 3])]
    numpy_path = Preprocessor(cfg)
    numpy_path.fast = False  # the reference path, not OpenCV's blob (which rounds in its own order)
    in_graph = Preprocessor(cfg, frames=True)
    for img in frames():
        tensor, _ = numpy_path(img)
        frame, _ = in_graph(img)
        assert frame.dtype == np.uint8 and frame.shape == (1, 24, 32, 3)
        z, y = fused.run(None, {"x.frame": frame})
        z0, y0 = plain.run(None, {"x": tensor})
        assert np.array_equal(z, z0), "the graph's tensor is the numpy path's, bit for bit"
        assert np.allclose(y, y0, rtol=1e-5, atol=1e-5)


def test_free_dimensions_are_fixed_to_the_frames_and_the_batch_only_where_no_batch_comes() -> None:
    model = image_model().SerializeToString()

    def shape(plan: StreamPlan) -> list[Any]:
        session = ort.InferenceSession(rewrite(model, plan).model, providers=["CPUExecutionProvider"])
        return list(session.get_inputs()[0].shape)

    assert shape(StreamPlan(size=(32, 24), batch_one=True)) == [1, 3, 24, 32]
    assert shape(StreamPlan(size=(32, 24))) == ["N", 3, 24, 32]
    assert shape(StreamPlan(batch_one=True)) == [1, 3, "H", "W"]
    nhwc = image_model("nhwc").SerializeToString()
    out = rewrite(nhwc, StreamPlan(nhwc=True, size=(32, 24), batch_one=True))
    assert out.changes == "input x fixed to [1, 24, 32, 3]" and not out.frames
    # a fixed dimension is never changed, even where the plan disagrees: the preprocessor's check says so
    fixed = image_model(dims=(1, 3, 24, 32)).SerializeToString()
    with pytest.raises(NotRewritableError, match="nothing free to fix"):
        rewrite(fixed, StreamPlan(size=(64, 48), batch_one=True))


def _external(tmp: Path) -> bytes:
    model = image_model()
    onnx.save(model, str(tmp / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True, size_threshold=0)
    return (tmp / "ext.onnx").read_bytes()


def _sparse() -> bytes:
    model = image_model(conv=False)
    values = numpy_helper.from_array(np.ones(1, np.float32), "s_values")
    indices = numpy_helper.from_array(np.zeros(1, np.int64), "s_indices")
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4]))
    return model.SerializeToString()


def _two_inputs() -> bytes:
    model = image_model(conv=False)
    model.graph.input.append(helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1]))
    return model.SerializeToString()


def _named(value: str) -> bytes:
    model = image_model(conv=False)
    model.graph.node.append(helper.make_node("Identity", ["x"], [value]))
    return model.SerializeToString()


RGB = FramePrep(True, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))


@pytest.mark.parametrize(
    ("make", "plan", "reason"),
    [
        (lambda t: image_model(ir=3).SerializeToString(), StreamPlan(frames=RGB), "IR 3"),
        (lambda t: image_model(opset=6, conv=False).SerializeToString(), StreamPlan(frames=RGB), "opset 6"),
        (
            lambda t: image_model(elem=TensorProto.UINT8, conv=False).SerializeToString(),
            StreamPlan(frames=RGB),
            "float32",
        ),
        (
            lambda t: image_model(dims=("N", 1, "H", "W"), conv=False).SerializeToString(),
            StreamPlan(frames=RGB),
            "3 channels",
        ),
        (lambda t: image_model(dims=("N", 3, "H"), conv=False).SerializeToString(), StreamPlan(frames=RGB), "rank 3"),
        (_external, StreamPlan(frames=RGB), "external data"),
        (lambda t: _sparse(), StreamPlan(frames=RGB), "sparse"),
        (lambda t: _two_inputs(), StreamPlan(frames=RGB), "not one free graph input"),
        (lambda t: _two_inputs(), StreamPlan(input="nope", frames=RGB), "not one free graph input"),
        (lambda t: _named("x.frame"), StreamPlan(frames=RGB), "already has a value named 'x.frame'"),
        (lambda t: _named(PREFIX + "0_cast"), StreamPlan(frames=RGB), "already names values"),
    ],
)
def test_what_cannot_be_rewritten_exactly_is_refused_with_its_reason(
    tmp_path: Path, make: Any, plan: StreamPlan, reason: str
) -> None:
    with pytest.raises(NotRewritableError, match=reason):
        rewrite(make(tmp_path), plan)


def test_two_inputs_are_rewritten_when_the_others_are_fed_by_constants() -> None:
    out = rewrite(_two_inputs(), StreamPlan(taken=frozenset({"scale"}), frames=RGB))
    session = ort.InferenceSession(out.model, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x.frame", "scale"], "the frame input stays where x stood"


def test_truncated_or_damaged_models_are_refused_never_misread() -> None:
    model = image_model().SerializeToString()
    plan = StreamPlan(size=(32, 24), frames=RGB)
    refused = 0
    for cut in range(0, len(model), 7):
        with pytest.raises((NotRewritableError, WireError)):
            rewrite(model[:cut], plan)
        refused += 1
    damaged = bytearray(model)
    for at in RNG.integers(0, len(model), 300):
        damaged[at] ^= 0xFF
        try:
            out = rewrite(bytes(damaged), plan)
        except (NotRewritableError, WireError):
            refused += 1
            continue
        assert len(out.model) > len(model) // 2  # a rewrite of what it read, which ONNX Runtime then judges
    assert refused > len(model) // 7


def test_plans_follow_the_pipeline_and_models_shared_by_pipelines_that_differ_get_none(tmp_path: Path) -> None:
    def cfg(name: str, model: str, **fields: Any) -> PipelineConfig:
        return adapter(PipelineConfig).validate_python(
            {"name": name, "model": model, "source": {"type": "synthetic"}, **fields}
        )

    cam = cfg("a", "m.onnx", preprocess={"resize": [32, 24], "scale": 0.5})
    plan = stream_plan(cam, RUNTIME)
    assert (
        plan is not None
        and plan.size == (32, 24)
        and plan.batch_one
        and plan.frames == FramePrep(True, (0.5, 0.5, 0.5), (-0.0, -0.0, -0.0))
    )
    off = cfg("b", "m.onnx", preprocess={"in_model": False})
    assert (p := stream_plan(off, RUNTIME)) is not None and p.frames is None
    gray = cfg("g", "m.onnx", preprocess={"color": "gray"})
    assert (p := stream_plan(gray, RUNTIME)) is not None and p.frames is None
    anomaly = cfg("c", "m.onnx", postprocess={"type": "anomaly", "method": "reconstruction", "threshold": 1})
    assert (p := stream_plan(anomaly, RUNTIME)) is not None and p.frames is None, "it reads the preprocessed input"
    sensor = adapter(PipelineConfig).validate_python(
        {"name": "s", "model": "m.onnx", "source": {"type": "csv", "path": "s.csv"}}
    )
    assert stream_plan(sensor, RUNTIME) is None
    batching_off = validated(RuntimeConfig, batching={"mode": "off"})
    POOL.plan(2)
    try:
        assert (p := stream_plan(cam, RUNTIME)) is not None and not p.batch_one, "two cameras may batch"
        assert (p := stream_plan(cam, batching_off)) is not None and p.batch_one
    finally:
        POOL.plan(1)
    other = cfg("d", "m.onnx", preprocess={"resize": [64, 48], "scale": 0.5})
    alone = cfg("e", "n.onnx")
    plans = stream_plans([cam, other, alone], RUNTIME)
    assert plans["a"] is None and plans["d"] is None and plans["e"] is not None
    twins = stream_plans([cam, cfg("f", "m.onnx", preprocess={"resize": [32, 24], "scale": 0.5})], RUNTIME)
    assert twins["a"] == twins["f"] is not None
    assert stream_plans([cam, alone], RUNTIME, endpoint=True) == {"a": None, "e": None}, "the endpoint's clients"


def _profile(tmp_path: Path, model: Path, folder: Path, **pre: Any) -> Any:
    doc = {
        "device": {"id": "d", "state_dir": str(tmp_path / "state")},
        "runtime": {"threads": 1},
        "pipelines": [
            {
                "name": "cam",
                "model": str(model),
                "source": {"type": "images", "path": str(folder)},
                "preprocess": {"resize": [32, 24], "scale": 0.02, "mean": [0.5], **pre},
                "postprocess": {"type": "raw"},
            }
        ],
    }
    (tmp_path / "p.yaml").write_text(json.dumps(doc))
    return load_profile(tmp_path / "p.yaml")


def test_a_profiles_camera_runs_frames_in_and_publishes_what_python_preprocessing_gives(tmp_path: Path) -> None:
    """Through open_pipelines, as the daemon opens them; frames of another size are resized first."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.png"), media.background(64, 48, "noisy", seed=i))
    model = save(image_model(conv=False), tmp_path / "m.onnx")
    outputs = {}
    for in_model in (True, False):
        sink = Recorder()
        (pipe,) = open_pipelines(_profile(tmp_path, model, folder, in_model=in_model), sink, emit=sink.event)
        try:
            assert pipe.model.takes_frames is in_model
            assert pipe.model.stream_spec.shape == ((1, 24, 32, 3) if in_model else (1, 3, 24, 32))
            pipe.start()
            assert pipe.wait(10)
        finally:
            pipe.stop()
        assert [r["source_seq"] for r in sink.results] == [0, 1, 2]
        assert not [e for e in sink.events if e.type in ("frame.rejected", "inference.error")]
        outputs[in_model] = [r["output"] for r in sink.results]
    assert outputs[True] == outputs[False]


def test_a_model_that_cannot_be_rewritten_runs_as_it_is(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    cv2.imwrite(str(folder / "0.png"), media.background(32, 24))
    model = save(image_model(opset=6, conv=False), tmp_path / "m.onnx")
    sink = Recorder()
    with caplog.at_level("DEBUG", logger="agent.inference.runtime"):
        (pipe,) = open_pipelines(_profile(tmp_path, model, folder), sink, emit=sink.event)
    try:
        assert not pipe.model.takes_frames and pipe.model.stream_input == "x"
        assert "input kept as it is: IR 8, opset 6" in caplog.text
        pipe.start()
        assert pipe.wait(10)
    finally:
        pipe.stop()
    assert len(sink.results) == 1


def test_a_swap_between_frames_in_and_tensors_in_keeps_every_frame(tmp_path: Path) -> None:
    """v1 takes frames; v2 (opset 6) cannot be rewritten and takes tensors; frames already made for v1 when
    the swap lands are made again for v2. A wrong model is still refused on the last real input."""
    v1 = save(image_model(conv=False), tmp_path / "v1.onnx")
    v2 = save(image_model(opset=6, conv=False), tmp_path / "v2.onnx")
    wrong = save(linear_model(np.ones((3, 1))), tmp_path / "wrong.onnx")
    cfg = adapter(PipelineConfig).validate_python(
        {
            "name": "cam",
            "model": str(v1),
            "source": {"type": "synthetic", "width": 64, "height": 48, "fps": 100, "frames": 150},
            "preprocess": {"resize": [32, 24]},
            "postprocess": {"type": "raw"},
        }
    )
    sink = Recorder()
    plan = stream_plan(cfg, RUNTIME)
    pipe = open_pipeline(cfg, sink, device="d", runtime=RUNTIME, state_dir=tmp_path, emit=sink.event, plan=plan)
    assert pipe.model.takes_frames
    serving = pipe.model
    run = serving.run

    def slow_run(*args: Any, **kwargs: Any) -> Any:  # so that a frame made for v1 waits when the swap lands
        time.sleep(0.01)
        return run(*args, **kwargs)

    serving.run = slow_run  # type: ignore[method-assign]
    pipe.start()
    try:
        time.sleep(0.3)
        assert not pipe.swap(v2, version="2").takes_frames
        time.sleep(0.3)
        with pytest.raises(ModelError, match="warm-up"):
            pipe.swap(wrong, version="3")
        assert pipe.swap(v1, version="4").takes_frames
        assert pipe.wait(20)
    finally:
        pipe.stop()
    versions = [r["model_version"] for r in sink.results]
    assert [r["source_seq"] for r in sink.results] == list(range(150))
    assert "2" in versions and versions[-1] == "4" and "3" not in versions
    assert not [e for e in sink.events if e.type in ("frame.rejected", "inference.error")], sink.events


def test_the_rewritten_model_is_kept_on_disk_checked_before_use_and_pruned(tmp_path: Path) -> None:
    state = tmp_path / "state"
    models = [image_model(conv=False, name=f"x{i}").SerializeToString() for i in range(KEPT + 2)]
    plan = StreamPlan(size=(32, 24), batch_one=True)
    first = rewrite(models[0], plan).model
    path, digest = on_disk(state, first)
    assert path == state / FOLDER / f"{digest}.onnx" and path.read_bytes() == first
    path.write_bytes(first[:-10] + b"\0" * 10)  # damaged on disk: written again before use
    assert on_disk(state, first)[0].read_bytes() == first
    os.utime(path, (999.0, 999.0))
    for i, model in enumerate(models[1:]):
        p, _ = on_disk(state, rewrite(model, plan).model)
        os.utime(p, (1000.0 + i, 1000.0 + i))  # mtimes apart whatever the filesystem's resolution
    kept = sorted(f.name for f in (state / FOLDER).glob("*.onnx"))
    assert len(kept) == KEPT and path.name not in kept, "the least recently used went"


def test_a_rewrite_is_made_once_and_a_later_start_takes_its_file_checked_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    model = image_model(conv=False).SerializeToString()
    digest = sha256_bytes(model)
    plan = StreamPlan(size=(32, 24), batch_one=True)
    made = kept(state, model, digest, plan)
    assert isinstance(made.model, Path) and made.model.read_bytes() == rewrite(model, plan).model
    assert made.digest == sha256_bytes(made.model.read_bytes())

    calls: list[StreamPlan] = []
    real = graphprep.rewrite

    def counted(source: Path | bytes, how: StreamPlan) -> Rewritten:
        calls.append(how)
        return real(source, how)

    monkeypatch.setattr(graphprep, "rewrite", counted)
    assert kept(state, model, digest, plan) == made and calls == []  # taken as it is
    other = StreamPlan(size=(32, 24), batch_one=False)
    assert kept(state, model, digest, other).model != made.model and calls == [other]  # another plan: its own
    made.model.write_bytes(made.model.read_bytes()[:-10] + b"\0" * 10)  # damaged on disk: made again
    again = kept(state, model, digest, plan)
    assert again == made and calls[-1] == plan
    assert made.model.read_bytes() == rewrite(model, plan).model
    for index in (state / FOLDER).glob("*.json"):  # what made it, damaged: made again
        index.write_text("{")
    kept(state, model, digest, plan)
    assert calls[-1] == plan and len(calls) == 3


def test_a_state_folder_that_takes_no_file_still_runs_the_rewritten_model(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    cv2.imwrite(str(folder / "0.png"), media.background(32, 24))
    model = save(image_model(conv=False), tmp_path / "m.onnx")
    profile = _profile(tmp_path, model, folder)
    (tmp_path / "state" / FOLDER).parent.mkdir(parents=True)
    (tmp_path / "state" / FOLDER).write_text("not a folder")
    sink = Recorder()
    (pipe,) = open_pipelines(profile, sink, emit=sink.event)
    try:
        assert pipe.model.takes_frames
        pipe.start()
        assert pipe.wait(10)
    finally:
        pipe.stop()
    assert len(sink.results) == 1


def test_a_model_too_large_for_the_memory_available_now_keeps_its_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rewrite holds the model twice and the session takes as much again: a small device keeps its memory."""
    from agent.device import graphprep

    path = save(image_model(), tmp_path / "m.onnx")
    size = path.stat().st_size
    plan = StreamPlan(size=(32, 24), batch_one=True)
    assert rewrite(path, plan).model == rewrite(path.read_bytes(), plan).model  # a file or its bytes alike
    monkeypatch.setattr(graphprep.hardware, "available_memory", lambda: 3 * size)
    with pytest.raises(NotRewritableError, match="MiB of memory is available: the rewrite needs four times"):
        rewrite(path, plan)
    monkeypatch.setattr(graphprep.hardware, "available_memory", lambda: 4 * size)
    assert rewrite(path, plan).changes == "input x fixed to [1, 3, 24, 32]"
