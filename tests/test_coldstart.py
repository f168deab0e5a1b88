"""Cold start: the timeline `run --log-level debug` prints, and what a start does not load before its first result."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.broker import Mosquitto
from tests.helpers.models import linear_model, save
from tests.test_pipeline import pool_model

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.arm64

IN_PROCESS = """
import sys
from agent.cli import main
code = main(["run", "--profile", sys.argv[1]])
print("MODULES", " ".join(sorted(m for m in sys.modules if m.split(".")[0] in ("cv2", "paho", "requests", "agent"))),
      file=sys.stderr)
sys.exit(code)
"""


def write_profile(tmp_path: Path, pipeline: dict[str, object]) -> Path:
    path = tmp_path / "profile.json"
    path.write_text(
        json.dumps({"device": {"id": "cold", "state_dir": str(tmp_path / "state")}, "pipelines": [pipeline]})
    )
    return path


def camera(tmp_path: Path) -> Path:
    model = save(pool_model(), tmp_path / "pool.onnx")
    source = {"type": "synthetic", "width": 64, "height": 48, "frames": 2, "fps": 50}
    return write_profile(
        tmp_path, {"name": "cam", "model": str(model), "source": source, "preprocess": {"resize": [32, 24]}}
    )


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def log_until_started(cmd: list[str]) -> list[str]:
    """A daemon that serves on (a broker, a camera that is not there): its log up to `agent.started`."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "event type=agent.started" in line:
                break
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return lines


def timeline(stderr: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"start \+[0-9.]+ s \([+-][0-9.]+ s\) (.*)", stderr)]


def test_run_at_debug_level_prints_the_start_timeline_up_to_the_first_result(tmp_path: Path) -> None:
    prof = camera(tmp_path)
    first = run("-m", "agent", "--log-level", "debug", "run", "--profile", str(prof))
    assert first.returncode == 0, first.stderr
    steps = timeline(first.stderr)
    assert steps[:3] == ["command line parsed", "daemon imported", "profile loaded"], steps
    assert any(
        re.fullmatch(r"model pool \S+ on CPUExecutionProvider \(optimised model cache: written\)", s) for s in steps
    )
    # the first frame is the warm-up: no run on a blank frame before the pipeline starts, so the first
    # result may even come before the daemon marks its pipelines started
    assert "model pool warmed (1 run)" not in steps
    warmed = "model pool warmed (1 run: the first frame)"
    assert [s for s in steps if s in (warmed, "first result (cam)")] == [warmed, "first result (cam)"], steps
    assert any(s.startswith("pipelines started") for s in steps), steps
    assert re.search(r"start: first result [0-9.]+ s after the process started", first.stderr)
    # the camera's model as it feeds it: fixed to its frames, frames in (agent.device.graphprep)
    assert (
        "model input rewritten name=pool input=x.frame changes='input x fixed to [1, 3, 24, 32]; x.frame takes "
        "frames (uint8, N x H x W x 3, BGR): preprocessing in the graph'" in first.stderr
    )
    second = run("-m", "agent", "--log-level", "debug", "run", "--profile", str(prof))
    assert any(s.endswith("(optimised model cache: hit)") for s in timeline(second.stderr)), second.stderr
    quiet = run("-m", "agent", "run", "--profile", str(prof))
    assert timeline(quiet.stderr) == []  # info level: no timeline


def test_a_start_without_broker_or_registry_never_loads_their_libraries(tmp_path: Path) -> None:
    out = run("-c", IN_PROCESS, str(camera(tmp_path)))
    assert out.returncode == 0, out.stderr
    loaded = set(out.stderr.split("MODULES", 1)[1].split())
    assert not {m for m in loaded if m.split(".")[0] in ("paho", "requests")}, loaded
    assert not {"agent.models.registry", "agent.transport.connection", "agent.service.statuspage"} & loaded


AT_FIRST_RESULT = """
import sys
from agent.cli import main
from agent.util.timeline import START
spawned = []
def audit(event, args):
    if event in ("subprocess.Popen", "os.posix_spawn", "os.fork", "os.exec"):
        spawned.append(event)
sys.addaudithook(audit)
first_result = START.first_result
def spy(pipeline):
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("pydantic", "psutil", "subprocess", "difflib")
                    or m.startswith("agent.transport.contract"))
    print("AT_FIRST_RESULT", loaded, spawned, file=sys.stderr, flush=True)
    first_result(pipeline)
START.first_result = spy
sys.exit(main(["run", "--profile", sys.argv[1]]))
"""


def test_a_start_with_a_broker_sends_its_first_result_before_importing_the_contract(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """The broker connection and the outbox are open before the first result, and their modules once pulled
    in the event contract (pydantic: 0.1-0.2 s of a 2-core start); the first event, after the first results,
    imports it now. Neither psutil (13 ms; health, after the first result, imports it), subprocess, difflib
    nor a child process (malloc's set-up once ran `ldconfig -p`) comes before the first result either."""
    prof = camera(tmp_path)
    prof.write_text(json.dumps({**json.loads(prof.read_text()), "mqtt": {"url": broker.url}}))

    def start() -> list[str]:
        lines = log_until_started([sys.executable, "-c", AT_FIRST_RESULT, str(prof)])
        assert any("event type=agent.started" in line for line in lines), "".join(lines)  # events went out after it
        return [line.split(" ", 1)[1].strip() for line in lines if line.startswith("AT_FIRST_RESULT")]

    first = start()  # a new profile: validated with pydantic, then kept as a snapshot
    assert len(first) == 1 and "agent.transport.contract" not in first[0] and "psutil" not in first[0], first
    assert first[0].endswith(" []"), first  # no child process
    # from the snapshot: no pydantic, contract, psutil, subprocess, difflib or child before the first result
    assert start() == ["[] []"]


def test_a_sensor_only_device_never_imports_opencv(tmp_path: Path) -> None:
    model = save(linear_model(np.ones((3, 1))), tmp_path / "sum.onnx")
    csv = tmp_path / "s.csv"
    csv.write_text("a,b,c\n1,2,3\n4,5,6\n")
    prof = write_profile(tmp_path, {"name": "vib", "model": str(model), "source": {"type": "csv", "path": str(csv)}})
    out = run("-c", IN_PROCESS, str(prof))
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["output"]["y"] for line in out.stdout.splitlines()] == [[[6.0]], [[15.0]]]
    loaded = set(out.stderr.split("MODULES", 1)[1].split())
    assert "cv2" not in loaded and "agent.inference.processing.pre" in loaded


def test_a_start_imports_only_the_plugins_its_profile_names(tmp_path: Path) -> None:
    out = run("-c", IN_PROCESS, str(camera(tmp_path)))
    assert out.returncode == 0, out.stderr
    loaded = set(out.stderr.split("MODULES", 1)[1].split())
    plugins = {
        m.rsplit(".", 1)[1]
        for m in loaded
        if m.startswith(("agent.inference.sources.", "agent.inference.processing.post."))
    }
    # synthetic is named; raw is the default post-processor; base is what every plug-in builds on
    assert plugins == {"synthetic", "raw", "base"}, plugins


def event_order(stderr: str) -> list[str]:
    """The start's events and its first result, in the order the log has them."""
    found = re.finditer(r"event type=([a-z_.]+)|start \+[0-9.]+ s \([+-][0-9.]+ s\) (first result) ", stderr)
    return [m.group(1) or m.group(2) for m in found]


def test_the_starts_events_come_after_the_first_result_and_each_pipeline_announces_itself_first(
    tmp_path: Path,
) -> None:
    # Their contract (pydantic) took the first frame's CPU on two cores: they wait for the first results.
    out = run("-m", "agent", "--log-level", "debug", "run", "--profile", str(camera(tmp_path)))
    assert out.returncode == 0, out.stderr
    order = event_order(out.stderr)
    assert [e for e in order if e != "first result"] == ["pipeline.started", "pipeline.finished", "agent.started"]
    if "pipelines started (after the first result)" in timeline(out.stderr):  # within its 1 s: not on a loaded CI
        assert order.index("first result") < order.index("pipeline.started"), order


def test_a_pipeline_without_results_still_announces_itself_before_its_other_events(tmp_path: Path) -> None:
    # A camera that is not there: no first result to wait for; the start goes on after its bound, and the
    # pipeline's own report of the lost camera never comes before its pipeline.started.
    model = save(pool_model(), tmp_path / "pool.onnx")
    source = {"type": "camera", "device": "http://127.0.0.1:9/none", "reconnect_max": 0.2}
    prof = write_profile(tmp_path, {"name": "cam", "model": str(model), "source": source})
    lines = log_until_started([sys.executable, "-m", "agent", "run", "--profile", str(prof)])
    events = event_order("".join(lines))
    assert events[0] == "pipeline.started" and events[-1] == "agent.started", events
    assert "source.lost" in events, events
