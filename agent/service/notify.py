"""systemd's notify protocol, spoken directly on $NOTIFY_SOCKET (what sd_notify(3) does, without libsystemd).

The service manager gives a Type=notify service an AF_UNIX datagram socket in $NOTIFY_SOCKET (a
leading '@' means the abstract namespace) and, with WatchdogSec=, the watchdog period in
$WATCHDOG_USEC. A datagram holds newline-separated assignments: READY=1, STATUS=..., STOPPING=1,
WATCHDOG=1. Every function here is a no-op returning False when NOTIFY_SOCKET is unset (run by hand,
in a container, in tests) and never raises: a manager that cannot be told is no reason to stop
serving.

`Watchdog` pings at half of $WATCHDOG_USEC, and only while every registered liveness check passes:
each part (a pipeline worker, the MQTT loop) registers a check or a `Heartbeat`, and one stuck part
stops the pings, so that systemd kills and restarts the whole service.

The daemon's side:

    dog = Watchdog().start()                        # no thread when systemd asked for no watchdog
    beat = dog.heartbeat(f"pipeline {name}", limit=60, idle_ok=True)
    ...                                             # in the inference thread:
    with beat.busy():                               # one inference must end within `limit`
        outputs = model.run(tensor)
    dog.register("mqtt", lambda: None if connection_thread.is_alive() else "network thread ended")
    ready("serving 2 pipelines")                    # once the first pipeline ran
    status("text-detector 1.4.0 on CUDAExecutionProvider")
    stopping("flushing the outbox"); dog.stop()     # on SIGTERM
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from agent.util.worker import Worker

log = logging.getLogger(__name__)

# A check answers None (or True) when its part is alive, else a reason (or False).
Check = Callable[[], str | bool | None]

# sd_notify pings at half the period so that one late ping is not yet a missed deadline.
PING_FRACTION = 0.5


def _address(environ: Mapping[str, str] | None = None) -> str | bytes | None:
    path = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not path:
        return None
    if path.startswith("@"):
        return b"\0" + path[1:].encode()
    if path.startswith("/"):
        return path
    # systemd also speaks vsock (vsock:CID:PORT) to virtual machines; this agent runs on the host.
    log.debug("NOTIFY_SOCKET=%r is neither a path nor an abstract socket; not notifying", path)
    return None


def notify(*assignments: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send one datagram of `KEY=value` assignments; True once the manager's socket took it."""
    address = _address(environ)
    if address is None or not assignments:
        return False
    payload = "\n".join(assignments).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(payload, address)
    except OSError as exc:
        log.debug("notify %r failed: %s", assignments, exc)
        return False
    return True


def _one_line(text: str) -> str:
    # A newline would start a new assignment: a status line must not be able to forge READY=1.
    return " ".join(text.split())


def ready(status_text: str | None = None) -> bool:
    """Start-up is finished (Type=notify: systemctl start returns, dependent units start)."""
    return notify("READY=1", *([f"STATUS={_one_line(status_text)}"] if status_text else []))


def status(text: str) -> bool:
    """One line a person reads in `systemctl status`."""
    return notify(f"STATUS={_one_line(text)}")


def stopping(status_text: str | None = None) -> bool:
    """The service is shutting down on purpose (before flushing, so systemctl shows why it is slow)."""
    return notify("STOPPING=1", *([f"STATUS={_one_line(status_text)}"] if status_text else []))


def reloading(status_text: str | None = None) -> bool:
    """A configuration reload began; send ready() when it is done. MONOTONIC_USEC as Type=notify-reload wants."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(
        "RELOADING=1", f"MONOTONIC_USEC={usec}", *([f"STATUS={_one_line(status_text)}"] if status_text else [])
    )


def watchdog() -> bool:
    """One keep-alive ping. Prefer `Watchdog`, which pings only while the service is really alive."""
    return notify("WATCHDOG=1")


def extend_timeout(seconds: float) -> bool:
    """Ask for `seconds` more before the start (or stop) timeout fires, e.g. while a first model downloads."""
    return notify(f"EXTEND_TIMEOUT_USEC={max(1, int(seconds * 1_000_000))}")


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between pings (half of $WATCHDOG_USEC), or None when systemd asked for no watchdog here."""
    env = os.environ if environ is None else environ
    if _address(env) is None:
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    # A child that inherited the variables must not keep its parent alive.
    if pid and pid != str(os.getpid()):
        return None
    return usec / 1_000_000 * PING_FRACTION


class Heartbeat:
    """A liveness stamp one worker updates: stale, and so failing, once older than `limit` seconds.

    `beat()` says "alive now" (call it every loop iteration). `busy()` brackets one step that must
    finish within `limit` (an inference): inside it, only the step's duration counts. With
    `idle_ok=True` a worker that is outside any step (waiting for frames) is never stale, so that a
    quiet source does not restart the service; without it, silence longer than `limit` is stale too.
    """

    def __init__(
        self, name: str, limit: float, *, idle_ok: bool = False, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if limit <= 0:
            raise ValueError(f"heartbeat {name!r}: limit must be > 0 seconds, got {limit!r}")
        self.name = name
        self.limit = float(limit)
        self.idle_ok = idle_ok
        self._clock = clock
        self._last = clock()
        self._busy_since: float | None = None

    def beat(self) -> None:
        self._last = self._clock()

    @contextmanager
    def busy(self) -> Iterator[None]:
        self._busy_since = self._clock()
        try:
            yield
        finally:
            self._busy_since = None
            self._last = self._clock()

    def age(self) -> float:
        """Seconds since the last sign of life (since the step began, while in one)."""
        since = self._busy_since
        return self._clock() - (since if since is not None else self._last)

    def problem(self) -> str | None:
        since = self._busy_since
        now = self._clock()
        if since is not None:
            if now - since > self.limit:
                return f"{self.name}: stuck in one step for {now - since:.1f}s (limit {self.limit:g}s)"
            return None
        if not self.idle_ok and now - self._last > self.limit:
            return f"{self.name}: no heartbeat for {now - self._last:.1f}s (limit {self.limit:g}s)"
        return None

    __call__ = problem


class Watchdog:
    """Pings systemd's watchdog while every registered check passes; stays silent otherwise.

    Silence is the whole mechanism: after WatchdogSec without a ping systemd kills the service
    (SIGABRT) and Restart=on-failure starts it again. A failing check therefore never pings, and
    is reported once in the log and in `systemctl status` so that the journal says why.
    """

    def __init__(
        self,
        interval: float | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        ping: Callable[[], bool] = watchdog,
        say: Callable[[str], bool] = status,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = watchdog_interval(environ) if interval is None else interval
        self._ping = ping
        self._say = say
        self._clock = clock
        self._checks: dict[str, Check] = {}
        self._lock = threading.Lock()
        self._failing: tuple[str, ...] = ()
        # No join timeout: once stop() returns, no ping can follow.
        self._worker = Worker("systemd-watchdog", self._run, join_timeout=None)
        self.pings = 0

    @property
    def enabled(self) -> bool:
        return self.interval is not None

    def register(self, name: str, check: Check) -> None:
        """Add (or replace) the check called `name`, e.g. "pipeline gate" or "mqtt"."""
        with self._lock:
            self._checks[name] = check

    def heartbeat(self, name: str, limit: float, *, idle_ok: bool = False) -> Heartbeat:
        """A new heartbeat registered under `name`; the worker keeps it and beats it."""
        beat = Heartbeat(name, limit, idle_ok=idle_ok, clock=self._clock)
        self.register(name, beat)
        return beat

    def unregister(self, name: str) -> None:
        """Forget a part that stopped on purpose (a pipeline removed by a profile reload)."""
        with self._lock:
            self._checks.pop(name, None)

    def problems(self) -> list[str]:
        """Why the service is not alive, one reason per failing check; empty when all pass."""
        with self._lock:
            checks = list(self._checks.items())
        found = []
        for name, check in checks:
            try:
                answer = check()
            except Exception as exc:  # noqa: BLE001 (a check that cannot answer is a failing check)
                found.append(f"{name}: check raised {exc.__class__.__name__}: {exc}")
                continue
            if answer is False:
                found.append(f"{name}: not alive")
            elif isinstance(answer, str) and answer:
                found.append(answer if answer.startswith(name) else f"{name}: {answer}")
        return found

    def tick(self) -> bool:
        """Check once; ping when all checks pass. True when a ping was sent."""
        found = tuple(self.problems())
        if found != self._failing:
            if found:
                log.error("watchdog: not pinging systemd, so the service will be restarted: %s", "; ".join(found))
                self._say("watchdog: " + "; ".join(found))
            else:
                log.warning("watchdog: every part is alive again; pinging resumes")
            self._failing = found
        if found:
            return False
        sent = self._ping()
        self.pings += sent
        return sent

    def start(self) -> Watchdog:
        """Ping from a background thread; a no-op when systemd asked for no watchdog."""
        if self.interval is not None:
            self._worker.start()
        return self

    def stop(self) -> None:
        self._worker.stop()

    def _run(self) -> None:
        interval = self.interval
        if interval is None:
            return
        while True:
            try:
                self.tick()
            except Exception:  # the pinger must outlive a bad check or a log handler
                log.exception("watchdog tick failed")
            if self._worker.stopping.wait(interval):
                return

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
