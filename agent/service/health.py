"""Health: what the device and the agent are doing, published retained every interval and on change.

The reporter knows the system (CPU, memory, temperatures, disk, uptime) by itself; everything the
agent knows (pipelines, models, the outbox, the connection) is handed in as callables by the daemon, so
this module depends on none of those parts:

    reporter = HealthReporter(publish, interval=profile.health.interval, state_dir=profile.device.state_dir)
    reporter.add_source("connection", connection.health)
    reporter.add_source("outbox", lambda: outbox.stats().as_dict())
    reporter.add_source("pipelines", pipelines_health)   # {name: {fps, latency_ms: {stage: {p50, p95}}, ...}}
    reporter.add_source("models", models_health)         # {name: {version, digest, provider}}
    reporter.start()

"On change" means a change in a state-like value (a connection or source state, a model version or
digest, the provider in use, an error, the outbox drop count); gauges such as CPU or fps are only sent
with the regular interval, or a busy device would publish health all the time.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from agent.util.rss import rss_bytes
from agent.util.timefmt import utc_iso
from agent.util.worker import Worker

log = logging.getLogger(__name__)

# Keys whose value changing triggers an immediate report.
CHANGE_KEYS = frozenset({"state", "version", "digest", "provider", "error", "dropped", "enabled", "active"})
# How often sources are polled for a change between interval reports.
CHANGE_POLL = 1.0
# Reports on change are at most this frequent, so a flapping source cannot flood the broker.
MIN_GAP = 1.0

# A source returns a JSON-able value (json.dumps turns anything else into its str()).
Source = Callable[[], object]


def system_health(state_dir: str | Path | None = None) -> dict[str, Any]:
    """CPU, memory, temperatures, disk and load of this machine (psutil; absent sensors are left out)."""
    vm = psutil.virtual_memory()
    out: dict[str, Any] = {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "cpu_count": psutil.cpu_count(),
        "memory": {
            "total_mb": round(vm.total / 2**20),
            "available_mb": round(vm.available / 2**20),
            "percent": vm.percent,
        },
        "uptime_s": round(time.time() - psutil.boot_time()),
    }
    try:
        out["load"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    temps = _temperatures()
    if temps:
        out["temperatures_c"] = temps
    if state_dir is not None:
        try:
            du = psutil.disk_usage(str(state_dir))
            out["disk"] = {
                "path": str(state_dir),
                "total_mb": round(du.total / 2**20),
                "free_mb": round(du.free / 2**20),
                "percent": du.percent,
            }
        except OSError as exc:
            out["disk"] = {"path": str(state_dir), "error": exc.strerror or str(exc)}
    return out


def _temperatures() -> dict[str, float]:
    reader = getattr(psutil, "sensors_temperatures", None)
    if reader is None:
        return {}
    try:
        sensors = reader()
    except Exception:  # noqa: BLE001 (some kernels expose broken hwmon entries)
        return {}
    temps: dict[str, float] = {}
    for chip, entries in (sensors or {}).items():
        for i, entry in enumerate(entries):
            name = f"{chip}/{entry.label or i}"
            if entry.current is not None:
                temps[name] = round(float(entry.current), 1)
    return temps


def _fingerprint(value: object, key: str | None = None) -> object:
    """The state-like part of a report, for change detection."""
    if isinstance(value, dict):
        parts = {k: _fingerprint(v, k) for k, v in value.items()}
        return {k: v for k, v in parts.items() if v is not None and v != {}} or None
    if key in CHANGE_KEYS:
        return value
    return None


class HealthReporter:
    """Collects health and hands it to `publish(payload bytes)` (the daemon passes the connection's
    retained `publish_latest`)."""

    def __init__(
        self,
        publish: Callable[[bytes], None],
        *,
        interval: float = 30.0,
        device: str | None = None,
        state_dir: str | Path | None = None,
        agent_version: str | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        system: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.publish, self.interval = publish, interval
        self.device, self.agent_version = device, agent_version
        self._clock, self._monotonic = clock, monotonic
        self._system = system or (lambda: system_health(state_dir))
        self._sources: dict[str, Source] = {}
        self._started_at = monotonic()
        self._last_print: object = None
        self._last_sent = float("-inf")
        self._poke = threading.Event()
        self._worker = Worker("health", self._run, wake=self._poke.set)
        self.reports = 0
        psutil.cpu_percent(interval=None)  # the first call only sets the baseline

    def add_source(self, name: str, source: Source) -> None:
        """`source()` returns a JSON-able value reported under `name`; it runs on the health thread."""
        self._sources[name] = source

    def collect(self) -> dict[str, Any]:
        report: dict[str, Any] = {"ts": utc_iso(self._clock())}
        if self.device:
            report["device"] = self.device
        report["agent"] = {"uptime_s": round(self._monotonic() - self._started_at, 1)}
        if self.agent_version:
            report["agent"]["version"] = self.agent_version
        rss = rss_bytes()  # the whole process; each pipeline's share of its model's session is in `pipelines`
        if rss is not None:
            report["agent"]["rss_mb"] = round(rss / 2**20, 1)
        try:
            report["system"] = self._system()
        except Exception as exc:  # noqa: BLE001 (health must report, even about itself)
            report["system"] = {"error": str(exc)}
        for name, source in self._sources.items():
            try:
                report[name] = source()
            except Exception as exc:  # noqa: BLE001 (a broken source is reported in its place)
                log.warning("health source %s failed: %s", name, exc)
                report[name] = {"error": f"{type(exc).__name__}: {exc}"}
        return report

    def report(self) -> dict[str, Any]:
        """Collect and publish now."""
        report = self.collect()
        self._send(report)
        return report

    def check(self) -> bool:
        """One tick: publish if the interval has passed or a state-like value changed. True if sent."""
        now = self._monotonic()
        report = self.collect()
        due = now - self._last_sent >= self.interval
        changed = _fingerprint(report) != self._last_print and now - self._last_sent >= MIN_GAP
        if due or changed:
            self._send(report)
            return True
        return False

    def poke(self) -> None:
        """Something changed (a model swapped, a source lost): look now instead of at the next poll."""
        self._poke.set()

    def start(self) -> HealthReporter:
        self._worker.start()
        return self

    def stop(self) -> None:
        self._worker.stop()

    def _send(self, report: dict[str, Any]) -> None:
        self._last_print = _fingerprint(report)
        self._last_sent = self._monotonic()
        self.reports += 1
        try:
            self.publish(json.dumps(report, separators=(",", ":"), default=str).encode())
        except Exception:
            log.exception("health: publish failed")

    def _run(self) -> None:
        while not self._worker.stopping.is_set():
            try:
                self.check()
            except Exception:
                log.exception("health: check failed")
            self._poke.wait(min(CHANGE_POLL, self.interval))
            self._poke.clear()
