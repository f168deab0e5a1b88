"""Keeping registry models current on a running device, and backing out of bad ones.

Sources of an update: the channel poll (every `registry.poll_interval`), a deployment order from the
cloud (retained on the deploy topics), or the `update` command. Each ends in the same steps: the
registry client pulls, verifies and tests the version into the store, then every pipeline serving the
model swaps to it between two frames. A version that fails to load is rolled back at once; one that
loads is on probation: worse latency or more errors than the version before roll it back.
A version that killed the process while loading is remembered by the crash guard and skipped.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypedDict

from agent.models.crashguard import CrashGuard
from agent.models.store import Store, StoreError, write_atomic
from agent.transport.events import Event, EventSink
from agent.util.worker import Worker

if TYPE_CHECKING:  # the daemon builds the updater and hands itself over: a runtime import would be a cycle
    from agent.config.profile import Profile
    from agent.inference.pipeline import Pipeline
    from agent.service.daemon import Daemon
    from agent.transport.subscriptions import Incoming

log = logging.getLogger(__name__)

JOIN_TIMEOUT = 30.0  # an update step in progress (a download, a swap) finishes before stop returns


class OrderRecord(TypedDict):
    """orders.json, per model: the deployment order being followed, so that a restart keeps following it."""

    id: str
    version: str


class UpdateSummary(TypedDict):
    """One model's outcome of an update, as the `update` command replies it."""

    model: str
    # A PullResult status; "activated" becomes "active", or "rolled-back" when the swap failed.
    status: Literal["activated", "current", "held", "refused", "failed", "active", "rolled-back"]
    version: str | None
    reason: str | None


@dataclass
class Probation:
    model: str
    version: str
    previous: str | None
    until: float
    baseline_p95: float | None
    baseline_counts: dict[str, tuple[int, int]]  # pipeline -> (inferences, errors) at the swap


def skip_crashing_versions(store: Store, profile: Profile, emit: EventSink) -> None:
    """At start, before any model loads: a version that killed the last starts is rolled back; a version
    whose load was never confirmed counts this start as one more attempt."""
    guard = CrashGuard(profile.device.state_dir)
    for model in sorted({c.model for c in profile.registry_pipelines}):
        active = store.active(model)
        if active is None:
            continue
        reason = guard.should_skip(model, active.version)
        if reason:
            try:
                restored = store.rollback(model)
            except (StoreError, OSError) as exc:  # nothing older on disk: serve it and say so
                emit(
                    Event(
                        "model.rollback_failed",
                        {"model": model, "version": active.version, "reason": f"{reason}; {exc}"},
                    )
                )
                continue
            emit(
                Event(
                    "model.rolled_back",
                    {"model": model, "version": active.version, "to": restored.version, "reason": reason},
                )
            )
            continue
        pending = guard.pending(model)
        if pending is not None and pending.version == active.version:
            guard.begin(model, active.version, previous=pending.previous)


class Updater:
    def __init__(self, daemon: Daemon) -> None:
        parts, registry = daemon.parts, daemon.profile.registry
        if parts is None or parts.registry is None or parts.store is None or registry is None:
            raise ValueError("updates need the daemon's registry client and store")
        self.daemon = daemon
        self.profile = daemon.profile
        self.settings = registry
        self.parts = parts
        self.registry = parts.registry
        self.store = parts.store
        self.guard = CrashGuard(self.profile.device.state_dir)
        self.orders_file = Path(self.profile.device.state_dir) / "orders.json"
        self._orders: dict[str, OrderRecord] = self._load_orders()
        self._probation: dict[str, Probation] = {}
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._worker = Worker("updater", self._run, join_timeout=JOIN_TIMEOUT, wake=self._wake.set)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> Updater:
        self._subscribe_orders()
        self._worker.start()
        return self

    def stop(self) -> None:
        self._worker.stop()

    def _run(self) -> None:
        interval = self.settings.poll_interval
        next_poll = time.monotonic() + interval
        stopping = self._worker.stopping
        while not stopping.is_set():
            self._wake.wait(min(1.0, max(0.0, next_poll - time.monotonic())))
            if stopping.is_set():
                return
            try:
                if self._wake.is_set() or time.monotonic() >= next_poll:
                    self._wake.clear()
                    self.update()
                    next_poll = time.monotonic() + interval
                self._judge_probation()
            except Exception as exc:  # the update loop must outlive one bad update
                log.exception("update step failed")
                self.daemon.emit(Event("update.error", {"reason": f"{type(exc).__name__}: {exc}"}))

    # -- what to follow --------------------------------------------------------------------------

    def targets(self) -> dict[str, tuple[str | None, str | None]]:
        """model -> (channel, pinned version): a deployment order's version beats the profile's channel."""
        out: dict[str, tuple[str | None, str | None]] = {}
        for config in self.profile.registry_pipelines:
            out[config.model] = (config.channel, config.version)
        for model, order in self._orders.items():
            if model in out:
                out[model] = (None, order["version"])
        return out

    def update(self, only: str | None = None) -> list[UpdateSummary]:
        """Check the registry now; swap pipelines to what it activated. Returns one summary per model."""
        summaries: list[UpdateSummary] = []
        with self._lock:
            for model, (channel, version) in self.targets().items():
                if only is not None and model != only:
                    continue
                summaries.append(self._pull_and_swap(model, channel, version, allow_older=False))
        return summaries

    def _pull_and_swap(
        self, model: str, channel: str | None, version: str | None, allow_older: bool, order: str | None = None
    ) -> UpdateSummary:
        before = self.store.active(model)
        if version is not None:
            reason = self.guard.should_skip(model, version)
            if reason:
                self.daemon.emit(Event("model.refused", {"model": model, "version": version, "reason": reason}))
                return {"model": model, "status": "refused", "version": version, "reason": reason}
        result = self.registry.check_and_pull(model, channel, version, allow_older=allow_older)
        summary: UpdateSummary = {
            "model": model,
            "status": result.status,
            "version": result.version,
            "reason": result.reason,
        }
        if result.status == "activated":
            self.swap_pipelines(model, previous=before.version if before else None, order=order)
            summary["status"] = "active" if self._active_version(model) == result.version else "rolled-back"
        return summary

    def _active_version(self, model: str) -> str | None:
        active = self.store.active(model)
        return active.version if active is not None else None

    # -- swapping ------------------------------------------------------------------------------

    def pipelines_of(self, model: str) -> list[Pipeline]:
        parts = self.daemon.parts
        return [p for p in list(parts.pipelines.values()) if p.config.model == model] if parts else []

    def swap_pipelines(self, model: str, previous: str | None, order: str | None = None) -> None:
        """Swap every pipeline serving `model` to the store's active version; roll back if one fails."""
        from agent.inference.runtime import ModelError

        active = self.store.active(model)
        if active is None:
            return
        pipelines = self.pipelines_of(model)
        baseline = self._p95(pipelines)
        counts = {p.name: (p.stats()["inferences"], p.stats()["inference_errors"]) for p in pipelines}
        self.guard.begin(model, active.version, previous=previous)
        try:
            for pipeline in pipelines:
                pipeline.swap(active.path, version=active.version, name=model)
        except (ModelError, OSError) as exc:
            self.guard.abandon(model, active.version)
            self._roll_back(model, active.version, f"the new version did not load in a pipeline: {exc}")
            return
        if not pipelines:
            self.guard.succeeded(model, active.version)
        self.daemon.emit(
            Event(
                "model.active",
                {
                    "model": model,
                    "version": active.version,
                    "previous": previous,
                    "provider": pipelines[0].model.provider if pipelines else active.provider,
                    **({"order": order} if order else {}),
                },
            )
        )
        probation = self.settings.probation
        if pipelines and previous is not None and probation.duration > 0:
            self._probation[model] = Probation(
                model, active.version, previous, time.monotonic() + probation.duration, baseline, counts
            )

    def _roll_back(self, model: str, bad: str, reason: str) -> None:
        self._probation.pop(model, None)
        try:
            restored = self.store.rollback(model)
        except (StoreError, OSError) as exc:  # nothing to go back to: say so and keep serving
            self.daemon.emit(
                Event(
                    "model.rollback_failed",
                    {"model": model, "version": bad, "reason": f"{reason}; rollback failed: {exc}"},
                )
            )
            return
        for pipeline in self.pipelines_of(model):
            if pipeline.stats()["model_version"] != restored.version:
                pipeline.swap(restored.path, version=restored.version, name=model)
        self.daemon.emit(
            Event("model.rolled_back", {"model": model, "version": bad, "to": restored.version, "reason": reason})
        )

    def rollback(self, model: str) -> dict[str, str | None]:
        """The operator's rollback (command): back to the previous version, held there."""
        with self._lock:
            current = self.store.active(model)
            if current is None:
                raise ValueError(f"model {model!r} has no active version")
            self._roll_back(model, current.version, "ordered by the rollback command")
            return {"model": model, "version": self._active_version(model), "from": current.version}

    # -- probation -----------------------------------------------------------------------------

    @staticmethod
    def _p95(pipelines: list[Pipeline]) -> float | None:
        stages = [p.stats()["latency_ms"].get("infer") for p in pipelines]
        values = [t["p95"] for t in stages if t is not None and t["p95"]]
        return max(values) if values else None

    def confirm_running(self) -> None:
        """A new version that produced results has survived its load: clear the crash guard."""
        for model in {c.model for c in self.profile.registry_pipelines}:
            attempt = self.guard.pending(model)
            if attempt is None:
                continue
            serving = [p for p in self.pipelines_of(model) if p.stats()["model_version"] == attempt.version]
            if serving and all(p.stats()["inferences"] > 0 for p in serving):
                self.guard.succeeded(model, attempt.version)

    def _judge_probation(self) -> None:
        limits = self.settings.probation
        for model, trial in list(self._probation.items()):
            pipelines = self.pipelines_of(model)
            reason = None
            for p in pipelines:
                s = p.stats()
                runs0, errors0 = trial.baseline_counts.get(p.name, (0, 0))
                runs, errors = s["inferences"] - runs0, s["inference_errors"] - errors0
                if runs + errors >= 5 and errors / (runs + errors) > limits.max_error_rate:
                    reason = f"pipeline {p.name}: error rate {errors / (runs + errors):.0%} is above {limits.max_error_rate:.0%}"
            p95 = self._p95(pipelines)
            enough = (
                sum(p.stats()["inferences"] - trial.baseline_counts.get(p.name, (0, 0))[0] for p in pipelines)
                >= limits.min_inferences
            )
            if (
                reason is None
                and enough
                and trial.baseline_p95
                and p95
                and p95 > trial.baseline_p95 * limits.max_latency_ratio
            ):
                reason = (
                    f"inference p95 {p95:.1f} ms is {p95 / trial.baseline_p95:.1f}x the previous version's "
                    f"{trial.baseline_p95:.1f} ms (allowed {limits.max_latency_ratio}x)"
                )
            if reason:
                self._roll_back(model, trial.version, f"probation failed: {reason}")
            elif time.monotonic() >= trial.until and enough:
                self._probation.pop(model)
                self.daemon.emit(Event("model.probation_passed", {"model": model, "version": trial.version}))

    # -- deployment orders -----------------------------------------------------------------------

    def _load_orders(self) -> dict[str, OrderRecord]:
        try:
            doc = json.loads(self.orders_file.read_text())
        except (OSError, ValueError):
            return {}
        return {
            model: {"id": str(order["id"]), "version": str(order["version"])}
            for model, order in (doc.items() if isinstance(doc, dict) else ())
            if isinstance(order, dict) and {"id", "version"} <= order.keys()
        }

    def _save_orders(self) -> None:
        write_atomic(self.orders_file, json.dumps(self._orders, indent=1).encode())

    def _subscribe_orders(self) -> None:
        connection = self.parts.connection
        if connection is None:
            return
        for topic in (connection.topics.deploy, connection.topics.fleet_deploy):
            connection.subscribe(topic, self._on_order)

    def _on_order(self, message: Incoming) -> None:
        # On the network thread: hand the work to a thread of its own, never block paho's loop.
        threading.Thread(
            target=self._apply_order, args=(message.topic, message.payload), name="deploy", daemon=True
        ).start()

    def _apply_order(self, topic: str, payload: bytes) -> None:
        from agent.models.deploy import OrderError, applies_to, parse_order

        try:
            order = parse_order(payload, self.registry.keys)
        except OrderError as exc:
            self.daemon.emit(Event("deploy.refused", {"topic": topic, "order": exc.order_id, "reason": str(exc)}))
            return
        device = self.profile.device
        if order is None or not applies_to(order, device.id, device.group):
            return  # withdrawn, or for another device: keep serving what is active
        served = {c.model for c in self.profile.registry_pipelines}
        if order.model not in served:
            self.daemon.emit(
                Event(
                    "model.refused",
                    {**order.event_fields(), "reason": f"no pipeline on this device serves model {order.model!r}"},
                )
            )
            return
        with self._lock:
            known = self._orders.get(order.model)
            if known is not None and known["id"] == order.id and self._active_version(order.model) == order.version:
                return  # a retained order already carried out
            self._orders[order.model] = {"id": order.id, "version": order.version}
            self._save_orders()
            self._pull_and_swap(order.model, None, order.version, allow_older=order.allow_older, order=order.id)
