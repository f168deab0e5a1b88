"""Runtime figures (issue 15), side by side in one run: this tree against the code before the issue.

"Before" is a tree exported from `--before-rev` (default: the commit issue 15 started from) with
`git archive`; each figure runs that tree and this one in turns, in child processes (PYTHONPATH picks
the tree; the editable install comes after it on the path), and reports medians.

1. Four live camera pipelines (60 fps each) on one model (PP-OCRv4 det, 640x480), built as the daemon
   builds them, after the process set-up `edge-agent run` does in that tree: RSS (the peak, the start
   included, and while serving, once a start on the CPU provider has switched), threads (while serving,
   and the peak of the start, which catches threads half-made or half-gone)
   and total results/s, against one pipeline. Goals (after): RSS(4) <= 1.3x RSS(1); results/s(4) >= before's
   results/s(4) (four sessions); threads(4) <= CPUs + THREAD_SLACK.
2. Cold start to the first result with the model on disk (and, after, its optimised graph cached):
   `edge-agent run` from spawn to its first result line, against a bare script from spawn to its
   output (import onnxruntime, load the model, run it once). Goal: <= 1.5x the bare script. The
   agent's timeline (`--log-level debug`) is printed.
3. Camera path: the agent pipeline (its model loaded as the daemon loads it) against a bare `session.run`
   loop on tensors made beforehand, what a user writes: a plain session on the model file with
   onnxruntime's defaults, on the provider the agent chose and on the CPU provider. Goals: >= 0.95x the
   first; >= 1.3x the second (needs the OpenVINO build where it is faster).
4. Sensor path: bench/bench_pipeline.py's sensor figures from both trees: unchanged or better.

Usage: python bench/bench_runtime.py [--rounds 3] [--frames 15] [--before-rev REV]
Prints a table and writes bench/results/runtime.json.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
BEFORE_REV = "4703e70"  # main when issue 15 started: layout done, one session per pipeline
THREAD_SLACK = 8  # "cores + a small constant": main, sink, health and the like
CAMERA_FPS = 60.0  # more than the device keeps up with: a new frame is always there


def ocr_pipeline(name: str, model: Path, source: dict[str, Any]) -> dict[str, Any]:
    """A profile's pipeline entry for the PP-OCR detector on 640x480 frames, as bench_pipeline.py runs it."""
    from bench.bench_pipeline import OCR_PRE

    return {
        "name": name,
        "model": str(model),
        "source": source,
        "preprocess": OCR_PRE,
        "postprocess": {"type": "text-detection"},
    }


BARE_SCRIPT = """
import numpy as np, onnxruntime as ort
s = ort.InferenceSession({path!r}, providers=["CPUExecutionProvider"])
out = s.run(None, {{"x": np.zeros((1, 3, 480, 640), np.float32)}})
print("done", out[0].shape, flush=True)
"""


# ---- child side: runs with PYTHONPATH set to the tree measured, so it imports agent lazily ------------


def camera_frames(count: int) -> list[Any]:
    import threading as th

    from agent.inference.sources.synthetic import Config, Source

    source = Source(Config(type="synthetic", width=640, height=480, fps=10000, frames=count))
    return [f.data for f in source.frames(th.Event())]


def validated_pipeline(doc: dict[str, Any]) -> Any:
    """A pipeline's config as the tree measured validates it: pydantic models before issue 15 made them
    dataclasses that pydantic validates from outside."""
    from agent.config.profile import PipelineConfig

    try:
        from agent.config.base import adapter
    except ImportError:  # a tree from before: the config classes are pydantic models
        return PipelineConfig.model_validate(doc)  # type: ignore[attr-defined]
    return adapter(PipelineConfig).validate_python(doc)


def worker_pipelines(count: int, seconds: float, fps: float) -> dict[str, Any]:
    """`count` live camera pipelines on one model file, each camera at `fps` (more than the device keeps
    up with, so the newest frame wins and the rest are dropped, as with real cameras), for `seconds`."""
    try:  # what `edge-agent` does first, before numpy, OpenCV and onnxruntime load, in a tree that has it
        from agent.util.libraries import quiet_libraries

        quiet_libraries()
    except ImportError:
        pass
    import numpy as np
    import psutil

    from agent.cloud.samples import sample_model
    from agent.config.profile import RuntimeConfig
    from agent.inference.pipeline import Pipeline
    from agent.inference.runtime import load_model
    from agent.inference.sources.base import BaseSource, Frame, Pacer
    from agent.transport.sinks.stdout import StdoutSink

    class Camera(BaseSource):  # type: ignore[type-arg]  # the child runs either tree; no shared generic here
        live = True

        def __init__(self, config: Any, items: list[Any]) -> None:
            super().__init__(config)
            self.items = items

        def frames(self, stop: threading.Event) -> Iterator[Frame]:
            pacer = Pacer(fps)
            while pacer.wait(stop):
                yield Frame(self.items[self.seq % len(self.items)], time.time(), self.next_seq())

    class MemorySink(StdoutSink):
        def __init__(self, state_dir: Path) -> None:
            super().__init__(state_dir, stream=io.StringIO())

        def result(self, pipeline: str, payload: dict[str, Any], qos: int) -> None:
            super().result(pipeline, payload, qos)
            self.stream.seek(0)
            self.stream.truncate()

        def event(self, event: Any) -> None:
            pass

    try:  # what `edge-agent run` does to the process first, in a tree that has it
        from agent.util.malloc import return_large_blocks

        return_large_blocks()
    except ImportError:
        pass
    try:  # each camera's share of the threads, as `edge-agent run` gives it, in a tree that has it
        from agent.inference.sessions import POOL

        POOL.plan(count)
    except (ImportError, AttributeError):
        pass
    process = psutil.Process()
    path = sample_model("ppocr-det", quiet=True)
    images = camera_frames(8)
    scratch = tempfile.TemporaryDirectory(prefix="bench-runtime-")
    tmp = Path(scratch.name)
    started = time.perf_counter()
    pipes = []
    configs = [validated_pipeline(ocr_pipeline(f"cam{i}", path, {"type": "synthetic"})) for i in range(count)]
    runtime = RuntimeConfig()
    try:  # each model as the pipelines feed it, as `edge-agent run` loads them, in a tree that has it
        from agent.inference.warmup import load_pipeline_model, stream_plans

        plans = stream_plans(configs, runtime)
    except ImportError:
        plans = None
    for i, cfg in enumerate(configs):
        sink = MemorySink(tmp / f"sink{i}")
        camera = Camera(cfg.source, images)
        if plans is None:
            model = load_model(path, runtime, tmp, example=np.zeros((1, 3, 480, 640), np.float32))
            pipe = Pipeline(cfg, model, sink, device="bench", state_dir=tmp, source=camera, emit=lambda e: None)
        else:
            plan = plans[cfg.name]
            # A start's first frames on the CPU provider while OpenVINO compiles, in a tree that has it; as
            # `edge-agent run` loads them there: the first frame warms the model up.
            interim = "interim" in inspect.signature(load_pipeline_model).parameters
            start: dict[str, Any] = {"interim": True, "warmup_runs": 0} if interim else {}
            model = load_pipeline_model(
                cfg, path, runtime, tmp, name="ocr", version=None, emit=lambda e: None, plan=plan, **start
            )
            pipe = Pipeline(
                cfg, model, sink, device="bench", state_dir=tmp, source=camera, emit=lambda e: None, plan=plan
            )
        pipes.append(pipe)
    load_s = time.perf_counter() - started
    peak = {"rss": process.memory_info().rss, "threads": process.num_threads(), "python": threading.active_count()}
    serving = {"threads": 0, "python": 0, "rss": 0}  # while every pipeline serves (threads: when none comes or goes)
    done, timed = threading.Event(), threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            rss = process.memory_info().rss
            peak["rss"] = max(peak["rss"], rss)
            if timed.is_set():
                serving["rss"] = max(serving["rss"], rss)
            python, threads = threading.active_count(), process.num_threads()
            if threads > peak["threads"]:
                peak["threads"], peak["python"] = threads, python
            if timed.is_set() and python == threading.active_count() and threads > serving["threads"]:
                serving["threads"], serving["python"] = threads, python

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for p in pipes:
        p.start()
    time.sleep(1.0)  # the first second is each pipeline's first frames: not timed; nor what comes before
    settled = time.monotonic() + 30  # every pipeline's first result, and the start's switch of provider
    while time.monotonic() < settled and (
        any(p.stats()["results"] == 0 for p in pipes) or any(t.name == "session-upgrade" for t in threading.enumerate())
    ):
        time.sleep(0.05)
    timed.set()
    first = sum(p.stats()["results"] for p in pipes)
    t = time.perf_counter()
    time.sleep(seconds)
    results = sum(p.stats()["results"] for p in pipes) - first
    elapsed = time.perf_counter() - t
    for p in pipes:
        p.stop()
    done.set()
    sampler.join()
    scratch.cleanup()
    return {  # less 1: the sampler is the bench's own
        "pipelines": count,
        "results": results,
        "results_per_s": round(results / elapsed, 2),
        "rss_mb": round(peak["rss"] / 2**20, 1),
        "serving_rss_mb": round(serving["rss"] / 2**20, 1),
        "threads": serving["threads"] - 1,
        "native_threads": serving["threads"] - serving["python"],
        "peak_threads": peak["threads"] - 1,
        "load_s": round(load_s, 3),
        "cpus": len(os.sched_getaffinity(0)),
    }


# ---- parent side ------------------------------------------------------------------------------------


def export_tree(rev: str, into: Path) -> Path:
    """The tree at `rev`, exported read-only from git (nothing in the working tree changes)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def compile_tree(tree: Path) -> None:
    """Bytecode for the tree's package, as an installed agent has it (pip compiles at install). Without it
    every start compiles the package from source: children run with PYTHONDONTWRITEBYTECODE (and some
    machines set it), so nothing they import is ever cached; that start is not one users see."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "agent")], check=True)


def child_env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}


def in_tree(tree: Path, script: Path, *args: str) -> str:
    """Run a script with `tree` first on the path; its stdout."""
    out = subprocess.run(
        [sys.executable, str(script), *args], env=child_env(tree), cwd=tree, capture_output=True, text=True, timeout=900
    )
    if out.returncode != 0:
        raise RuntimeError(f"{script.name} {args} in {tree} failed: {out.stderr[-2000:]}")
    return out.stdout


def run_worker(tree: Path, *args: str) -> dict[str, Any]:
    out = in_tree(tree, Path(__file__).resolve(), "--worker", *args)
    return dict(json.loads(out.strip().splitlines()[-1]))


def median_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(rows[0])
    for key in ("results_per_s", "rss_mb", "serving_rss_mb", "threads", "native_threads", "peak_threads", "load_s"):
        if key in out:
            out[key] = round(statistics.median(r[key] for r in rows), 3)
    out["rounds"] = rows
    return out


def four_pipelines(trees: dict[str, Path], rounds: int, seconds: float) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {f"{side} {n}": [] for side in trees for n in (1, 4)}
    for _ in range(rounds):
        for side, tree in trees.items():
            for n in (1, 4):
                runs[f"{side} {n}"].append(run_worker(tree, "pipelines", str(n), str(seconds), str(CAMERA_FPS)))
    return {k: median_rows(v) for k, v in runs.items()}


def first_line_after(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    """Seconds from spawn to the first line on stdout, and the process's stderr."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    seconds = time.perf_counter() - started
    _, err = proc.communicate(timeout=120)
    if not line:
        raise RuntimeError(f"{cmd} printed nothing: {err[-2000:]}")
    return seconds, err


def cold_start(trees: dict[str, Path], rounds: int, tmp: Path) -> dict[str, Any]:
    from agent.cloud.samples import sample_model

    path = sample_model("ppocr-det", quiet=True)
    bare = tmp / "bare.py"
    bare.write_text(BARE_SCRIPT.format(path=str(path)))
    commands: dict[str, Callable[[], tuple[float, str]]] = {
        "bare script": lambda: first_line_after([sys.executable, str(bare)], dict(os.environ), tmp)
    }
    for side, tree in trees.items():
        profile = tmp / f"{side}.yaml"
        state = tmp / f"state-{side}"
        profile.write_text(
            json.dumps(
                {
                    "device": {"id": "cold", "state_dir": str(state)},
                    "pipelines": [ocr_pipeline("cam", path, {"type": "synthetic", "frames": 1})],
                }
            )
        )
        cmd = [sys.executable, "-m", "agent", "--log-level", "debug", "run", "--profile", str(profile)]
        commands[f"agent {side}"] = lambda cmd=cmd, tree=tree: first_line_after(cmd, child_env(tree), tree)
        commands[f"agent {side}"]()  # untimed: fills the optimised model cache (after) and the page cache
    times: dict[str, list[float]] = {k: [] for k in commands}
    stderr: dict[str, str] = {}
    for _ in range(rounds):
        for name, command in commands.items():
            seconds, err = command()
            times[name].append(round(seconds, 3))
            stderr[name] = err
    timeline = [line.split("agent.util.timeline: ", 1)[-1] for line in stderr.get("agent after", "").splitlines()]
    return {
        "seconds": {k: round(statistics.median(v), 3) for k, v in times.items()},
        "rounds": times,
        "timeline": [line for line in timeline if line.startswith("start")],
    }


def camera_path(rounds: int, frames: int, tmp: Path) -> dict[str, Any]:
    """In this process (this tree): the agent pipeline, its model loaded as the daemon loads it, against
    bare loops on tensors made beforehand: what a user writes on the provider the agent chose (a plain
    session with the runtime's defaults on the model file), on the plain CPU provider, and, for
    reference, on the agent's own session (its input as the agent feeds it)."""
    import onnxruntime as ort

    from agent.cloud.samples import sample_model
    from agent.config.profile import RuntimeConfig
    from agent.inference.processing.pre import Preprocessor
    from agent.inference.warmup import load_pipeline_model, preprocessor, stream_plan
    from bench.bench_pipeline import LatencySink, Replay, run_pipeline

    path = sample_model("ppocr-det", quiet=True)
    cfg = validated_pipeline(ocr_pipeline("cam", path, {"type": "synthetic"}))
    images = camera_frames(frames)
    runtime = RuntimeConfig()
    model = load_pipeline_model(
        cfg, path, runtime, tmp, name="cam", version=None, emit=lambda e: None, plan=stream_plan(cfg, runtime)
    )
    chosen = ort.InferenceSession(str(path), providers=[model.provider])
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tensors = [Preprocessor(cfg.preprocess)(img)[0] for img in images]
    own = [preprocessor(cfg, model)(img)[0] for img in images]
    loops = {
        f"bare run, plain {model.provider}": (chosen, "x", tensors),
        "bare run, plain CPU session": (plain, "x", tensors),
        "bare run, agent's own session": (model.session, model.stream_input, own),
    }
    for session, name, inputs in loops.values():
        for x in inputs[:3]:
            session.run(None, {name: x})
    runs: dict[str, list[float]] = {"agent": [], **{k: [] for k in loops}}
    for attempt in range(rounds):
        for key, (session, name, inputs) in loops.items():
            t = time.perf_counter()
            for x in inputs:
                session.run(None, {name: x})
            runs[key].append(frames / (time.perf_counter() - t))
        source = Replay(cfg.source, images)
        elapsed, _ = run_pipeline(cfg, model, source, LatencySink(tmp / f"cam{attempt}"), tmp)
        runs["agent"].append(frames / elapsed)
    fps = {k: round(statistics.median(v), 2) for k, v in runs.items()}
    return {
        "provider": model.provider,
        "input": f"{model.stream_input} {model.stream_spec.type} {list(model.stream_spec.shape or ())}",
        "fps": fps,
        "rounds": {k: [round(x, 2) for x in v] for k, v in runs.items()},
        "ratio_vs_chosen": round(fps["agent"] / fps[f"bare run, plain {model.provider}"], 3),
        "ratio_vs_plain_cpu": round(fps["agent"] / fps["bare run, plain CPU session"], 3),
    }


def sensor_path(trees: dict[str, Path], rounds: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in trees}
    for _ in range(rounds):
        for side, tree in trees.items():
            in_tree(tree, tree / "bench" / "bench_pipeline.py", "--frames", "6", "--samples", "20000")
            doc = json.loads((tree / "bench" / "results" / "pipeline.json").read_text())
            runs[side].append({"sensor": doc["sensor"], "latency": doc["added_latency"][0]})
    return {
        side: {
            "agent_results_per_s": round(statistics.median(r["sensor"]["agent_results_per_s"] for r in rows)),
            "bare_run_per_s": round(statistics.median(r["sensor"]["bare_run_per_s"] for r in rows)),
            "added_p50_ms": round(statistics.median(r["latency"]["p50_ms"] for r in rows), 3),
            "added_p95_ms": round(statistics.median(r["latency"]["p95_ms"] for r in rows), 3),
            "rounds": rows,
        }
        for side, rows in runs.items()
    }


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per camera pipelines run")
    parser.add_argument("--frames", type=int, default=30, help="frames for the camera path")
    parser.add_argument("--before-rev", default=BEFORE_REV)
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: four,cold,camera,sensor")
    parser.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        kind, *rest = args.worker
        assert kind == "pipelines", kind
        print(json.dumps(worker_pipelines(int(rest[0]), float(rest[1]), float(rest[2]))))
        return
    sys.path.insert(0, str(REPO))  # this side's bench.bench_pipeline; a worker finds its tree's on PYTHONPATH
    skip = set(filter(None, args.skip.split(",")))
    with tempfile.TemporaryDirectory(prefix="bench-runtime-") as tmp_name:
        tmp = Path(tmp_name)
        before = export_tree(args.before_rev, Path(tempfile.mkdtemp(prefix="before-", dir=tmp)))
        trees = {"before": before, "after": REPO}
        for tree in trees.values():
            compile_tree(tree)
        report: dict[str, Any] = {}
        if "four" not in skip:
            print("four camera pipelines ...", file=sys.stderr)
            report["four_pipelines"] = four_pipelines(trees, args.rounds, args.seconds)
        if "cold" not in skip:
            print("cold start ...", file=sys.stderr)
            report["cold_start"] = cold_start(trees, max(3, args.rounds), tmp)
        if "camera" not in skip:
            print("camera path ...", file=sys.stderr)
            report["camera"] = camera_path(args.rounds, args.frames, tmp)
        if "sensor" not in skip:
            print("sensor path ...", file=sys.stderr)
            report["sensor"] = sensor_path(trees, max(2, args.rounds - 1))
    print_report(report, args.before_rev)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "runtime.json"
    machine = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "onnxruntime": __import__("onnxruntime").__version__,
    }
    doc = {
        "machine": machine,
        "before_rev": args.before_rev,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **report,
    }
    out.write_text(json.dumps(doc, indent=2))
    print(f"\nwrote {out}")


def print_report(report: dict[str, Any], rev: str) -> None:
    cpus = len(os.sched_getaffinity(0))
    print(f"\nbefore = {rev} (one session per pipeline), after = this tree; medians; {cpus} usable CPUs")
    four = report.get("four_pipelines")
    if four:
        print("\nCamera pipelines on one PP-OCRv4 det model, 640x480")
        print(
            f"  {'':<10}{'pipelines':>10}{'results/s':>11}{'RSS MiB':>9}{'serving':>9}{'threads':>9}{'native':>8}"
            f"{'peak':>6}{'load s':>8}"
        )
        for key, row in four.items():
            print(
                f"  {key.split()[0]:<10}{row['pipelines']:>10}{row['results_per_s']:>11.2f}{row['rss_mb']:>9.1f}"
                f"{row['serving_rss_mb']:>9.1f}{row['threads']:>9}{row['native_threads']:>8}"
                f"{row['peak_threads']:>6}{row['load_s']:>8.2f}"
            )
        print("  (RSS: the process's peak, the start included; serving: its peak in the timed window, which")
        print("   opens once every pipeline has a result and the start's switch of provider, if any, is done)")
        print("  (threads: the process's OS threads while serving; peak: at start, with threads half-made;")
        print("   native: those not Python threads, i.e. the")
        print("   runtime's, OpenCV's and BLAS's pools; before: 4 Python stage threads per pipeline; after: a")
        print("   capture thread per camera and the shared stage workers: one per inference at once, one more)")
        one, many, old = four["after 1"], four["after 4"], four["before 4"]
        rss = many["rss_mb"] / one["rss_mb"]
        print(f"  RSS 4 / RSS 1 (after), peak       {rss:6.2f}   goal <= 1.3   {verdict(rss <= 1.3)}")
        rss = many["serving_rss_mb"] / one["serving_rss_mb"]
        print(f"  RSS 4 / RSS 1 (after), serving    {rss:6.2f}   goal <= 1.3   {verdict(rss <= 1.3)}")
        ratio = many["results_per_s"] / old["results_per_s"]
        print(f"  results/s 4 after / 4 before      {ratio:6.2f}   goal >= 1.0   {verdict(ratio >= 1.0)}")
        limit = cpus + THREAD_SLACK
        print(
            f"  threads with 4 (after)            {many['threads']:6}   goal <= {cpus} CPUs + {THREAD_SLACK} = {limit}"
            f"   {verdict(many['threads'] <= limit)}"
        )
        print(
            f"  native pool threads with 4 (after) {many['native_threads']:5}   goal <= {limit}"
            f"   {verdict(many['native_threads'] <= limit)}"
        )
    cold = report.get("cold_start")
    if cold:
        s = cold["seconds"]
        print("\nCold start to the first result (spawn to first output line; the agent's model cached)")
        for name, seconds in s.items():
            print(f"  {name:<16}{seconds:>7.3f} s   {seconds / s['bare script']:5.2f}x the bare script")
        ratio = s["agent after"] / s["bare script"]
        print(f"  goal: agent <= 1.5x the bare script: {ratio:.2f}x   {verdict(ratio <= 1.5)}")
        print("  the agent's timeline (edge-agent --log-level debug run), last round:")
        for line in cold["timeline"]:
            print(f"    {line}")
    cam = report.get("camera")
    if cam:
        print(f"\nCamera path, PP-OCRv4 det 640x480, agent on {cam['provider']}, input {cam['input']}")
        for name, fps in cam["fps"].items():
            print(f"  {name:<42}{fps:>8.2f} frames/s")
        r1, r2 = cam["ratio_vs_chosen"], cam["ratio_vs_plain_cpu"]
        print(f"  agent / bare run on its provider  {r1:6.3f}   goal >= 0.95   {verdict(r1 >= 0.95)}")
        print("  (bare runs: a plain session on the model file, on tensors made beforehand; the agent's own")
        print("   session takes the input as the agent feeds it: fixed to the frames, frames in where it can)")
        print(f"  agent / bare run on plain CPU     {r2:6.3f}   goal >= 1.3    {verdict(r2 >= 1.3)}")
    sensor = report.get("sensor")
    if sensor:
        print("\nSensor path (bench_pipeline.py: csv -> tiny model -> JSON results), before / after")
        for side, row in sensor.items():
            print(
                f"  {side:<8}{row['agent_results_per_s']:>8} results/s (bare run {row['bare_run_per_s']}/s)  "
                f"added latency p50 {row['added_p50_ms']:.3f} ms  p95 {row['added_p95_ms']:.3f} ms"
            )


if __name__ == "__main__":
    main()
