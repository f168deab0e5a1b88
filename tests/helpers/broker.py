"""A real Mosquitto on a free loopback port, which tests can kill -9 and restart on the same port."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_EPHEMERAL_LOW = _ephemeral_low()
_handed_out: set[int] = set()


def free_port() -> int:
    """A port no one listens on, picked BELOW the kernel's ephemeral range.

    A port from bind(0) comes from the ephemeral range, which outgoing connections draw from too: a
    broker that boots for seconds (RabbitMQ, ejabberd) found its port taken by some client's socket
    meanwhile (eaddrinuse). Ports below that range are only ever taken by listeners that ask for them.
    """
    low = max(1024, min(20000, _EPHEMERAL_LOW - 2000))
    for _ in range(200):
        port = random.randrange(low, _EPHEMERAL_LOW)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {low}-{_EPHEMERAL_LOW - 1}")


def wait_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if not found:
        raise RuntimeError("mosquitto is not installed (scripts/test.sh installs it with apt-get)")
    return found


class Mosquitto:
    """One broker process; `extra_conf` adds lines (listeners, TLS, ACL) to its config. Setting `conf`
    before `start()` replaces the listener and security lines with it (a documented configuration that
    must come first, as `per_listener_settings` does); logging and persistence are still added."""

    def __init__(self, workdir: Path, port: int | None = None, extra_conf: str = "", anonymous: bool = True) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.extra_conf = extra_conf
        self.anonymous = anonymous
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "mosquitto.log"
        self.conf: str | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _write_conf(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        security = self.conf or (
            f"listener {self.port} 127.0.0.1\nallow_anonymous {'true' if self.anonymous else 'false'}\n"
        )
        conf.write_text(
            security + "persistence false\n"
            f"log_dest file {self.log}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            "max_queued_messages 100000\n" + self.extra_conf
        )
        return conf

    def start(self, wait_port_for: int | None = None) -> Mosquitto:
        conf = self._write_conf()
        self.proc = subprocess.Popen(
            [mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            wait_port(wait_port_for or self.port)
        except TimeoutError:
            self.stop()
            raise RuntimeError(
                f"mosquitto did not start: {self.log.read_text() if self.log.exists() else ''}"
            ) from None
        return self

    def kill(self) -> None:
        """SIGKILL: no clean disconnects, exactly what a crashed broker looks like."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
