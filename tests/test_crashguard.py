"""A model that kills the process while loading: real processes die (exit, SIGKILL, SIGSEGV) mid-load."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.models.crashguard import FILE_NAME, CrashGuard

pytestmark = pytest.mark.arm64

REPO = Path(__file__).resolve().parent.parent

# One start of a daemon, cut down to the guard's part: pick the version to serve, load it, run it.
START = textwrap.dedent(
    """
    import ctypes, os, signal, sys, time
    from agent.models.crashguard import CrashGuard

    state_dir, new, old, how = sys.argv[1:5]
    guard = CrashGuard(state_dir)
    reason = guard.should_skip("text-detector", new)
    if reason:
        print("serving", old, "because", reason, flush=True)
        sys.exit(0)
    guard.begin("text-detector", new, previous=old)
    print("loading", new, flush=True)
    if how == "exit":
        os._exit(134)
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "segv":
        ctypes.string_at(0)
    if how == "hang":
        time.sleep(600)
    guard.succeeded("text-detector", new)
    print("serving", new, flush=True)
    """
)


def start(state_dir: Path, how: str, new: str = "1.5.0", old: str = "1.4.0") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONFAULTHANDLER": ""}
    return subprocess.run(
        [sys.executable, "-c", START, str(state_dir), new, old, how],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_three_crashes_in_a_row_then_the_previous_version(tmp_path: Path) -> None:
    for expected in (134, -signal.SIGKILL, -signal.SIGSEGV):
        how = {134: "exit", -signal.SIGKILL: "sigkill", -signal.SIGSEGV: "segv"}[expected]
        died = start(tmp_path, how)
        assert died.returncode == expected and died.stdout == "loading 1.5.0\n", died.stderr
    fourth = start(tmp_path, "ok")
    assert fourth.returncode == 0
    assert fourth.stdout.startswith(
        "serving 1.4.0 because model text-detector version 1.5.0 was loading when "
        "the agent died 3 starts in a row (last began 20"
    )
    assert fourth.stdout.rstrip().endswith("; starting on 1.4.0 instead")
    # Remembered: later starts do not try it again, and say the same.
    assert start(tmp_path, "ok").stdout == fourth.stdout
    # A newer version is tried normally.
    assert start(tmp_path, "ok", new="1.6.0", old="1.4.0").stdout == "loading 1.6.0\nserving 1.6.0\n"
    assert start(tmp_path, "ok").stdout == fourth.stdout


def test_sigkill_from_outside_in_the_middle_of_a_load(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for _ in range(3):
        child = subprocess.Popen(
            [sys.executable, "-c", START, str(tmp_path), "1.5.0", "1.4.0", "hang"],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert child.stdout is not None and child.stdout.readline() == "loading 1.5.0\n"
        child.kill()  # kill -9, as the OOM killer or systemd's watchdog would
        assert child.wait(30) == -signal.SIGKILL
        child.stdout.close()
        pending = CrashGuard(tmp_path).pending("text-detector")
        assert pending is not None and pending.version == "1.5.0" and pending.pid == child.pid
    assert start(tmp_path, "ok").stdout.startswith("serving 1.4.0 because")


def test_only_consecutive_deaths_count(tmp_path: Path) -> None:
    assert start(tmp_path, "exit").returncode == 134
    assert start(tmp_path, "exit").returncode == 134
    assert start(tmp_path, "ok").stdout == "loading 1.5.0\nserving 1.5.0\n"  # it ran once: the slate is clean
    assert not (CrashGuard(tmp_path).pending("text-detector"))
    assert start(tmp_path, "exit").returncode == 134
    assert start(tmp_path, "exit").returncode == 134
    assert start(tmp_path, "ok").stdout == "loading 1.5.0\nserving 1.5.0\n"


def test_a_different_version_in_between_resets_the_count(tmp_path: Path) -> None:
    start(tmp_path, "exit")
    start(tmp_path, "exit")
    start(tmp_path, "exit", new="1.6.0")
    pending = CrashGuard(tmp_path).pending("text-detector")
    assert pending is not None and (pending.version, pending.attempts) == ("1.6.0", 1)
    assert start(tmp_path, "ok").stdout == "loading 1.5.0\nserving 1.5.0\n"


def test_own_retries_and_handled_failures_are_not_deaths(tmp_path: Path) -> None:
    guard = CrashGuard(tmp_path)
    for _ in range(5):
        attempt = guard.begin("vad", "2", previous="1")
        assert (attempt.attempts, attempt.deaths, attempt.mine) == (1, 0, True)
        assert guard.should_skip("vad", "2") is None
    guard.abandon("vad", "2")  # e.g. the test vectors failed: an event, not a crash
    assert guard.pending("vad") is None and guard.crashed("vad") == {}
    assert json.loads((tmp_path / FILE_NAME).read_text()) == {"models": {}}


def test_forget_gives_a_crashing_version_another_chance(tmp_path: Path) -> None:
    for _ in range(3):
        start(tmp_path, "exit")
    guard = CrashGuard(tmp_path)
    assert guard.should_skip("text-detector", "1.5.0")
    assert list(guard.crashed("text-detector")) == ["1.5.0"]
    assert guard.should_skip("text-detector", "1.4.0") is None
    guard.forget("text-detector", "1.5.0")
    assert guard.should_skip("text-detector", "1.5.0") is None
    assert start(tmp_path, "ok").stdout == "loading 1.5.0\nserving 1.5.0\n"


def test_models_are_counted_apart_and_the_limit_is_a_setting(tmp_path: Path) -> None:
    guard = CrashGuard(tmp_path, limit=1)
    record = {
        "models": {
            "a": {
                "pending": {"version": "2", "previous": None, "attempts": 1, "pid": 1, "process": "dead", "since": "x"}
            },
            "b": {
                "pending": {"version": "7", "previous": "6", "attempts": 1, "pid": 1, "process": "dead", "since": "x"}
            },
        }
    }
    (tmp_path / FILE_NAME).write_text(json.dumps(record))
    assert guard.should_skip("a", "2") == (
        "model a version 2 was loading when the agent died 1 starts in a row (last began x); starting without it"
    )
    assert guard.pending("b") is not None and guard.crashed("b") == {}
    assert CrashGuard(tmp_path).should_skip("b", "7") is None  # the default limit is 3
    with pytest.raises(ValueError):
        CrashGuard(tmp_path, limit=0)


def test_a_damaged_record_starts_afresh(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_text('{"models": {"a": {"pend')
    guard = CrashGuard(tmp_path)
    assert guard.should_skip("a", "1") is None
    guard.begin("a", "1")
    assert json.loads((tmp_path / FILE_NAME).read_text())["models"]["a"]["pending"]["version"] == "1"
    (tmp_path / FILE_NAME).write_text('{"models": {"a": {"pending": {"version": "1"}}}}')
    assert guard.pending("a") is None  # malformed entry: ignored with a warning
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILE_NAME]  # no temp files left behind


def test_state_dir_is_created(tmp_path: Path) -> None:
    guard = CrashGuard(tmp_path / "state" / "deeper")
    guard.begin("m", "1")
    assert guard.pending("m") is not None
