"""Camera pipelines share the process's stage workers: a camera costs its capture thread, nothing more."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.config.base import PluginConfig, adapter
from agent.config.profile import PipelineConfig, load_profile
from agent.device import providers
from agent.inference.loader import open_pipelines
from agent.inference.pipeline import Pipeline
from agent.inference.runtime import load_model
from agent.inference.sessions import POOL
from agent.inference.sources.base import BaseSource, Frame
from agent.inference.stagepool import STAGES, Stage, StagePool
from tests.helpers.models import save
from tests.test_pipeline import RUNTIME, Recorder, pool_model

REPO = Path(__file__).resolve().parent.parent


def busy_pool_model(size: int = 256, rounds: int = 4) -> onnx.ModelProto:
    """`pool_model`'s y (channel means), after `rounds` size x size MatMuls that depend on the input (so
    that nothing is folded away): a few ms a frame, enough to make inference the cameras' bottleneck."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((size, size)) / size).astype(np.float32), "w")
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["p"]),
        helper.make_node("Flatten", ["p"], ["y0"]),
        helper.make_node("ReduceMean", ["y0"], ["m"], keepdims=0),
        helper.make_node("Expand", ["m", "shape"], ["a0"]),
    ]
    for i in range(rounds):
        nodes.append(helper.make_node("MatMul", [f"a{i}", "w"], [f"a{i + 1}"]))
    nodes += [
        helper.make_node("ReduceSum", [f"a{rounds}"], ["s"], keepdims=0),
        helper.make_node("Mul", ["s", "zero"], ["z"]),
        helper.make_node("Add", ["y0", "z"], ["y"]),
    ]
    inits = [
        w,
        numpy_helper.from_array(np.array([size, size], np.int64), "shape"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
    ]
    graph = helper.make_graph(
        nodes,
        "busy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 24, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


class Camera(BaseSource[PluginConfig]):
    """A live source: `scale` fills its frames, so each result says which camera it came from."""

    live = True

    def __init__(self, config: PluginConfig, scale: float, frames: int = 400) -> None:
        super().__init__(config)
        self.image = np.full((24, 32, 3), scale, np.uint8)
        self.count = frames

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        while not stop.is_set() and self.seq < self.count:
            yield Frame(self.image, time.time(), self.next_seq())
            time.sleep(0.002)


def camera_pipeline(tmp_path: Path, i: int, sink: Recorder, frames: int = 400) -> Pipeline:
    cfg = adapter(PipelineConfig).validate_python(
        {"name": f"cam{i}", "model": "m.onnx", "source": {"type": "synthetic"}}
    )
    model = load_model(tmp_path / "m.onnx", RUNTIME, tmp_path, version="1")
    camera = Camera(cfg.source, i, frames)
    return Pipeline(cfg, model, sink, device="d", state_dir=tmp_path, emit=sink.event, source=camera)


def test_camera_pipelines_run_on_the_shared_workers_in_order_and_swap_between_frames(tmp_path: Path) -> None:
    save(pool_model(), tmp_path / "m.onnx")
    v2 = save(pool_model(scale=2.0), tmp_path / "v2.onnx")
    idle_workers = STAGES.workers  # 0 unless another test left a camera pipeline running
    sinks = [Recorder() for _ in range(3)]
    pipes = [camera_pipeline(tmp_path, i + 1, sink) for i, sink in enumerate(sinks)]
    for p in pipes:
        p.start()
    names = {t.name for t in threading.enumerate()}
    assert {f"cam{i}-{stage}" for i in (1, 2, 3) for stage in ("pre", "infer", "post")}.isdisjoint(names)
    assert {"cam1-capture", "cam2-capture", "cam3-capture"} <= names
    time.sleep(0.3)
    pipes[0].swap(v2, version="2")
    for p in pipes:
        assert p.wait(30)
        p.stop()
    for i, sink in enumerate(sinks, start=1):
        seqs = [r["source_seq"] for r in sink.results]
        assert len(seqs) > 10 and seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        versions = [r["model_version"] for r in sink.results]
        scale = 2.0 if i == 1 else 1.0
        # every result is this camera's frame through the version named: nothing crossed pipelines
        for r in sink.results:
            factor = 2.0 if r["model_version"] == "2" else 1.0
            assert r["output"]["y"] == [[i * factor] * 3], (i, r)
        assert versions == sorted(versions) and versions[-1] == ("2" if scale == 2.0 else "1")
    assert {p.stats()["state"] for p in pipes} == {"finished"}
    deadline = time.monotonic() + 5
    while STAGES.workers > idle_workers and time.monotonic() < deadline:  # these pipelines gone: their workers too
        time.sleep(0.01)
    assert STAGES.workers == idle_workers


@pytest.mark.logs_exception("a bug in a stage is logged with its traceback, as in a threaded pipeline")
def test_a_camera_pipeline_that_fails_a_stage_leaves_the_others_served(tmp_path: Path) -> None:
    save(pool_model(), tmp_path / "m.onnx")
    good, bad = Recorder(), Recorder(fail_first=10**6)
    pipes = [camera_pipeline(tmp_path, 1, good), camera_pipeline(tmp_path, 2, bad)]

    def broken(_: object) -> None:
        raise RuntimeError("a bug in a stage")

    pipes[1]._publish = broken  # type: ignore[method-assign,assignment]
    for p in pipes:
        p.start()
    assert pipes[0].wait(30) and pipes[1].wait(30)
    for p in pipes:
        p.stop()
    assert pipes[1].stats()["state"] == "failed" and "pipeline.failed" in bad.types()
    assert pipes[0].stats()["state"] == "finished" and len(good.results) > 10


def test_cameras_take_turns_at_inference_and_each_stops_promptly(tmp_path: Path) -> None:
    save(busy_pool_model(), tmp_path / "m.onnx")
    sinks = [Recorder() for _ in range(4)]
    pipes = [camera_pipeline(tmp_path, i + 1, sink, frames=10**6) for i, sink in enumerate(sinks)]
    for p in pipes:
        p.start()
    time.sleep(1.5)
    for p in pipes:  # one at a time, the others still streaming: each one's last frames still get their turn
        started = time.monotonic()
        p.stop(timeout=10)
        assert time.monotonic() - started < 5 and p.stats()["state"] == "stopped"
    counts = [len(s.results) for s in sinks]
    assert min(counts) > max(counts) / 2, counts  # inferences take turns: no camera starves the others


def test_stopping_a_camera_pipeline_that_never_started_returns_at_once(tmp_path: Path) -> None:
    save(pool_model(), tmp_path / "m.onnx")
    pipe = camera_pipeline(tmp_path, 1, Recorder())
    started = time.monotonic()
    pipe.stop(timeout=10)
    assert time.monotonic() - started < 1.0 and pipe.stats()["state"] == "created"
    pipe.model.close()


CHILD = """
import json, os, sys, threading, time
os.sched_setaffinity(0, {0})  # a container given one CPU
from agent.util.libraries import quiet_libraries
quiet_libraries()  # what `edge-agent` does before numpy, OpenCV and onnxruntime load
sys.path.insert(0, os.getcwd())
from pathlib import Path
from tests.test_thread_budget import camera_pipeline, Recorder, save, pool_model
from agent.inference.stagepool import STAGES, Stage, StagePool
tmp = Path(sys.argv[1])
n = int(sys.argv[2])
save(pool_model(), tmp / "m.onnx")
pipes = [camera_pipeline(tmp, i, Recorder(), frames=10**6) for i in range(n)]  # streaming until stopped
for p in pipes:
    p.start()
time.sleep(0.5)
seen = {"os": 0}
for _ in range(20):
    seen["os"] = max(seen["os"], len(os.listdir("/proc/self/task")))
    time.sleep(0.02)
seen["python"] = threading.active_count()
seen["workers"] = STAGES.workers
seen["intra_op"] = pipes[0].model.session.get_session_options().intra_op_num_threads
seen["results"] = min(p.stats()["results"] for p in pipes)
for p in pipes:
    p.stop()
print(json.dumps(seen))
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
@pytest.mark.parametrize("cameras", [1, 6])
def test_camera_threads_under_one_cpu_are_the_captures_plus_a_constant(tmp_path: Path, cameras: int) -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), str(cameras)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["results"] > 0 and seen["intra_op"] == 1
    # one for inference, one for pre/post: the least that still overlaps them
    assert seen["workers"] == 2, (seen, out.stderr[-3000:])
    # main + a capture thread per camera + the two workers; onnxruntime keeps one thread of its own
    assert seen["python"] == 1 + cameras + 2, seen
    assert seen["os"] <= seen["python"] + 1, seen


@pytest.mark.parametrize(("cores", "cameras", "workers"), [(1, 4, 2), (2, 1, 2), (2, 4, 3), (3, 4, 4), (8, 2, 3)])
def test_inferences_stay_on_the_same_workers_and_one_is_left_for_pre_and_post(
    cores: int, cameras: int, workers: int
) -> None:
    """A worker per inference that may run at once (a core each, no more than the cameras) and one for pre- and
    post-processing. onnxruntime keeps state per calling thread: inferences always run on the lowest-numbered
    workers, one per inference slot, and the last worker runs only pre- and post-processing."""
    pool = StagePool(size=lambda: cores)
    lock = threading.Lock()
    seen: dict[str, set[str]] = {"heavy": set(), "light": set()}
    running = {"heavy": 0, "most": 0}
    left = {f"{p}-{kind}": 40 for p in range(cameras) for kind in ("pre", "infer", "post")}
    done = threading.Event()

    def stage(name: str, heavy: bool) -> Stage:
        def step() -> None:
            with lock:
                seen["heavy" if heavy else "light"].add(threading.current_thread().name)
                running["heavy"] += heavy
                running["most"] = max(running["most"], running["heavy"])
            time.sleep(0.002)
            with lock:
                running["heavy"] -= heavy
                left[name] -= 1
                if not any(left.values()):
                    done.set()

        return Stage(name, lambda: left[name] > 0, step, heavy=heavy)

    stages = [stage(f"{p}-{kind}", kind == "infer") for p in range(cameras) for kind in ("pre", "infer", "post")]
    pool.attach(stages)
    assert pool.workers == workers
    try:
        assert done.wait(30), left
    finally:
        pool.detach(stages)
    inferring = {f"stages-{n}" for n in range(1, workers)}
    assert seen["heavy"] == inferring, seen
    assert f"stages-{workers}" in seen["light"], seen  # the last worker ran pre and post
    assert running["most"] == workers - 1, running  # every inference slot was used, and no more
    deadline = time.monotonic() + 5
    while pool.workers and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.workers == 0


@pytest.mark.parametrize(("lanes", "workers"), [(1, 2), (2, 3), (None, 4)])
def test_the_pool_has_no_more_inference_workers_than_the_sessions_take_runs_at_once(
    lanes: int | None, workers: int
) -> None:
    """A session of one lane (OpenVINO, a GPU) takes one run at a time: a second inference worker would wait."""
    pool = StagePool(size=lambda: 4, lanes=lambda: lanes)
    stages = [Stage(f"cam{i}-infer", lambda: False, lambda: None, heavy=True) for i in range(3)]
    pool.attach(stages)
    try:
        assert pool.workers == workers
    finally:
        pool.detach(stages)


def test_a_profiles_cameras_share_one_session_and_the_thread_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through `open_pipelines`, as the daemon opens them: a profile's cameras on one model share one session
    whose CPU runs each have their share of the budget, so the runs the stage pool makes at once use it
    once; a sensor pipeline on the same model shares that session too; one camera keeps the whole budget.
    A pipeline started alone later (a reload, the `pipeline` command) gets the share of the whole profile.
    A budget of 4 whatever this machine has, so that the shares differ (a 1-core budget has one share)."""
    monkeypatch.setattr(providers, "core_budget", lambda probe=None: 4)
    save(busy_pool_model(), tmp_path / "m.onnx")
    (tmp_path / "s.csv").write_text("a,b,c\n1,2,3\n")

    def pipelines(cameras: int, only: set[str] | None = None) -> list[Pipeline]:
        entries = [
            {"name": f"cam{i}", "model": "m.onnx", "source": {"type": "camera", "device": "rtsp://127.0.0.1:9/x"}}
            for i in range(cameras)
        ]
        sensor = {"name": "sensor", "model": "m.onnx", "source": {"type": "csv", "path": "s.csv"}}
        doc = {"device": {"id": "d", "state_dir": str(tmp_path / "state")}, "pipelines": [*entries, sensor]}
        (tmp_path / "p.yaml").write_text(json.dumps(doc))
        opened = list(open_pipelines(load_profile(tmp_path / "p.yaml"), Recorder(), only=only))
        names = [str(e["name"]) for e in entries] + ["sensor"]
        assert [p.name for p in opened] == [n for n in names if only is None or n in only]
        return opened

    for cameras, only, threads_each in ((1, None, 4), (2, None, 2), (4, None, 1), (4, {"cam3"}, 1)):
        opened = pipelines(cameras, only)
        try:
            sessions = {id(p.model.session) for p in opened}
            threads = opened[0].model.session.get_session_options().intra_op_num_threads
            assert len(sessions) == 1, "one session for the model"
            assert threads == threads_each, cameras
        finally:
            for p in opened:
                p.model.close()
            POOL.plan(1)  # the process's pool: the tests after this one load as one pipeline would


OPENVINO_CAMERAS = """
import json, logging, os, sys, threading, time
sys.path.insert(0, os.getcwd())
from pathlib import Path
from agent.cloud.samples import sample_model
from agent.config.profile import load_profile
from agent.inference.loader import open_pipelines
from agent.inference.sessions import POOL
from agent.inference.stagepool import STAGES
tmp = Path(sys.argv[1])

class Recorder:  # the OpenVINO venv has the device's packages only (no onnx for tests.test_pipeline)
    def __init__(self):
        self.events = []
    def result(self, pipeline, payload, qos):
        pass
    def event(self, event):
        self.events.append(event)

model = str(sample_model("ppocr-det", quiet=True))
pre = {"resize": [640, 480], "scale": 1 / 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
import cv2, numpy as np
video = cv2.VideoWriter(str(tmp / "cam.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 30, (640, 480))
for i in range(60):
    video.write(np.random.default_rng(i).integers(0, 256, (480, 640, 3), dtype=np.uint8))
video.release()
source = {"type": "camera", "device": str(tmp / "cam.mp4")}  # a live source: its stages run on the pool
doc = {"device": {"id": "d", "state_dir": str(tmp / "state")}, "runtime": {"providers": ["openvino", "cpu"]},
       "pipelines": [{"name": f"cam{i}", "model": model, "source": source, "preprocess": pre,
                      "postprocess": {"type": "text-detection"}} for i in range(4)]}
(tmp / "p.yaml").write_text(json.dumps(doc))
sink = Recorder()
renewed = []  # OpenVINO opened afresh after a batch it will not run (agent.inference.interim)
class Renewals(logging.Handler):
    def emit(self, record):
        if "opens afresh" in record.getMessage():
            renewed.append(record.getMessage())
logging.getLogger("agent.inference.interim").addHandler(Renewals())
logging.getLogger("agent.inference.interim").setLevel(logging.INFO)
pipes = list(open_pipelines(load_profile(tmp / "p.yaml"), sink, emit=sink.event))
for p in pipes:
    p.start()
deadline = time.monotonic() + 120  # a loaded machine decodes, compiles and runs slowly: wait for results
# The first frames run on the CPU provider while OpenVINO compiles (runtime.start_on_cpu): wait for the switch.
while (min(p.stats()["results"] for p in pipes) < 3 or "provider.switched" not in [e.type for e in sink.events]
       or STAGES.workers > 2) and time.monotonic() < deadline:
    time.sleep(0.1)
(shared,) = POOL.sessions()
while shared.batch_pays is None and time.monotonic() < deadline:  # judged as the switch comes
    time.sleep(0.1)
seen = {
    "provider": pipes[0].model.provider, "sessions": len({id(p.model.session) for p in pipes}), "lanes": shared.lanes,
    "workers": STAGES.workers, "intra_op": shared.session.get_session_options().intra_op_num_threads,
    "frames": all(p.model.takes_frames for p in pipes), "input": list(pipes[0].model.stream_spec.shape),
    "results": min(p.stats()["results"] for p in pipes),
    "errors": [e.type for e in sink.events if e.type in ("inference.error", "frame.rejected")],
    "switched": [e.fields["previous"] for e in sink.events if e.type == "provider.switched"],
    "batching": shared.figures().batching, "renewed": len(renewed),
}
for p in pipes:
    p.stop()
print(json.dumps(seen))
"""


@pytest.mark.slow
def test_four_cameras_on_openvino_share_one_session_run_one_at_a_time_and_take_frames(tmp_path: Path) -> None:
    """OpenVINO spreads one run over a pool of its own: its session has one lane, the stage pool one inference
    worker (a second would only wait), and onnxruntime's own pool one thread. Four cameras may batch, so
    the batch stays free; the frames' size is fixed and the frames go in as they come."""
    from tests.test_providers import in_openvino_venv

    out = in_openvino_venv("-c", OPENVINO_CAMERAS, str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["provider"] == "OpenVINOExecutionProvider" and seen["sessions"] == 1
    assert (seen["lanes"], seen["workers"], seen["intra_op"]) == (1, 2, 1), seen
    assert seen["frames"] and seen["input"] == [None, 480, 640, 3], seen
    assert seen["results"] > 0 and seen["errors"] == [], seen
    assert seen["switched"] == ["CPUExecutionProvider"], seen  # one session, one switch, for all four
    # A batch measured on OpenVINO leaves its buffers in the session: opened afresh where it does not pay.
    assert seen["batching"].startswith("auto: ") and "(measured)" in seen["batching"], seen
    assert seen["renewed"] == ("does not pay" in seen["batching"]), seen
