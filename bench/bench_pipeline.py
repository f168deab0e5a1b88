"""Pipeline figures (issue 5), measured side by side in one run on this machine:

1. Camera path on the PP-OCR text detector (640x480): agent pipeline throughput / a bare onnxruntime
   loop on the same model, thread settings and frames. Goal >= 1.0. Two bare loops are timed: a script
   that preprocesses each frame then runs it (what a user writes), and session.run alone on tensors
   made beforehand (the ceiling: no capture, no preprocessing, no publishing).
2. Sensor path on a tiny model (8 -> 1 linear): results per second end to end, from a csv file to JSON
   results (goal >= 5,000/s), and the ratio against a bare loop of session.run per sample.
3. Latency the agent adds over a bare session.run (capture to the sink, less inference), p50 and p95,
   with the pipeline not saturated. Goal p50 <= 2 ms.

Each figure is the median of three rounds that alternate the loops compared.

Usage: python bench/bench_pipeline.py [--frames 20] [--samples 20000] [--threads N]
Prints a table and writes bench/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.cloud.samples import sample_model
from agent.config.base import adapter
from agent.config.profile import PipelineConfig, RuntimeConfig
from agent.device.providers import thread_count
from agent.inference.pipeline import Pipeline
from agent.inference.processing.pre import Preprocessor
from agent.inference.runtime import load_model
from agent.inference.sources.base import BaseSource, Frame, Pacer
from agent.transport.events import Event
from agent.transport.sinks.stdout import StdoutSink

RESULTS = Path(__file__).resolve().parent / "results"
ROUNDS = 3
OCR_PRE = {
    "resize": [640, 480],
    "color": "rgb",
    "scale": 0.00392156862745098,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "layout": "nchw",
    "dtype": "float32",
}


class Replay(BaseSource):
    """Frames prepared beforehand, handed over as fast as the pipeline takes them (or at `rate`);
    records when each was handed over, for end-to-end latency."""

    def __init__(self, config: Any, items: list[Any], rate: float | None = None, window: bool = False) -> None:
        super().__init__(config)
        self.items = items
        self.rate = rate
        self.window = window
        self.handed: dict[int, float] = {}

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        from agent.inference.sources.base import Window

        pacer = Pacer(self.rate)
        kind = Window if self.window else Frame
        for data in self.items:
            if not pacer.wait(stop):
                return
            seq = self.next_seq()
            self.handed[seq] = time.perf_counter()
            yield kind(data, time.time(), seq)


class LatencySink(StdoutSink):
    """The stdout sink (seq file, JSON encoding) writing to memory, noting when each result arrives."""

    def __init__(self, state_dir: Path, source: Replay | None = None) -> None:
        super().__init__(state_dir, stream=io.StringIO())
        self.source = source
        self.added: list[float] = []
        self.overhead: list[float] = []  # the same, less preprocessing and post-processing too
        self.count = 0

    def result(self, pipeline: str, payload: dict[str, Any], qos: int) -> None:
        super().result(pipeline, payload, qos)
        self.count += 1
        if self.count % 1000 == 0:
            self.stream.seek(0)
            self.stream.truncate()
        if self.source is not None:
            elapsed = (time.perf_counter() - self.source.handed[payload["source_seq"]]) * 1000
            stages = payload["latency_ms"]
            self.added.append(elapsed - stages["infer"])
            self.overhead.append(elapsed - stages["infer"] - stages["pre"] - stages["post"])

    def event(self, event: Event) -> None:
        pass


def synthetic_frames(count: int) -> list[Any]:
    """640x480 BGR frames of the synthetic test pattern (text on a moving background)."""
    from agent.inference.sources.synthetic import Config, Source

    source = Source(Config(type="synthetic", width=640, height=480, fps=10000, frames=count))
    return [f.data for f in source.frames(threading.Event())]


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 3) if values else float("nan")


def run_pipeline(
    cfg: PipelineConfig, model: Any, source: Replay, sink: LatencySink, state_dir: Path
) -> tuple[float, Pipeline]:
    pipe = Pipeline(cfg, model, sink, device="bench", state_dir=state_dir, source=source, emit=lambda e: None)
    started = time.perf_counter()
    pipe.start()
    pipe.wait()
    elapsed = time.perf_counter() - started
    pipe.stop()
    return elapsed, pipe


def camera_path(frames: int, runtime: RuntimeConfig, tmp: Path) -> dict[str, Any]:
    path = sample_model("ppocr-det")
    cfg = adapter(PipelineConfig).validate_python(
        {
            "name": "cam",
            "model": str(path),
            "source": {"type": "synthetic"},
            "preprocess": OCR_PRE,
            "postprocess": {"type": "text-detection"},
        }
    )
    images = synthetic_frames(frames)
    model = load_model(path, runtime, tmp, example=np.zeros((1, 3, 480, 640), np.float32))
    session = model.session
    pre = Preprocessor(cfg.preprocess, model.stream_spec.shape, model.stream_spec.type)
    from agent.inference.processing.post import make_postprocessor
    from agent.inference.processing.post.base import PostContext

    post = make_postprocessor(cfg.postprocess, model.output_names)
    tensors = [pre(img)[0] for img in images]
    runs: dict[str, list[float]] = {"bare_run_fps": [], "bare_script_fps": [], "agent_fps": []}
    for attempt in range(ROUNDS):  # rounds alternate the three loops; medians reported: a shared CPU is noisy
        t = time.perf_counter()
        for x in tensors:
            session.run(None, {"x": x})
        bare_run = frames / (time.perf_counter() - t)
        t = time.perf_counter()
        for img in images:
            x, geo = pre(img)
            out = session.run(None, {"x": x})
            json.dumps(post({model.output_names[0]: out[0]}, PostContext(geo)))
        bare_script = frames / (time.perf_counter() - t)
        elapsed, pipe = run_pipeline(cfg, model, Replay(cfg.source, images), LatencySink(tmp / f"cam{attempt}"), tmp)
        agent = frames / elapsed
        for key, value in (("bare_run_fps", bare_run), ("bare_script_fps", bare_script), ("agent_fps", agent)):
            runs[key].append(value)
        stages = pipe.stats()["latency_ms"]
    rows = {k: float(np.median(v)) for k, v in runs.items()}
    return {
        "model": "PP-OCRv4 det",
        "frame": "640x480",
        "frames": frames,
        "threads": thread_count(runtime),
        **{k: round(v, 2) for k, v in rows.items()},
        "ratio_vs_bare_script": round(rows["agent_fps"] / rows["bare_script_fps"], 3),
        "ratio_vs_bare_run": round(rows["agent_fps"] / rows["bare_run_fps"], 3),
        "rounds": {k: [round(x, 2) for x in v] for k, v in runs.items()},
        "stage_ms": stages,
        "goal": "agent / bare >= 1.0",
    }


def sensor_path(samples: int, runtime: RuntimeConfig, tmp: Path) -> dict[str, Any]:
    from tests.helpers.models import linear_model, save

    model_path = save(linear_model(np.random.default_rng(0).normal(size=(8, 1))), tmp / "tiny.onnx")
    csv = tmp / "sensor.csv"
    rng = np.random.default_rng(1)
    with csv.open("w") as f:
        f.write(",".join(f"c{i}" for i in range(8)) + "\n")
        for row in rng.normal(size=(samples, 8)).round(4):
            f.write(",".join(map(str, row)) + "\n")
    cfg = adapter(PipelineConfig).validate_python(
        {"name": "sensor", "model": str(model_path), "source": {"type": "csv", "path": str(csv)}}
    )
    model = load_model(model_path, runtime, tmp)
    session = model.session
    xs = [row[None].astype(np.float32) for row in rng.normal(size=(samples, 8))]
    runs: dict[str, list[float]] = {"bare_run_per_s": [], "agent_results_per_s": []}
    for attempt in range(ROUNDS):
        t = time.perf_counter()
        for x in xs:
            session.run(None, {"x": x})
        bare = samples / (time.perf_counter() - t)
        sink = LatencySink(tmp / f"sensor{attempt}")
        pipe = Pipeline(cfg, model, sink, device="bench", state_dir=tmp, emit=lambda e: None)
        t = time.perf_counter()
        pipe.start()
        pipe.wait()
        agent = samples / (time.perf_counter() - t)
        pipe.stop()
        assert sink.count == samples, (sink.count, samples)
        runs["bare_run_per_s"].append(bare)
        runs["agent_results_per_s"].append(agent)
    best = {k: float(np.median(v)) for k, v in runs.items()}
    return {
        "model": "linear 8->1",
        "samples": samples,
        "source": "csv file -> JSON results (stdout sink)",
        **{k: round(v) for k, v in best.items()},
        "ratio_vs_bare_run": round(best["agent_results_per_s"] / best["bare_run_per_s"], 3),
        "goal": ">= 5000 results/s",
    }


def added_latency(runtime: RuntimeConfig, tmp: Path, ocr_frames: int) -> list[dict[str, Any]]:
    from tests.helpers.models import linear_model, save

    rows = []
    model_path = save(linear_model(np.ones((8, 1))), tmp / "lat.onnx")
    cfg = adapter(PipelineConfig).validate_python(
        {"name": "lat", "model": str(model_path), "source": {"type": "csv", "path": "x.csv"}}
    )
    model = load_model(model_path, runtime, tmp)
    source = Replay(cfg.source, [np.ones(8) for _ in range(1000)], rate=500, window=True)
    sink = LatencySink(tmp / "lat", source)
    run_pipeline(cfg, model, source, sink, tmp)
    rows.append(
        {
            "path": "sensor, tiny model, 500/s",
            "n": len(sink.added),
            "p50_ms": pct(sink.added, 50),
            "p95_ms": pct(sink.added, 95),
            "overhead_p50_ms": pct(sink.overhead, 50),
            "overhead_p95_ms": pct(sink.overhead, 95),
        }
    )

    path = sample_model("ppocr-det")
    cfg = adapter(PipelineConfig).validate_python(
        {
            "name": "latcam",
            "model": str(path),
            "source": {"type": "synthetic"},
            "preprocess": OCR_PRE,
            "postprocess": {"type": "text-detection"},
        }
    )
    model = load_model(path, runtime, tmp, example=np.zeros((1, 3, 480, 640), np.float32))
    images = synthetic_frames(ocr_frames)
    source = Replay(cfg.source, images, rate=2)
    sink = LatencySink(tmp / "latcam", source)
    run_pipeline(cfg, model, source, sink, tmp)
    rows.append(
        {
            "path": "camera 640x480, PP-OCR, 2 fps (includes preprocessing and DB post-processing)",
            "n": len(sink.added),
            "p50_ms": pct(sink.added, 50),
            "p95_ms": pct(sink.added, 95),
            "overhead_p50_ms": pct(sink.overhead, 50),
            "overhead_p95_ms": pct(sink.overhead, 95),
        }
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--threads", default="auto")
    args = parser.parse_args()
    runtime = RuntimeConfig(threads=args.threads if args.threads == "auto" else int(args.threads))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        print("camera path (PP-OCR) ...", file=sys.stderr)
        cam = camera_path(args.frames, runtime, tmp)
        print("sensor path ...", file=sys.stderr)
        sensor = sensor_path(args.samples, runtime, tmp)
        print("added latency ...", file=sys.stderr)
        latency = added_latency(runtime, tmp, max(4, args.frames // 2))

    print(f"\nCamera path, {cam['model']} {cam['frame']}, {cam['frames']} frames, {cam['threads']} intra-op threads")
    print(f"  bare session.run only     {cam['bare_run_fps']:>8.2f} frames/s")
    print(f"  bare script (pre+run+post){cam['bare_script_fps']:>8.2f} frames/s")
    print(f"  agent pipeline            {cam['agent_fps']:>8.2f} frames/s")
    print(f"  ratio agent / bare script {cam['ratio_vs_bare_script']:>8.3f}   (goal >= 1.0)")
    print(f"  ratio agent / bare run    {cam['ratio_vs_bare_run']:>8.3f}")
    print(f"\nSensor path, {sensor['model']}, {sensor['samples']} samples, {sensor['source']}")
    print(f"  bare session.run          {sensor['bare_run_per_s']:>8} /s")
    print(f"  agent end to end          {sensor['agent_results_per_s']:>8} results/s   (goal >= 5000)")
    print(f"  ratio agent / bare        {sensor['ratio_vs_bare_run']:>8.3f}")
    print(
        "\nLatency added over session.run: capture to sink less inference (and less pre/post: the agent's own overhead)"
    )
    for row in latency:
        print(
            f"  {row['path']:<80} p50 {row['p50_ms']:>7.3f} ms  p95 {row['p95_ms']:>7.3f} ms  "
            f"| overhead p50 {row['overhead_p50_ms']:>6.3f} ms  p95 {row['overhead_p95_ms']:>6.3f} ms  (n={row['n']})  (goal p50 <= 2 ms)"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "pipeline.json"
    out.write_text(
        json.dumps(
            {
                "machine": {
                    "platform": platform.platform(),
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "onnxruntime": __import__("onnxruntime").__version__,
                },
                "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "camera": cam,
                "sensor": sensor,
                "added_latency": latency,
            },
            indent=2,
        )
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
