"""Pipelines on tiny models: backpressure, newest-frame-wins, hot swap, clean stop, bad input, stats."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from agent.config.base import adapter
from agent.config.profile import PipelineConfig, RuntimeConfig
from agent.inference.loader import open_pipeline
from agent.inference.pipeline import Pipeline
from agent.inference.runtime import ModelError, load_model
from agent.inference.sources.base import BaseSource, Frame
from agent.transport.events import Event
from agent.util.timefmt import utc_iso
from tests.helpers import media
from tests.helpers.models import linear_model, save

pytestmark = pytest.mark.arm64
RUNTIME = RuntimeConfig(threads=1)


class Recorder:
    """A Sink that keeps what it is given; `delay` makes it a slow consumer."""

    def __init__(self, delay: float = 0.0, fail_first: int = 0) -> None:
        self.results: list[dict[str, Any]] = []
        self.events: list[Event] = []
        self.delay = delay
        self.fail_first = fail_first
        self.lock = threading.Lock()

    def result(self, pipeline: str, payload: dict[str, Any], qos: int) -> None:
        if self.delay:
            time.sleep(self.delay)
        with self.lock:
            if self.fail_first:
                self.fail_first -= 1
                raise OSError("disk full")
            self.results.append(payload)

    def event(self, event: Event) -> None:
        self.events.append(event)

    def types(self) -> list[str]:
        return [e.type for e in self.events]


def pool_model(scale: float = 1.0) -> onnx.ModelProto:
    """x [N,3,H,W] -> y [N,3]: channel means times `scale` (two versions differ by scale)."""
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Mul", ["f", "k"], ["y"]),
    ]
    k = helper.make_tensor("k", TensorProto.FLOAT, [], [scale])
    graph = helper.make_graph(
        nodes,
        "pool",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 24, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        initializer=[k],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def config(**fields: Any) -> PipelineConfig:
    return adapter(PipelineConfig).validate_python({"name": "p", **fields})


def build(tmp_path: Path, cfg: PipelineConfig, sink: Recorder, **kwargs: Any) -> Pipeline:
    return open_pipeline(cfg, sink, device="dev-1", runtime=RUNTIME, state_dir=tmp_path, emit=sink.event, **kwargs)


def write_csv(path: Path, rows: int, cols: int = 3) -> Path:
    path.write_text(
        ",".join(f"c{i}" for i in range(cols))
        + "\n"
        + "".join(",".join(str(r + i) for i in range(cols)) + "\n" for r in range(rows))
    )
    return path


def test_sensor_results_carry_the_contract_fields_and_nothing_is_dropped_behind_a_slow_sink(tmp_path: Path) -> None:
    model = save(linear_model(np.ones((3, 1))), tmp_path / "sum.onnx")
    csv = write_csv(tmp_path / "s.csv", 200)
    sink = Recorder(delay=0.001)
    pipe = build(tmp_path, config(model=str(model), source={"type": "csv", "path": str(csv)}), sink).start()
    assert pipe.wait(30)
    pipe.stop()
    assert [r["source_seq"] for r in sink.results] == list(range(200))
    first = sink.results[0]
    assert set(first) == {
        "device",
        "pipeline",
        "ts",
        "source_seq",
        "model",
        "model_version",
        "provider",
        "latency_ms",
        "output",
    }
    assert (first["device"], first["pipeline"], first["model"], first["provider"]) == (
        "dev-1",
        "p",
        "sum",
        "CPUExecutionProvider",
    )
    assert first["output"] == {"y": [[3.0]]} and sink.results[-1]["output"] == {"y": [[3 * 199 + 3.0]]}
    assert set(first["latency_ms"]) == {"pre", "infer", "post"} and first["ts"].endswith("Z") and len(first["ts"]) == 24
    stats = pipe.stats()
    assert stats["frames"] == stats["inferences"] == stats["results"] == 200 and stats["dropped"] == 0
    assert stats["state"] == "finished" and stats["latency_ms"]["infer"]["p50"] is not None
    assert sink.types() == ["pipeline.started", "pipeline.finished"]


def test_iso_ms_is_utc_with_milliseconds() -> None:
    assert utc_iso(1795606262.4174) == "2026-11-25T11:31:02.417Z"
    assert utc_iso(1795606262.9996) == "2026-11-25T11:31:03.000Z"


def test_sensor_windows_and_an_unparsable_line_become_an_event_while_the_stream_goes_on(tmp_path: Path) -> None:
    model = save(linear_model(np.ones((6, 1))), tmp_path / "win.onnx")
    csv = tmp_path / "s.csv"
    csv.write_text("a,b\n1,1\n2,2\nbroken,3\n3,3\n4,4\n")
    sink = Recorder()
    cfg = config(
        model=str(model), source={"type": "csv", "path": str(csv)}, preprocess={"window": 3, "hop": 1, "layout": "nc"}
    )
    pipe = build(tmp_path, cfg, sink).start()
    assert pipe.wait(10)
    assert [r["output"]["y"] for r in sink.results] == [[[12.0]], [[18.0]]]
    assert [e.fields["reason"] for e in sink.events if e.type == "frame.rejected"] == [
        "s.csv line 4: 'broken' in column 'a' is not a number"
    ]


def test_hot_swap_during_a_30_fps_stream_loses_no_frame(tmp_path: Path) -> None:
    v1 = save(pool_model(1.0), tmp_path / "v1.onnx")
    v2 = save(pool_model(2.0), tmp_path / "v2.onnx")
    sink = Recorder()
    cfg = config(
        model=str(v1),
        source={"type": "synthetic", "width": 320, "height": 240, "fps": 30, "frames": 45},
        preprocess={"resize": [32, 24], "scale": 0.00392156862745098},
    )
    pipe = build(tmp_path, cfg, sink, model_version="1.0.0").start()
    time.sleep(0.4)
    swapped = pipe.swap(v2, version="2.0.0")
    time.sleep(0.4)
    pipe.swap(load_model(v1, RUNTIME, tmp_path, name="v1", version="3.0.0"))
    assert pipe.wait(20)
    pipe.stop()
    assert swapped.version == "2.0.0"
    assert [r["source_seq"] for r in sink.results] == list(range(45))
    versions = [r["model_version"] for r in sink.results]
    changes = [versions[0]] + [b for a, b in itertools.pairwise(versions) if a != b]
    assert changes == ["1.0.0", "2.0.0", "3.0.0"]
    for r in sink.results:  # each result was computed by the version it names
        ratio = r["output"]["y"][0][0] / next(
            x["output"]["y"][0][0] for x in sink.results if x["model_version"] != "2.0.0"
        )
        assert r["model_version"] == "2.0.0" or ratio == pytest.approx(1.0, abs=0.2)
    assert pipe.stats()["swaps"] == 2
    assert [e.fields["version"] for e in sink.events if e.type == "model.swapped"] == ["2.0.0", "3.0.0"]


def test_a_swap_to_a_model_that_cannot_serve_is_refused_and_the_old_one_keeps_serving(tmp_path: Path) -> None:
    v1 = save(pool_model(), tmp_path / "v1.onnx")
    wrong = save(linear_model(np.ones((3, 1))), tmp_path / "wrong.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage")
    sink = Recorder()
    cfg = config(
        model=str(v1),
        source={"type": "synthetic", "width": 64, "height": 48, "fps": 50, "frames": 30},
        preprocess={"resize": [32, 24]},
    )
    pipe = build(tmp_path, cfg, sink, model_version="1").start()
    time.sleep(0.2)
    with pytest.raises(ModelError, match="warm-up"):
        pipe.swap(wrong, version="2")
    with pytest.raises(ModelError, match="cannot load"):
        pipe.swap(corrupt, version="3")
    assert pipe.wait(10)
    assert {r["model_version"] for r in sink.results} == {"1"} and len(sink.results) == 30


def test_stop_finishes_the_frame_in_hand_and_publishes_everything_read(tmp_path: Path) -> None:
    model = save(pool_model(), tmp_path / "m.onnx")
    sink = Recorder(delay=0.02)
    cfg = config(
        model=str(model),
        source={"type": "synthetic", "width": 64, "height": 48, "fps": 200},
        preprocess={"resize": [32, 24]},
    )
    pipe = build(tmp_path, cfg, sink).start()
    time.sleep(0.3)
    pipe.stop()
    stats = pipe.stats()
    assert stats["state"] == "stopped" and not any(t.is_alive() for t in pipe._threads)
    assert stats["results"] == stats["frames"] > 0
    assert [r["source_seq"] for r in sink.results] == list(range(stats["frames"]))


class FastCamera(BaseSource):
    """A live source producing frames as fast as it can."""

    live = True

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        img = np.zeros((24, 32, 3), np.uint8)
        while not stop.is_set() and self.seq < 3000:
            yield Frame(img, time.time(), self.next_seq())
            time.sleep(0.0005)


def test_a_live_source_keeps_the_newest_frame_and_counts_the_dropped_ones(tmp_path: Path) -> None:
    model = load_model(save(pool_model(), tmp_path / "m.onnx"), RUNTIME, tmp_path)
    sink = Recorder(delay=0.01)
    cfg = config(model="m.onnx", source={"type": "synthetic"})
    pipe = Pipeline(cfg, model, sink, device="d", emit=sink.event, source=FastCamera(cfg.source)).start()
    assert pipe.wait(30)
    stats = pipe.stats()
    seqs = [r["source_seq"] for r in sink.results]
    assert stats["dropped"] > 100 and seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    # every frame was either published or counted as dropped (none in flight once finished)
    assert stats["results"] + stats["dropped"] == stats["frames"] == 3000


def test_a_flood_of_rejected_frames_is_one_event_with_a_count_not_one_per_frame(tmp_path: Path) -> None:
    model = load_model(save(linear_model(np.ones((3, 1))), tmp_path / "m.onnx"), RUNTIME, tmp_path)
    sink = Recorder()
    cfg = config(model="m.onnx", source={"type": "synthetic"})
    pipe = Pipeline(cfg, model, sink, device="d", emit=sink.event, source=FastCamera(cfg.source)).start()
    time.sleep(0.5)
    pipe.stop()
    assert pipe.stats()["rejected"] > 10 and pipe.stats()["results"] == 0
    assert sink.types().count("frame.rejected") == 1


def test_a_rate_cap_on_a_live_source_skips_and_counts(tmp_path: Path) -> None:
    model = load_model(save(pool_model(), tmp_path / "m.onnx"), RUNTIME, tmp_path)
    sink = Recorder()
    cfg = config(model="m.onnx", source={"type": "synthetic"}, rate=20)
    pipe = Pipeline(cfg, model, sink, device="d", emit=sink.event, source=FastCamera(cfg.source)).start()
    time.sleep(1.0)
    pipe.stop()
    stats = pipe.stats()
    assert 10 <= stats["results"] <= 30 and stats["skipped"] > 100


def test_frames_of_the_wrong_size_are_rejected_with_an_event_and_the_rest_served(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, (w, h) in {"a.png": (32, 24), "b.png": (64, 48), "c.png": (32, 24)}.items():
        cv2.imwrite(str(folder / name), media.background(w, h))
    (folder / "d.txt").write_text("notes")
    model = save(pool_model(), tmp_path / "m.onnx")
    sink = Recorder()
    pipe = build(tmp_path, config(model=str(model), source={"type": "images", "path": str(folder)}), sink).start()
    assert pipe.wait(10)
    assert [r["source_seq"] for r in sink.results] == [0, 2]
    rejected = [e.fields["reason"] for e in sink.events if e.type == "frame.rejected"]
    assert sorted(rejected) == [
        "d.txt is not an image OpenCV can read",
        "the input tensor would be [1, 3, 48, 64] but the model wants [?, 3, 24, 32] (set preprocess.resize to the model's size)",
    ]
    assert pipe.stats()["rejected"] == 2


def test_a_corrupt_video_is_reported_and_retried_while_another_pipeline_keeps_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agent.inference.pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "SOURCE_BACKOFF_CAP", 0.2)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 500)
    model = save(pool_model(), tmp_path / "m.onnx")
    sink = Recorder()
    broken = build(
        tmp_path,
        config(
            name="cam-a", model=str(model), source={"type": "video", "path": str(bad)}, preprocess={"resize": [32, 24]}
        ),
        sink,
    ).start()
    fine = build(
        tmp_path,
        config(
            name="cam-b",
            model=str(model),
            source={"type": "synthetic", "fps": 100, "width": 64, "height": 48},
            preprocess={"resize": [32, 24]},
        ),
        sink,
    ).start()
    time.sleep(1.0)
    broken.stop()
    fine.stop()
    errors = [e for e in sink.events if e.type == "source.error"]
    assert (
        errors
        and errors[0].fields["pipeline"] == "cam-a"
        and "bad.mp4 is not a video OpenCV can read" in errors[0].fields["reason"]
    )
    assert broken.stats()["source_errors"] >= 2  # retried
    assert {r["pipeline"] for r in sink.results} == {"cam-b"} and len(sink.results) > 20


def test_a_failing_sink_is_an_event_and_the_pipeline_goes_on(tmp_path: Path) -> None:
    model = save(linear_model(np.ones((3, 1))), tmp_path / "sum.onnx")
    sink = Recorder(fail_first=2)
    pipe = build(
        tmp_path, config(model=str(model), source={"type": "csv", "path": str(write_csv(tmp_path / "s.csv", 10))}), sink
    ).start()
    assert pipe.wait(10)
    assert [r["source_seq"] for r in sink.results] == list(range(2, 10))
    sink_errors = [e for e in sink.events if e.type == "sink.error"]
    assert sink_errors[0].fields["reason"] == "OSError: disk full"
    assert pipe.stats()["sink_errors"] == 2


def test_several_pipelines_run_in_one_process(tmp_path: Path) -> None:
    model = save(linear_model(np.ones((3, 1))), tmp_path / "sum.onnx")
    sink = Recorder()
    pipes = [
        build(
            tmp_path,
            config(
                name=f"p{i}",
                model=str(model),
                source={"type": "csv", "path": str(write_csv(tmp_path / f"{i}.csv", 50))},
            ),
            sink,
        ).start()
        for i in range(3)
    ]
    assert all(p.wait(20) for p in pipes)
    for i in range(3):
        assert [r["source_seq"] for r in sink.results if r["pipeline"] == f"p{i}"] == list(range(50))


def test_a_stateful_model_swapped_before_any_frame_is_warmed_on_the_source_shape(tmp_path: Path) -> None:
    # y = x * gain + s with state carried: the swap warms on [1, 2] (from the source config), not a guess.
    from tests.test_runtime import accumulator_model

    path = save(accumulator_model(), tmp_path / "acc.onnx")
    csv = write_csv(tmp_path / "s.csv", 3, cols=2)
    sink = Recorder()
    cfg = config(
        model=str(path),
        source={"type": "csv", "path": str(csv), "columns": ["c0", "c1"]},
        inputs={"gain": 1},
        state={"s": "sN"},
    )
    pipe = build(tmp_path, cfg, sink, model_version="1")
    pipe.swap(path, version="2")
    pipe.start()
    assert pipe.wait(10)
    assert [r["output"]["y"] for r in sink.results] == [[[0.0, 1.0]], [[1.0, 3.0]], [[3.0, 6.0]]]  # state accumulates
    assert {r["model_version"] for r in sink.results} == {"2"}


def test_latest_frame_and_busy_for_serve_the_status_page_and_the_watchdog(tmp_path: Path) -> None:
    model = save(pool_model(), tmp_path / "m.onnx")
    sink = Recorder()
    cfg = config(
        model=str(model),
        source={"type": "synthetic", "width": 64, "height": 48, "fps": 100, "frames": 3},
        preprocess={"resize": [32, 24]},
    )
    pipe = build(tmp_path, cfg, sink)
    assert pipe.latest_frame() is None and pipe.busy_for() is None
    pipe.start()
    assert pipe.wait(10)
    image, boxes = pipe.latest_frame()
    assert image.shape == (48, 64, 3) and boxes == []  # raw output: no boxes
    assert pipe.busy_for() is None and pipe.stats()["inference_running_s"] == 0.0
