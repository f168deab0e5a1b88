"""The `edge-agent` command as a user runs it: exit codes, one-line errors, help on every verb."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent import __version__
from agent.cli import VERBS

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
    out = cli("check", *examples)
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
