"""The `edge-agent` command as a user runs it: exit codes, one-line errors, help on every verb."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from agent import __version__
from agent.cli import VERBS
from agent.util.progress import ProgressBar

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_version() -> None:
    out = cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"edge-agent {__version__}"


@pytest.mark.parametrize("verb", VERBS)
def test_help_on_every_verb(verb: str) -> None:
    out = cli(verb, "--help")
    assert out.returncode == 0 and out.stdout.startswith("usage: edge-agent " + verb)


def test_no_verb_is_bad_usage() -> None:
    out = cli()
    assert out.returncode == 2 and "required: VERB" in out.stderr


def test_check_every_example_profile() -> None:
    examples = sorted(str(p) for p in (REPO / "configs").glob("*.yaml"))
    out = cli("check", "--no-files", *examples)  # they name files on a device (/etc/edge-agent/...)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == len(examples) and all(
        ": ok (device " in line for line in out.stdout.splitlines()
    )


def test_check_five_mistakes_five_located_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "device: {id: gate-cam-01}\n"
        "mqt: {url: 'mqtt://broker'}\n"
        "runtime: {providers: [cuda, cpux]}\n"
        "health: {interval: soon}\n"
        "pipelines:\n"
        "  - name: gate\n"
        "    model: m.onnx\n"
        "    source: {type: camera, device: /dev/video0, fps: fast}\n"
        "  - name: gate\n"
        "    model: n.onnx\n"
        "    source: {type: synthetic}\n"
    )
    good = tmp_path / "good.yaml"
    good.write_text("device: {id: ok-01}\n")
    out = cli("check", str(good), str(bad))
    assert out.returncode == 2
    assert out.stdout == f"{good}: ok (device ok-01, 0 pipeline(s))\n"
    lines = out.stderr.splitlines()
    assert lines == [
        f"{bad}:2: mqt: unknown key (did you mean 'mqtt'?)",
        f"{bad}:3: runtime.providers[1]: unknown execution provider 'cpux' (did you mean 'cpu'?)",
        f"{bad}:4: health.interval: expected a duration like 30s or 5min, got 'soon'",
        f"{bad}:8: pipelines[0].source.fps: expected a number > 0, got 'fast'",
        f"{bad}:9: pipelines[1].name: two pipelines are named 'gate'; names must be unique",
    ], out.stderr


def test_check_without_files_is_usage_error() -> None:
    out = cli("check")
    assert (
        out.returncode == 2 and out.stderr.strip() == "edge-agent check: give at least one profile file (or --schema)"
    )


def test_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    out = cli("check", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2
    assert out.stderr.splitlines() == [f"{tmp_path / 'nope.yaml'}:0: cannot read: No such file or directory"]
    assert "Traceback" not in out.stderr


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_redraws_in_place_at_most_ten_times_a_second() -> None:
    out, now = Terminal(), [0.0]
    bar = ProgressBar("m", out, unit="MB", clock=lambda: now[0])
    for done in range(0, 4_000_001, 100_000):  # 41 chunks, one every 1/16 s: a redraw every other one
        now[0] += 0.0625
        bar(done, 4_000_000)
    frames = out.getvalue().split("\r")[1:]
    assert len(frames) == 21 and out.getvalue().count("\n") == 1
    assert frames[-1] == "m [##############################] 100% 4.0/4.0 MB 1.6 MB/s\n"


def test_progress_on_a_terminal_overwrites_a_longer_phase_and_ends_on_done() -> None:
    out, now = Terminal(), [0.0]
    bar = ProgressBar("bench", out, clock=lambda: now[0])
    for done, phase in ((0, "opening CPUExecutionProvider x4"), (5, "timing CPU x1"), (10, "timing CPU x1")):
        now[0] += 1
        bar(done, 10, phase)
    assert "\n" not in out.getvalue()  # the last timing step is not the end: "done" is
    bar(10, 10, "done")
    frames = out.getvalue().split("\r")[1:]
    assert frames[1] == "bench [###############               ]  50% timing CPU x1".ljust(len(frames[0]))
    assert frames[-1] == "bench [##############################] 100% done".ljust(len(frames[0])) + "\n"


def test_progress_on_a_pipe_is_a_line_per_phase_and_quarter() -> None:
    steps, download = io.StringIO(), io.StringIO()
    bar = ProgressBar("bench", steps)
    for done in range(11):
        bar(done, 10, ("warming " if done < 2 else "timing ") + f"CPU x{1 + done % 2}")
    bar(10, 10, "done")
    assert steps.getvalue().splitlines() == [
        "bench: 0% warming CPU x1",
        "bench: 20% timing CPU x1",
        "bench: 30% timing CPU x2",
        "bench: 50% timing CPU x2",
        "bench: 80% timing CPU x1",
        "bench: 100% timing CPU x1",
        "bench: 100% done",
    ]
    bar = ProgressBar("m", download, unit="MB")
    for done in range(0, 2_000_001, 250_000):
        bar(done, 2_000_000)
    assert download.getvalue().splitlines() == [f"m: {p}% of 2.0 MB" for p in (0, 25, 50, 75, 100)]
