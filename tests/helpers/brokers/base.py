"""What every broker fixture shares: a process of its own on a free loopback port, killed with its children.

A broker is started by the test fixture (never a system service), in its own folder, in a new session, so
that `kill()` takes the whole process group down with SIGKILL: exactly what a crashed broker looks like.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Protocol

from tests.helpers.broker import free_port, wait_port

# Erlang brokers take seconds to boot on a loaded two-core machine.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


class Broker(Protocol):
    """What the suite needs of a broker fixture (Mosquitto's interface, tests/helpers/broker.py)."""

    name: str
    username: str | None
    password: str | None
    mqtt5: bool
    slow_start: bool
    port: int

    @property
    def url(self) -> str: ...

    def start(self) -> object: ...

    def stop(self) -> None: ...

    def kill(self) -> None: ...

    def restart(self) -> None: ...


def debian_version(package: str) -> str | None:
    """The installed Debian package's version, or None (not installed, or not Debian)."""
    if shutil.which("dpkg-query") is None:
        return None
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True)
    return out.stdout.strip() or None if out.returncode == 0 else None


class BrokerProcess:
    """One broker process: `url`, `start()`, `stop()`, `kill()` (SIGKILL), `restart()` on the same port.

    A subclass names itself (`name`), says why it cannot run here (`missing()`), writes its config and
    gives its command line and environment. `username`/`password` are what clients must present (None:
    anonymous).
    """

    name = "broker"
    username: str | None = None
    password: str | None = None
    mqtt5 = True  # whether the broker speaks MQTT 5 (test clients then use it)
    slow_start = False  # seconds to boot: worth starting before its turn

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"{self.name}.out"

    @classmethod
    def missing(cls) -> str | None:
        """Why this broker cannot run on this machine (what to install), or None."""
        return None

    @classmethod
    def version(cls) -> str:
        return "unknown"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def prepare(self) -> None:
        """Write the config (called before every start)."""

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return {}

    def start(self) -> BrokerProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.prepare()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                env={**os.environ, **self.environment()},
                start_new_session=True,
            )
        try:
            wait_port(self.port, START_TIMEOUT)
        except TimeoutError:
            self.kill()
            tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{self.name} did not listen on {self.port}: {tail}") from None
        return self

    def kill(self) -> None:
        """SIGKILL to the whole process group: no clean disconnects, no Will suppressed."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(STOP_TIMEOUT)
        # The group's other processes (the Erlang VM under a launcher script) die a moment later: a restart
        # must not find the old listener still there.
        deadline = time.monotonic() + STOP_TIMEOUT
        while _listening(self.port) and time.monotonic() < deadline:
            time.sleep(0.02)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(STOP_TIMEOUT)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        self.kill()  # whatever the group left behind


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False
