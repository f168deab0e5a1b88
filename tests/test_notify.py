"""The systemd notify protocol against a real AF_UNIX datagram socket, as systemd's manager reads it."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.service import notify
from agent.service.notify import Heartbeat, Watchdog

pytestmark = pytest.mark.arm64

REPO = Path(__file__).resolve().parent.parent


class Manager:
    """The service manager's end: a bound datagram socket that records who sent what."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def receive(self, timeout: float = 10.0) -> tuple[list[str], int]:
        """The next datagram's assignments and the sender's process id (from SCM_CREDENTIALS)."""
        self.sock.settimeout(timeout)
        data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = -1
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", payload[:12])[0]
        return data.decode().split("\n"), pid

    def wait_for(self, assignment: str, timeout: float = 10.0) -> list[list[str]]:
        """Datagrams up to and including the first that holds `assignment`."""
        seen, deadline = [], time.monotonic() + timeout
        while True:
            lines, _ = self.receive(max(0.01, deadline - time.monotonic()))
            seen.append(lines)
            if any(line.startswith(assignment) for line in lines):
                return seen

    def drain(self) -> list[list[str]]:
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.sock.recv(4096).decode().split("\n"))
        except BlockingIOError:
            return out
        finally:
            self.sock.setblocking(True)

    def quiet_for(self, assignment: str, seconds: float) -> bool:
        """True when no datagram holding `assignment` arrives within `seconds`."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                lines, _ = self.receive(left)
            except TimeoutError:
                return True
            if assignment in lines:
                return False
        return True


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Manager]:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        yield Manager(sock, str(path))


def test_ready_status_stopping(manager: Manager) -> None:
    assert notify.ready("serving 2 pipelines")
    lines, pid = manager.receive()
    assert lines == ["READY=1", "STATUS=serving 2 pipelines"] and pid == os.getpid()
    assert notify.status("model text-detector 1.4.0 active")
    assert manager.receive()[0] == ["STATUS=model text-detector 1.4.0 active"]
    assert notify.stopping("flushing 12 results")
    assert manager.receive()[0] == ["STOPPING=1", "STATUS=flushing 12 results"]
    assert notify.watchdog()
    assert manager.receive()[0] == ["WATCHDOG=1"]
    assert notify.extend_timeout(90)
    assert manager.receive()[0] == ["EXTEND_TIMEOUT_USEC=90000000"]
    assert notify.reloading()
    lines = manager.receive()[0]
    assert lines[0] == "RELOADING=1" and lines[1].startswith("MONOTONIC_USEC=") and int(lines[1].split("=")[1]) > 0


def test_a_status_line_cannot_forge_assignments(manager: Manager) -> None:
    notify.status("model name from a manifest\nREADY=1")
    assert manager.receive()[0] == ["STATUS=model name from a manifest READY=1"]


def test_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"edge-agent-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.ready()
        sock.settimeout(10)
        assert sock.recv(4096) == b"READY=1"


def test_no_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.ready() is False and notify.watchdog() is False and notify.status("x") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert notify.ready() is False  # a vanished manager is logged at debug level, never raised


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000"}
    assert notify.watchdog_interval(env) == 15.0
    assert notify.watchdog_interval({**env, "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert notify.watchdog_interval({**env, "WATCHDOG_PID": "1"}) is None  # inherited by a child: not ours
    assert notify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) is None
    assert notify.watchdog_interval({**env, "WATCHDOG_USEC": "0"}) is None
    assert notify.watchdog_interval({**env, "WATCHDOG_USEC": "soon"}) is None
    assert Watchdog(environ={}).enabled is False
    assert not Watchdog(environ={}).start()._worker.started


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_heartbeat_stale_and_busy() -> None:
    clock = FakeClock()
    beat = Heartbeat("pipeline gate", limit=30, clock=clock)
    clock.now += 29
    assert beat.problem() is None
    clock.now += 2
    assert beat.problem() == "pipeline gate: no heartbeat for 31.0s (limit 30s)"
    beat.beat()
    assert beat.problem() is None
    with beat.busy():
        clock.now += 30
        assert beat.problem() is None
        clock.now += 15
        assert beat.problem() == "pipeline gate: stuck in one step for 45.0s (limit 30s)"
    assert beat.problem() is None  # the step finished: alive again

    idle = Heartbeat("pipeline door", limit=5, idle_ok=True, clock=clock)
    clock.now += 3600
    assert idle.problem() is None  # waiting for frames is not stuck
    with idle.busy():
        clock.now += 6
        assert "stuck in one step for 6.0s" in (idle.problem() or "")
    with pytest.raises(ValueError):
        Heartbeat("x", limit=0)


def test_tick_pings_only_while_every_check_passes() -> None:
    clock, pings, said = FakeClock(), [], []
    dog = Watchdog(1.0, ping=lambda: pings.append(1) or True, say=lambda text: said.append(text) or True, clock=clock)
    mqtt_alive = [True]
    dog.register("mqtt", lambda: None if mqtt_alive[0] else "network loop thread ended")
    gate = dog.heartbeat("pipeline gate", limit=10)
    assert dog.tick() and len(pings) == 1
    mqtt_alive[0] = False
    assert not dog.tick() and not dog.tick() and len(pings) == 1
    assert said == ["watchdog: mqtt: network loop thread ended"]  # said once, not at every tick
    mqtt_alive[0] = True
    assert dog.tick() and len(pings) == 2
    clock.now += 11
    assert not dog.tick() and said[-1] == "watchdog: pipeline gate: no heartbeat for 11.0s (limit 10s)"
    gate.beat()
    assert dog.tick()
    dog.register("broken", lambda: 1 / 0)
    assert not dog.tick() and "broken: check raised ZeroDivisionError" in said[-1]
    dog.unregister("broken")
    dog.register("flag", lambda: False)
    assert not dog.tick() and said[-1] == "watchdog: flag: not alive"
    dog.register("flag", lambda: True)
    assert dog.tick() and dog.pings == 4


def test_pings_seen_then_stop_when_inference_is_stuck(manager: Manager, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker beats while it infers; once one inference hangs, the socket hears no more WATCHDOG=1."""
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # WatchdogSec=100ms: pings every 50 ms
    dog = Watchdog()
    assert dog.interval == 0.05
    beat = dog.heartbeat("pipeline gate", limit=1.0)
    release, go_stuck = threading.Event(), threading.Event()

    def worker() -> None:
        while not go_stuck.is_set():
            with beat.busy():
                time.sleep(0.01)  # an inference that finishes
        with beat.busy():
            release.wait(60)  # an inference that never returns

    with dog:
        notify.ready()
        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        seen = manager.wait_for("READY=1")
        pings = sum(
            lines == ["WATCHDOG=1"] for lines in seen + manager.wait_for("WATCHDOG=1") + manager.wait_for("WATCHDOG=1")
        )
        assert pings >= 2
        go_stuck.set()
        status_lines = manager.wait_for("STATUS=watchdog: pipeline gate: stuck in one step", timeout=30)
        assert status_lines[-1][0].endswith("(limit 1s)")
        manager.drain()
        assert manager.quiet_for("WATCHDOG=1", 0.5), "pinged while an inference was stuck"
        release.set()
        thread.join(10)
        manager.wait_for("WATCHDOG=1")  # the step ended: alive again, pings resume
    assert not dog._worker.started


CHILD = textwrap.dedent(
    """
    import select, sys, time
    from agent.service import notify
    dog = notify.Watchdog()
    beat = dog.heartbeat("pipeline gate", limit=1.5)
    dog.start()
    notify.ready("serving 1 pipeline")
    while not select.select([sys.stdin], [], [], 0.02)[0]:
        beat.beat()
    with beat.busy():
        print("stuck", flush=True)
        time.sleep(600)
    """
)


def test_a_daemon_process_pings_from_its_own_pid_and_goes_silent(manager: Manager) -> None:
    """As systemd runs it: environment from the manager, pings from a thread of the main process
    (NotifyAccess=main accepts them), silence once inference hangs."""
    env = {**os.environ, "NOTIFY_SOCKET": manager.env_value, "WATCHDOG_USEC": "200000", "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        lines, pid = manager.receive()
        while lines == ["WATCHDOG=1"]:
            assert pid == child.pid
            lines, pid = manager.receive()
        assert lines == ["READY=1", "STATUS=serving 1 pipeline"] and pid == child.pid
        lines, pid = manager.receive()
        assert lines == ["WATCHDOG=1"] and pid == child.pid
        child.stdin.write("hang now\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "stuck"
        manager.wait_for("STATUS=watchdog: pipeline gate: stuck", timeout=30)
        manager.drain()
        assert manager.quiet_for("WATCHDOG=1", 0.6)
        assert child.poll() is None  # alive but silent: systemd's watchdog, not the agent, ends it
    finally:
        child.kill()
        child.wait()
        child.stdin.close()
        child.stdout.close()
