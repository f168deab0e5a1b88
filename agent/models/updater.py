"""Keeping registry models current on a running device, and backing out of bad ones.

Sources of an update: the channel poll (every `registry.poll_interval`), a deployment order from the
cloud (retained on the deploy topics), or the `update` command. Each ends in the same steps: the
registry client pulls, verifies and tests the version into the store, then every pipeline serving the
model swaps to it between two frames. A version that fails to load is rolled back at once; one that
loads is on probation (agent.models.probation): worse latency, more errors or NaN outputs than the
version before roll it back. A version that killed the process while it loaded or warmed up is
remembered by the crash guard and rolled back at the next start.

Every version a rollback leaves, and every version refused after a try, is held by the store: no
channel poll, order, profile pin or `update` command installs it again, until an operator overrides
the hold by naming it (an order with `allow_older`, the `rollback` command with its `version`).
Withdrawing an order (an empty retained payload) forgets it, and the model follows the profile again.
An order is believed only under the registry's keys of the moment (the root chain is followed first,
so a revoked key is refused even by a device back from days offline), and it is recorded only once
carried out (agent.models.orders): a refused or replayed order never changes what the device follows.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Literal, TypedDict

from agent.models.crashguard import CrashGuard
from agent.models.fetch import FetchError, RefusalError
from agent.models.orderinbox import OrderInbox
from agent.models.orders import OrderBook
from agent.models.probation import Probation
from agent.models.store import StoreError
from agent.service.reporter import reporter_for
from agent.transport.contract.events import RollbackCause
from agent.transport.events import Event
from agent.util.worker import Worker

if TYPE_CHECKING:  # the daemon builds the updater and hands itself over: a runtime import would be a cycle
    from agent.inference.pipeline import Pipeline
    from agent.service.daemon import Daemon
    from agent.transport.subscriptions import Incoming

log = logging.getLogger(__name__)

JOIN_TIMEOUT = 30.0  # an update step in progress (a download, a swap) finishes before stop returns
# After the broker acknowledged the subscriptions of a connection, how long its retained orders may take to
# arrive: a saved order whose topic sent nothing by then was withdrawn while the device was away.
RETAINED_GRACE = 10.0


class UpdateSummary(TypedDict):
    """One model's outcome of an update, as the `update` command replies it."""

    model: str
    # A PullResult status; "activated" becomes "active", or "rolled-back" when the swap failed.
    status: Literal["activated", "current", "held", "refused", "failed", "active", "rolled-back"]
    version: str | None
    reason: str | None


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
        device = self.profile.device
        self.orders = OrderBook(device.state_dir, device.id, device.group)
        self._heard: dict[str, int] = {}  # deploy topic -> the connection (its `connects` count) it was heard on
        self._retained_check: tuple[int, float] | None = None  # (connection, when its subscriptions were seen acked)
        self._checked_connection = 0
        self._probation: dict[str, Probation] = {}
        # Deploy topic -> its latest payload not carried out yet (the registry was unreachable, or a newer
        # order was followed): tried again at each poll and on a withdrawal, checked again each time.
        self._pending: dict[str, bytes] = {}
        # `_lock` orders the pulls (polls, orders, `update`): held across the network. `_swap_lock` guards
        # what a rollback changes (the active version, the pipelines, probation) and is never held across
        # the network, so that an operator's rollback is answered while a pull is stuck (issue 17, item 1).
        self._lock = threading.RLock()
        self._swap_lock = threading.RLock()
        self._wake = threading.Event()
        self._worker = Worker("updater", self._run, join_timeout=JOIN_TIMEOUT, wake=self._wake.set)
        self._inbox = OrderInbox(self._apply_order)  # orders in arrival order, on one thread
        self.reporter = reporter_for(self)  # signed reports on deployment orders (with a broker only)

    def observe(self, event: Event) -> None:
        """Every event the daemon emits: the reporter turns those about the order it follows into reports."""
        if self.reporter is not None:
            self.reporter.observe(event)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> Updater:
        self.settle_loads()
        self._inbox.start()
        self._subscribe_orders()
        self._worker.start()
        return self

    def stop(self) -> None:
        self._worker.stop()
        self._inbox.stop()

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
                self._forget_orders_withdrawn_while_away()
                if self.reporter is not None:
                    self.reporter.tick()
            except Exception as exc:  # the update loop must outlive one bad update
                log.exception("update step failed")
                self.daemon.emit(Event("update.error", {"reason": f"{type(exc).__name__}: {exc}"}))

    # -- what to follow --------------------------------------------------------------------------

    def targets(self) -> dict[str, tuple[str | None, str | None]]:
        """model -> (channel, pinned version): a deployment order's version beats the profile's channel."""
        out: dict[str, tuple[str | None, str | None]] = {}
        for config in self.profile.registry_pipelines:
            order = self.orders.effective(config.model)
            out[config.model] = (None, order["version"]) if order else (config.channel, config.version)
        return out

    def update(self, only: str | None = None) -> list[UpdateSummary]:
        """Check the registry now; swap pipelines to what it activated. Returns one summary per model."""
        summaries: list[UpdateSummary] = []
        with self._lock:
            for topic, gone in self.orders.expire():
                log.info(
                    "deployment order %s on %s expired; %s follows its profile again", gone["id"], topic, gone["model"]
                )
            self._retry_pending()
            for model, (channel, version) in self.targets().items():
                if only is not None and model != only:
                    continue
                summaries.append(self._pull_and_swap(model, channel, version, allow_older=False))
        return summaries

    def _pull_and_swap(
        self,
        model: str,
        channel: str | None,
        version: str | None,
        allow_older: bool,
        order: str | None = None,
        override_hold: bool = False,
    ) -> UpdateSummary:
        """One update step. `override_hold`: the request names a version on purpose (an order with
        `allow_older`), so a hold on it, and a crash mark, are lifted."""
        before = self.store.active(model)
        if version is not None and override_hold:
            self.guard.forget(model, version)
        elif version is not None:
            reason = self.guard.should_skip(model, version)
            if reason:
                if order is not None:
                    self.daemon.emit(
                        Event("model.refused", {"model": model, "version": version, "reason": reason, "order": order})
                    )
                return {"model": model, "status": "refused", "version": version, "reason": reason}
        result = self.registry.check_and_pull(
            model, channel, version, allow_older=allow_older, override_hold=override_hold
        )
        if result.status == "held" and order is not None:  # polls stay quiet; an order gets its answer
            self.daemon.emit(
                Event("model.refused", {"model": model, "version": version, "reason": result.reason, "order": order})
            )
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
        with self._swap_lock:
            self._swap(model, previous, order)

    def _swap(self, model: str, previous: str | None, order: str | None) -> None:
        from agent.inference.runtime import ModelError

        active = self.store.active(model)
        if active is None:
            return
        pipelines = self.pipelines_of(model)
        probation = self.settings.probation
        trial = Probation.begin(
            model, active.version, previous, probation.duration, {p.name: p.stats() for p in pipelines}, order
        )
        self.guard.begin(model, active.version, previous=previous)
        try:
            for pipeline in pipelines:
                pipeline.swap(active.path, version=active.version, name=model)
        except (ModelError, OSError) as exc:
            self.guard.abandon(model, active.version)
            self._roll_back(model, active.version, f"the new version did not load in a pipeline: {exc}", "load", order)
            return
        # Loaded and warmed up in every pipeline: from here on a death is not this version's doing.
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
        if pipelines and previous is not None and probation.duration > 0:
            self._probation[model] = trial

    def _roll_back(
        self, model: str, bad: str, reason: str, cause: RollbackCause, order: str | None = None, to: str | None = None
    ) -> None:
        """Back from `bad` to `to` (or the version before it), which the store then holds with `reason`."""
        with self._swap_lock:
            self._roll_back_now(model, bad, reason, cause, order, to)

    def _roll_back_now(
        self, model: str, bad: str, reason: str, cause: RollbackCause, order: str | None, to: str | None
    ) -> None:
        self._probation.pop(model, None)
        try:
            with self.store.lock():  # held briefly by a pull: only to decide and to install
                restored = self.store.rollback(model, to, reason=reason)
        except (StoreError, OSError) as exc:
            if cause == "command":  # the operator's request: an error reply, not an event
                raise ValueError(str(exc)) from None
            # Nothing to go back to: say so and keep serving.
            self.daemon.emit(
                Event(
                    "model.rollback_failed",
                    {
                        "model": model,
                        "version": bad,
                        "reason": f"{reason}; rollback failed: {exc}",
                        "cause": cause,
                        **({"order": order} if order else {}),
                    },
                )
            )
            return
        for pipeline in self.pipelines_of(model):
            if pipeline.stats()["model_version"] != restored.version:
                pipeline.swap(restored.path, version=restored.version, name=model)
        self.daemon.emit(
            Event(
                "model.rolled_back",
                {
                    "model": model,
                    "version": bad,
                    "to": restored.version,
                    "reason": reason,
                    "cause": cause,
                    **({"order": order} if order else {}),
                },
            )
        )

    def rollback(self, model: str, version: str | None = None) -> dict[str, str | None]:
        """The operator's rollback (command): to `version`, or one step back in the model's history; the
        version left is held. ValueError (one line) when there is nowhere to go. Never waits for a pull."""
        with self._swap_lock:
            try:
                current = self.store.active(model)
            except StoreError as exc:  # a damaged pointer or version: the operator's answer, not a crash
                raise ValueError(str(exc)) from None
            if current is None:
                raise ValueError(f"model {model!r} has no active version")
            reason = "rolled back by the rollback command" + (f" (to {version})" if version else "")
            self._roll_back(model, current.version, reason, "command", to=version)
            return {"model": model, "version": self._active_version(model), "from": current.version}

    # -- the crash guard and probation -----------------------------------------------------------

    def settle_loads(self) -> None:
        """At start, once the pipelines are up: every load the crash guard watched has ended in this
        process, loaded or failed with a handled error. Neither is a death, and a power cut from now on
        (before any data arrives, say) must not count as one."""
        for model in sorted({c.model for c in self.profile.registry_pipelines}):
            attempt = self.guard.pending(model)
            if attempt is None or not attempt.mine:
                continue
            if any(p.stats()["model_version"] == attempt.version for p in self.pipelines_of(model)):
                self.guard.succeeded(model, attempt.version)
            else:
                self.guard.abandon(model, attempt.version)

    def _judge_probation(self) -> None:
        for model, trial in list(self._probation.items()):
            reason, enough = trial.verdict(
                {p.name: p.stats() for p in self.pipelines_of(model)}, self.settings.probation
            )
            if reason:
                self._roll_back(model, trial.version, f"probation failed: {reason}", "probation", trial.order)
            elif time.monotonic() >= trial.until and enough:
                self._probation.pop(model)
                self.daemon.emit(
                    Event(
                        "model.probation_passed",
                        {"model": model, "version": trial.version, **({"order": trial.order} if trial.order else {})},
                    )
                )

    # -- deployment orders -----------------------------------------------------------------------

    def _subscribe_orders(self) -> None:
        connection = self.parts.connection
        if connection is None:
            return
        for topic in (connection.topics.deploy, connection.topics.fleet_deploy):
            connection.subscribe(topic, self._on_order)

    def _on_order(self, message: Incoming) -> None:
        # On the network thread: hand the work to the inbox's thread, never block paho's loop.
        if self.parts.connection is not None:
            self._heard[message.topic] = self.parts.connection.connects
        self._inbox.put(message.topic, message.payload)

    def _apply_order(self, topic: str, payload: bytes) -> None:
        from agent.models.deploy import OrderError, applies_to, parse_order

        with self._lock:
            self._pending.pop(topic, None)
        if not payload:
            self._withdraw(topic)
            return
        try:
            order = parse_order(payload, self.registry.order_keys)  # fetched only for an envelope
        except (OrderError, RefusalError) as exc:
            order_id = exc.order_id if isinstance(exc, OrderError) else None
            self.daemon.emit(Event("deploy.refused", {"topic": topic, "order": order_id, "reason": str(exc)}))
            return
        except FetchError as exc:  # the registry's keys are not known now: believe nothing yet
            log.info("deployment order on %s waits for the registry (%s)", topic, exc)
            with self._lock:
                self._pending[topic] = payload
            return
        assert order is not None  # an empty payload was handled above
        device = self.profile.device
        if not applies_to(order, device.id, device.group):
            return  # for another device
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
            replay = self.orders.replay(topic, order)
            if replay is not None:
                self.daemon.emit(Event("deploy.refused", {"topic": topic, "order": order.id, "reason": replay}))
                return
            self.orders.saw(topic, order)
            known = self.orders.get(topic)
            if self.orders.superseded_by(order) is not None:
                self._pending[topic] = payload  # followed should the newer order be withdrawn
                return
            if (
                known is not None
                and known["id"] == order.id
                and (
                    self._active_version(order.model) == order.version
                    or self.store.held_reason(order.model, order.version) is not None
                )
            ):
                return  # a retained order already carried out, or already answered with a refusal
            if self.reporter is not None:
                self.reporter.begin(order, self._active_version(order.model))
            done = self._pull_and_swap(
                order.model,
                None,
                order.version,
                allow_older=order.allow_older,
                order=order.id,
                override_hold=order.allow_older,
            )
            if done["status"] == "current" and self.reporter is not None:
                self.reporter.current(order)
            if done["status"] in ("active", "current"):  # carried out: only now is it followed
                self.orders.put(topic, order)
            elif done["status"] == "failed":  # the registry or the disk failed: tried again at the next poll
                self._pending[topic] = payload

    def _retry_pending(self) -> None:
        with self._lock:
            waiting = list(self._pending.items())
            for topic, payload in waiting:
                self._apply_order(topic, payload)

    def _forget_orders_withdrawn_while_away(self) -> None:
        """An order withdrawn while the device was offline leaves nothing retained, so no empty payload
        ever reaches it: once a connection's subscriptions are acknowledged and RETAINED_GRACE has passed,
        an order (carried out, or only seen) whose topic sent nothing on that connection is withdrawn."""
        connection = self.parts.connection
        if connection is None or connection.connects == self._checked_connection or not connection.wait_online(0):
            return
        current = connection.connects
        if self._retained_check is None or self._retained_check[0] != current:
            self._retained_check = (current, time.monotonic())
            return
        if time.monotonic() - self._retained_check[1] < RETAINED_GRACE:
            return
        self._checked_connection = current
        for topic in self.orders.live_topics():
            if self._heard.get(topic) != current:
                self._withdraw(topic)

    def _withdraw(self, topic: str) -> None:
        """An empty retained payload: forget the topic's order; the model follows what is left (another
        order, else the profile's channel or pin, older than the active version or not)."""
        with self._lock:
            gone, seen = self.orders.withdraw(topic)
            last = gone or seen  # the order carried out from the topic, else the one last heard there
            if last is None:
                return
            model = last["model"]
            self.daemon.emit(
                Event(
                    "deploy.withdrawn",
                    {"model": model, "version": last["version"], "order": last["id"], "topic": topic},
                )
            )
            if gone is None:
                return  # never carried out: what the device follows does not change
            self._retry_pending()  # an order the withdrawn one had superseded, if the broker still holds one
            if model not in {c.model for c in self.profile.registry_pipelines}:
                return
            channel, version = self.targets()[model]
            self._pull_and_swap(model, channel, version, allow_older=True)
