"""The demo's child processes and ports: start in their own group, stop in order, leave nothing behind.

Children run in their own process group (a Ctrl-C in the terminal reaches the demo alone, which then
stops them in order) and, on Linux, get SIGTERM should the demo itself die without cleaning up.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

LOCALHOST = "127.0.0.1"


def free_port(host: str = LOCALHOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int, host: str = LOCALHOST) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def wait_port(port: int, timeout: float, alive: Callable[[], bool] = lambda: True, host: str = LOCALHOST) -> bool:
    """True once something accepts connections on the port; False at the timeout or once `alive()` is not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def _child_setup() -> None:
    """In the child, before exec: its own process group (the terminal's Ctrl-C reaches the demo only, which
    stops the children in order), and SIGTERM when the demo dies without stopping it (Linux)."""
    os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except Exception:  # noqa: BLE001 (best effort: without it, stop_process still stops the child)
            pass


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a child with stdout and stderr appended to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_child_setup,
            close_fds=True,
        )


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float, sig: int = signal.SIGTERM) -> int | None:
    """Signal, wait, then kill; returns the exit code (None when it was never started)."""
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a child's log, for the one message that says why it failed."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
