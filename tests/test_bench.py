"""The benchmarks run on this tree: the issues' figures live in bench/, and a bench that no longer runs
leaves a goal unmeasured (bench_runtime.py once still called the profile classes' old pydantic methods)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=300, env=env)


def test_the_runtime_benchs_camera_worker_runs_pipelines_as_the_daemon_builds_them() -> None:
    done = bench("bench/bench_runtime.py", "--worker", "pipelines", "2", "0.5", "60")
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.splitlines()[-1])
    assert figures["results_per_s"] > 0, figures


def test_the_pipeline_bench_runs_and_writes_its_figures(tmp_path: Path) -> None:
    done = bench("bench/bench_pipeline.py", "--frames", "2", "--samples", "200")
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((REPO / "bench" / "results" / "pipeline.json").read_text())
    assert doc["sensor"]["agent_results_per_s"] > 0, doc
