"""`edge-agent demo` end to end: a real registry, broker, agent and the PP-OCR detector, in a subprocess.

Checks what a person sees (rows with fps, latency and boxes; the 1.0.0 -> 1.1.0 hot swap; a summary
with no seq gap) and what they must not find afterwards: no process of the demo's still running, and
nothing left in the temporary folder the demo was given (TMPDIR).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from agent.cloud.demo.broker import amqtt_available, mosquitto_binary

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow

# 12:24:09  text@1.0.0    CPU         5.3    86.5    97.1   0.0          2-6  3 [47,38,326,89] [47,128,234,177] ...
ROW = re.compile(
    r"^\d\d:\d\d:\d\d  text@(?P<version>\S+)\s+(?P<provider>\S+)\s+(?P<fps>[\d.]+|-)\s+(?P<p50>[\d.]+)\s+"
    r"(?P<p95>[\d.]+)\s+\S+\s+(?P<seq>[\d-]+)\s+(?P<boxes>\d+)(?P<coords>( \[\d+,\d+,\d+,\d+\])*)( \.\.\.)?$"
)
SUMMARY = re.compile(
    r"^summary: (?P<results>\d+) results, .*seq gaps (?P<gaps>\d+), duplicates (?P<dups>\d+), "
    r"versions seen (?P<versions>[^(,]+?)( \(swap at seq \d+\))?, "
)


class DemoRun:
    """The demo in its own session (as a terminal runs it), its output collected, its process tree watched."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.tmpdir = tmp_path / "tmp"
        self.tmpdir.mkdir()
        env = {**os.environ, "TMPDIR": str(self.tmpdir), "PYTHONUNBUFFERED": "1"}
        env.pop("EDGE_AGENT_DEMO_BROKER", None)
        self.stderr_path = tmp_path / "demo.stderr"
        self.started = time.monotonic()
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "demo", "--no-color", *args],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                start_new_session=True,
            )
        self.lines: list[str] = []
        self.seen: dict[int, tuple[float, str]] = {}  # pid -> (create time, command line) of every descendant
        self.first_row_at: float | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            if self.first_row_at is None and ROW.match(line):
                self.first_row_at = time.monotonic() - self.started
            self.lines.append(line)

    def watch(self) -> None:
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                try:
                    self.seen.setdefault(child.pid, (child.create_time(), " ".join(child.cmdline()[:4])))
                except psutil.Error:
                    pass
        except psutil.NoSuchProcess:
            pass

    def wait_for(self, condition: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            self.watch()
            if condition():
                return True
            time.sleep(0.3)
        return condition()

    def interrupt(self) -> None:
        """Ctrl-C in a terminal: SIGINT to the whole foreground process group."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def finish(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
            pytest.fail(f"the demo did not stop within {timeout} s:\n{self.output()}")
        time.sleep(0.2)  # the reader thread takes the last lines
        return code

    def output(self) -> str:
        return "\n".join(self.lines) + "\n--- stderr ---\n" + self.stderr_path.read_text(errors="replace")

    def rows(self) -> list[re.Match[str]]:
        return [m for m in (ROW.match(line) for line in self.lines) if m]

    def summary(self) -> re.Match[str]:
        found = [m for m in (SUMMARY.match(line) for line in self.lines) if m]
        assert found, f"no summary line:\n{self.output()}"
        return found[-1]

    def survivors(self) -> list[str]:
        alive = []
        for pid, (created, cmd) in self.seen.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{pid} {cmd}")
            except psutil.NoSuchProcess:
                pass
        return alive

    def check_clean(self) -> None:
        assert self.seen, "no child process was ever seen (agent, broker): the watch did not work"
        assert not self.survivors(), f"processes left running: {self.survivors()}"
        workdirs = re.findall(r"working in (\S+)", self.stderr_path.read_text())
        assert workdirs and all(not Path(d).exists() for d in workdirs), workdirs
        assert list(self.tmpdir.iterdir()) == [], f"left in TMPDIR: {list(self.tmpdir.iterdir())}"


@pytest.fixture
def ppocr(sample_model: Callable[[str], Path]) -> Path:
    return sample_model("ppocr-det")  # the download (first run only) is not part of the timings below


@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
def test_demo_prints_results_and_the_hot_swap_then_ctrl_c_leaves_nothing(tmp_path: Path, ppocr: Path) -> None:
    run = DemoRun(tmp_path)
    swapped = run.wait_for(
        lambda: (
            any(m["version"] == "1.1.0" for m in run.rows()[-3:])
            and sum(m["version"] == "1.1.0" for m in run.rows()) >= 2
        ),
        timeout=60,
    )
    assert swapped, f"no row with 1.1.0:\n{run.output()}"
    run.interrupt()
    code = run.finish(timeout=40)
    out = run.output()
    assert code == 0, out

    rows = run.rows()
    assert len(rows) >= 8, out
    assert run.first_row_at is not None and run.first_row_at < 30, f"first result after {run.first_row_at} s"
    fps = [float(m["fps"]) for m in rows if m["fps"] != "-"]
    assert fps and max(fps) > 1.0, out
    assert all(float(m["p95"]) >= float(m["p50"]) > 0 for m in rows), out
    # The synthetic camera draws three lines of text: the detector finds boxes, and the row shows where.
    with_boxes = [m for m in rows if int(m["boxes"]) >= 1 and m["coords"]]
    assert len(with_boxes) >= len(rows) - 2, out
    versions = [m["version"] for m in rows]
    assert versions[0] == "1.0.0" and "1.1.0" in versions, versions
    assert (
        versions.index("1.1.0") > 0
        and all(v == "1.1.0" for v in versions[versions.index("1.1.0") :])
        or "rolled back" in out
    )

    assert "model.swapped" in out and "1.1.0 (was 1.0.0)" in out, out
    summary = run.summary()
    assert int(summary["results"]) >= 20 and int(summary["gaps"]) == 0 and int(summary["dups"]) == 0, summary.group(0)
    assert summary["versions"].startswith("1.0.0 -> 1.1.0"), summary.group(0)
    assert "agent offline (stopped)" in out, out  # the agent was stopped with SIGTERM and said so, not killed
    run.check_clean()


@pytest.mark.skipif(not amqtt_available(), reason="amqtt (the embedded broker, cloud extra) is not installed")
def test_demo_with_the_embedded_broker_and_a_duration(tmp_path: Path, ppocr: Path) -> None:
    run = DemoRun(tmp_path, "--broker", "embedded", "--duration", "12")
    run.wait_for(lambda: False, timeout=45)
    code = run.finish(timeout=40)
    out = run.output()
    assert code == 0, out
    assert "broker: embedded amqtt" in out, out
    rows = run.rows()
    assert len(rows) >= 4 and any(int(m["boxes"]) >= 1 for m in rows), out
    summary = run.summary()
    assert int(summary["results"]) >= 10 and int(summary["gaps"]) == 0, summary.group(0)
    run.check_clean()


def test_demo_rejects_a_bad_port_base() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agent", "demo", "--port-base", "80"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "--port-base" in result.stderr, result.stderr
