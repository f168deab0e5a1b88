"""The KServe v2 endpoint (issue 16), side by side in one run, against a real `edge-agent run`:

1. Latency on a tiny model (y = x @ W + b, x [1, 3]): the in-process `session.run` of this process's own
   onnxruntime session, against one inference through the agent's endpoint on loopback (keep-alive
   HTTP/1.1, binary tensors: what tritonclient sends), and through tritonclient's own HTTP client. The
   three run in alternating batches; p50 and p95 of each. Goal: the endpoint adds <= 1 ms at p50.
2. The pipeline's throughput (results/s on stdout) with and without endpoint load (client threads
   sending inferences back to back), in alternating windows of the same run.

Usage: python bench/bench_endpoint.py [--requests 2000] [--rounds 4] [--window 3] [--rate 500] [--load-threads 2]
Prints a table and writes bench/results/endpoint.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.helpers.broker import free_port
from tests.helpers.daemon_proc import sensor_csv
from tests.helpers.models import linear_model, save

RESULTS = REPO / "bench" / "results"
GOAL_MS = 1.0
X = np.array([[1.0, 2.0, 3.0]], np.float32)


def binary_request(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """An inference as tritonclient sends it: a JSON header, then the raw tensor."""
    raw = x.tobytes()
    head = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": list(x.shape), "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


class Agent:
    """`edge-agent run` with one sensor pipeline on the tiny model and the endpoint on; results counted."""

    def __init__(self, root: Path, model: Path, rate: float) -> None:
        self.port = free_port()
        profile = {
            "device": {"id": "bench-endpoint", "state_dir": str(root / "state")},
            "endpoint": {"enabled": True, "address": f"127.0.0.1:{self.port}"},
            "pipelines": [
                {
                    "name": "sensor",
                    "model": str(model),
                    "source": {"type": "csv", "path": str(sensor_csv(root / "sensor.csv", 2_000_000)), "rate": rate},
                }
            ],
        }
        (root / "profile.json").write_text(json.dumps(profile))
        self.results = 0
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--profile", str(root / "profile.json")],
            stdout=subprocess.PIPE,
            stderr=(root / "agent.log").open("wb"),
            cwd=REPO,
        )
        threading.Thread(target=self._count, daemon=True).start()

    def _count(self) -> None:
        assert self.proc.stdout is not None
        for _ in self.proc.stdout:
            self.results += 1

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/v2/health/ready")
                if conn.getresponse().status == 200 and self.results > 0:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the agent did not get ready")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def percentiles(ms: list[float]) -> dict[str, float]:
    p50, p95 = np.percentile(np.array(ms), [50, 95])
    return {"p50_ms": round(float(p50), 4), "p95_ms": round(float(p95), 4), "n": len(ms)}


def latency(agent: Agent, model: Path, requests: int, rounds: int) -> dict[str, dict[str, float]]:
    import onnxruntime as ort
    import tritonclient.http as triton

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    body, headers = binary_request(X)
    client = triton.InferenceServerClient(f"127.0.0.1:{agent.port}")
    tensor = triton.InferInput("x", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X)

    def in_process() -> None:
        session.run(None, {"x": X})

    def endpoint() -> None:
        conn.request("POST", "/v2/models/lin/infer", body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        assert response.status == 200

    def with_tritonclient() -> None:
        client.infer("lin", [tensor])

    kinds: dict[str, Callable[[], None]] = {
        "session.run (in process)": in_process,
        "endpoint (http.client, binary)": endpoint,
        "endpoint (tritonclient, binary)": with_tritonclient,
    }
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for run in kinds.values():  # warm: sessions, connections, the agent's code paths
        for _ in range(50):
            run()
    per_round = max(1, requests // rounds)
    for _ in range(rounds):
        for kind, run in kinds.items():
            for _ in range(per_round):
                started = time.perf_counter()
                run()
                times[kind].append((time.perf_counter() - started) * 1000)
    conn.close()
    client.close()
    return {kind: percentiles(ms) for kind, ms in times.items()}


def throughput(agent: Agent, rounds: int, window: float, threads: int) -> dict[str, Any]:
    """Results/s of the pipeline in alternating quiet and loaded windows."""
    body, headers = binary_request(np.ones((64, 3), np.float32))
    quiet: list[float] = []
    loaded: list[float] = []
    served = [0]
    for _ in range(rounds):
        before = agent.results
        time.sleep(window)
        quiet.append((agent.results - before) / window)
        stop = threading.Event()

        def load(stop: threading.Event) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
            while not stop.is_set():
                conn.request("POST", "/v2/models/lin/infer", body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                served[0] += 1
            conn.close()

        workers = [threading.Thread(target=load, args=(stop,)) for _ in range(threads)]
        for w in workers:
            w.start()
        time.sleep(0.2)  # the load is on before the window opens
        before, started = agent.results, time.monotonic()
        time.sleep(window)
        loaded.append((agent.results - before) / (time.monotonic() - started))
        stop.set()
        for w in workers:
            w.join(10)
    q, lo = float(np.median(quiet)), float(np.median(loaded))
    return {
        "results_per_s_quiet": round(q, 1),
        "results_per_s_loaded": round(lo, 1),
        "ratio": round(lo / q, 3) if q else None,
        "endpoint_requests_during_load": served[0],
        "quiet_windows": [round(v, 1) for v in quiet],
        "loaded_windows": [round(v, 1) for v in loaded],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="timed requests per kind")
    parser.add_argument("--rounds", type=int, default=4, help="alternating batches and windows")
    parser.add_argument("--window", type=float, default=3.0, help="seconds per throughput window")
    parser.add_argument("--rate", type=float, default=500.0, help="the pipeline's rate (results/s)")
    parser.add_argument("--load-threads", type=int, default=2, help="client threads loading the endpoint")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = save(linear_model(np.ones((3, 2), np.float32), np.zeros(2, np.float32)), root / "lin.onnx")
        agent = Agent(root, model, args.rate)
        try:
            agent.wait_ready()
            lat = latency(agent, model, args.requests, args.rounds)
            flow = throughput(agent, args.rounds, args.window, args.load_threads)
        finally:
            agent.stop()
    base = lat["session.run (in process)"]["p50_ms"]
    added = lat["endpoint (http.client, binary)"]["p50_ms"] - base
    print(f"{'latency, tiny model':<36} {'p50 ms':>9} {'p95 ms':>9} {'p50 added':>10}")
    for kind, figures in lat.items():
        print(f"{kind:<36} {figures['p50_ms']:>9.3f} {figures['p95_ms']:>9.3f} {figures['p50_ms'] - base:>10.3f}")
    print(
        f"goal: the endpoint adds <= {GOAL_MS} ms at p50: {'met' if added <= GOAL_MS else 'NOT met'} ({added:.3f} ms)"
    )
    print()
    print(f"{'pipeline throughput':<36} {'results/s':>9}")
    print(f"{'without endpoint load':<36} {flow['results_per_s_quiet']:>9.1f}")
    print(f"{f'with {args.load_threads} client threads loading it':<36} {flow['results_per_s_loaded']:>9.1f}")
    print(f"ratio {flow['ratio']} ({flow['endpoint_requests_during_load']} endpoint requests during the load)")
    doc = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "args": vars(args),
        "latency": lat,
        "endpoint_added_p50_ms": round(added, 4),
        "goal_added_p50_ms": GOAL_MS,
        "goal_met": added <= GOAL_MS,
        "throughput": flow,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "endpoint.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {RESULTS / 'endpoint.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
