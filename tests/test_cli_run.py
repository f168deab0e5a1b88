"""`edge-agent run` as a user runs it: results as JSON lines on stdout, seq across restarts, signals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.models import linear_model, save

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.arm64


def agent(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], capture_output=True, text=True, cwd=REPO, timeout=120, **kwargs
    )  # type: ignore[call-overload]


def spawn(prof: Path, stderr: int = subprocess.PIPE) -> subprocess.Popen[str]:
    """`edge-agent run --profile prof`, its results on a pipe."""
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--profile", str(prof)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )


def profile(tmp_path: Path, pipelines: list[dict]) -> Path:
    path = tmp_path / "profile.yaml"
    path.write_text(
        json.dumps({"device": {"id": "bench-pc", "state_dir": str(tmp_path / "state")}, "pipelines": pipelines})
    )
    return path


def test_results_go_to_stdout_as_json_lines_and_seq_survives_a_restart(tmp_path: Path) -> None:
    model = save(linear_model(np.ones((2, 1))), tmp_path / "models" / "sum.onnx")
    csv = tmp_path / "s.csv"
    csv.write_text("a,b\n1,2\n3,4\noops,1\n5,6\n")
    prof = profile(tmp_path, [{"name": "sums", "model": "models/sum.onnx", "source": {"type": "csv", "path": "s.csv"}}])
    first = agent("run", "--profile", str(prof))
    assert first.returncode == 0, first.stderr
    lines = [json.loads(line) for line in first.stdout.splitlines()]
    assert [(r["seq"], r["source_seq"], r["output"]) for r in lines] == [
        (1, 0, {"y": [[3.0]]}),
        (2, 1, {"y": [[7.0]]}),
        (3, 2, {"y": [[11.0]]}),
    ]
    assert (
        list(lines[0])[:3] == ["device", "pipeline", "seq"]
        and lines[0]["device"] == "bench-pc"
        and lines[0]["model"] == "sum"
    )
    assert "frame.rejected" in first.stderr and "'oops' in column 'a' is not a number" in first.stderr
    events = [line.split("event type=", 1)[1] for line in first.stderr.splitlines() if "event type=" in line]
    assert [e.split()[0] for e in events].count("agent.started") == 1, first.stderr  # each event in the journal once
    assert len(events) == len(set(events)), first.stderr
    again = agent("run", "--profile", str(prof))
    assert [json.loads(line)["seq"] for line in again.stdout.splitlines()] == [4, 5, 6]
    assert model.exists()


def test_a_kill_9_mid_stream_never_hands_out_a_seq_twice(tmp_path: Path) -> None:
    """seq is stored in place before its result is printed (through a memory mapping of the seq file): a
    process killed mid-stream leaves the last seq printed, or the one after it, and a restart goes on from
    there."""
    save(linear_model(np.ones((2, 1))), tmp_path / "sum.onnx")
    csv = tmp_path / "s.csv"
    csv.write_text("a,b\n" + "1,1\n" * 200_000)  # far more than come out before the kill
    prof = profile(tmp_path, [{"name": "sums", "model": "sum.onnx", "source": {"type": "csv", "path": "s.csv"}}])
    proc = spawn(prof, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        for _ in range(2000):
            proc.stdout.readline()
        proc.send_signal(signal.SIGKILL)
        printed = [json.loads(line)["seq"] for line in proc.stdout]  # what it printed before it died
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and printed == list(range(2001, 2001 + len(printed)))
    last = printed[-1] if printed else 2000
    csv.write_text("a,b\n1,1\n")
    again = agent("run", "--profile", str(prof))
    assert again.returncode == 0, again.stderr
    assert [json.loads(line)["seq"] for line in again.stdout.splitlines()] in ([last + 1], [last + 2])


def test_sigterm_stops_cleanly_and_exits_0(tmp_path: Path) -> None:
    save(linear_model(np.ones((2, 1))), tmp_path / "sum.onnx")
    csv = tmp_path / "live.csv"
    csv.write_text("a,b\n" + "1,1\n" * 5)
    prof = profile(
        tmp_path, [{"name": "tail", "model": "sum.onnx", "source": {"type": "csv", "path": "live.csv", "follow": True}}]
    )
    proc = spawn(prof)
    try:
        assert proc.stdout is not None
        got = [proc.stdout.readline() for _ in range(5)]
        with csv.open("a") as f:
            f.write("2,2\n")
        assert json.loads(proc.stdout.readline())["output"] == {"y": [[4.0]]}
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert time.monotonic() - started < 10 and len(got) == 5
    assert "pipeline.stopped" in err and out == ""


def test_a_pipeline_that_cannot_load_its_model_does_not_stop_the_others(tmp_path: Path) -> None:
    save(linear_model(np.ones((2, 1))), tmp_path / "sum.onnx")
    (tmp_path / "s.csv").write_text("a,b\n1,1\n")
    prof = profile(
        tmp_path,
        [
            {"name": "gone", "model": "missing.onnx", "source": {"type": "csv", "path": "s.csv"}},
            {"name": "fine", "model": "sum.onnx", "source": {"type": "csv", "path": "s.csv"}},
        ],
    )
    done = agent("run", "--profile", str(prof))
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["pipeline"] for line in done.stdout.splitlines()] == ["fine"]
    assert "pipeline.failed" in done.stderr and "missing.onnx does not exist" in done.stderr


def test_no_pipeline_that_can_start_is_exit_1_and_a_bad_profile_exit_2(tmp_path: Path) -> None:
    (tmp_path / "s.csv").write_text("a,b\n1,1\n")
    prof = profile(tmp_path, [{"name": "gone", "model": "missing.onnx", "source": {"type": "csv", "path": "s.csv"}}])
    done = agent("run", "--profile", str(prof))
    assert done.returncode == 1 and done.stderr.strip().endswith(
        "edge-agent run: no pipeline could start (see the events above)"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("device: {id: x}\npipelines:\n  - name: p\n    model: m.onnx\n    source: {type: webcam}\n")
    done = agent("run", "--profile", str(bad))
    assert done.returncode == 2 and "bad.yaml:5: pipelines[0].source.type" in done.stderr


def test_a_reader_that_closes_stdout_ends_the_run_quietly(tmp_path: Path) -> None:
    save(linear_model(np.ones((2, 1))), tmp_path / "sum.onnx")
    prof = profile(
        tmp_path,
        [
            {
                "name": "pattern",
                "model": "sum.onnx",
                "source": {"type": "jsonl", "path": "s.jsonl", "fields": ["a", "b"], "follow": True},
            }
        ],
    )
    data = tmp_path / "s.jsonl"
    data.write_text('{"a": 1, "b": 2}\n' * 5)
    stop = threading.Event()

    def sensor() -> None:  # like tail -f | head, the run notices the closed pipe at its next write
        while not stop.wait(0.1):
            with data.open("a") as f:
                f.write('{"a": 2, "b": 2}\n')

    threading.Thread(target=sensor, daemon=True).start()
    try:
        done = subprocess.run(
            f"{sys.executable} -m agent run --profile {prof} | head -2",
            shell=True,
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
    finally:
        stop.set()
    assert len(done.stdout.splitlines()) == 2
    assert "Traceback" not in done.stderr and "stdout was closed by its reader" in done.stderr
