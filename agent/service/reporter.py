"""The device's signed report on the deployment order it follows, retained on `<prefix>/<device>/report`.

The updater tells the reporter which order it starts (`begin`), the daemon hands it every event
(`observe`), and it turns the events about that order into a report's state: downloading, verifying,
active (every pipeline serves the version), refused, rolled back, rollback failed, error. While the
version is young, `tick` publishes it again with fresh vitals, counted from the swap: inferences,
failed ones, NaN outputs, dropped frames, and the inference p95 against the previous version's own p95
taken just before the swap (the same figures probation judges). Each report names the order (its
nonce) and is signed with the device's identity key (`agent.service.identity`): the rollout
controller counts nothing else.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.models.probation import Marks, p95
from agent.service.identity import load_or_create, sign_report
from agent.transport.contract.events import (
    ModelActive,
    ModelDownloading,
    ModelErrorEvent,
    ModelEvent,
    ModelProbationPassed,
    ModelRefused,
    ModelRollbackFailed,
    ModelRolledBack,
    ModelVerifying,
)
from agent.transport.contract.report import DeviceReport, ReportState, Vitals
from agent.util.timefmt import utc_iso

if TYPE_CHECKING:
    from agent.inference.stats import PipelineStats
    from agent.models.deploy import DeployOrder
    from agent.models.updater import Updater
    from agent.transport.events import Event

log = logging.getLogger(__name__)

VITALS_EVERY = 5.0  # seconds between two reports of a young version's vitals
VITALS_FOR = 600.0  # how long after the swap vitals are reported again

_STATES: dict[type[ModelEvent], ReportState] = {
    ModelDownloading: "downloading",
    ModelVerifying: "verifying",
    ModelActive: "active",
    ModelProbationPassed: "active",
    ModelRefused: "refused",
    ModelRolledBack: "rolled-back",
    ModelRollbackFailed: "rollback-failed",
    ModelErrorEvent: "error",
}


class Reporter:
    def __init__(
        self,
        device: str,
        key: Ed25519PrivateKey,
        publish: Callable[[bytes], None],
        stats: Callable[[str], Mapping[str, PipelineStats]],
        digest: Callable[[str], tuple[str | None, str | None]],
    ) -> None:
        """`publish(payload)`: retained on the report topic; `stats(model)`: its pipelines' counters;
        `digest(model)`: (digest, variant) of the active version."""
        self.device, self.key, self._publish, self._stats, self._digest = device, key, publish, stats, digest
        self._lock = threading.Lock()
        self.order: DeployOrder | None = None
        self.last: DeviceReport | None = None
        self.previous: str | None = None
        self.previous_provider: str | None = None
        self.baseline: float | None = None
        self.marks: dict[str, Marks] = {}
        self.swapped: float | None = None
        self.sent = 0.0

    def begin(self, order: DeployOrder, running: str | None) -> None:
        """The updater starts on `order` (the device runs `running`): the baseline is taken now."""
        stats = self._stats(order.model)
        with self._lock:
            self.order, self.last, self.swapped, self.marks = order, None, None, {}
            self.previous = running
            self.previous_provider = next((s["provider"] for s in stats.values()), None)
            self.baseline = p95(stats)

    def current(self, order: DeployOrder) -> None:
        """The order names the version already active: nothing to do, and the device says so."""
        with self._lock:
            if self.order is not None and self.order.id == order.id:
                self.swapped = time.monotonic()
                self.marks = {n: Marks.of(s) for n, s in self._stats(order.model).items()}
                self._send("active", self.previous_provider)

    def observe(self, event: Event) -> None:
        body = event.body
        state = _STATES.get(type(body)) if isinstance(body, ModelEvent) else None
        with self._lock:
            order = self.order
            if state is None or order is None or not isinstance(body, ModelEvent) or body.model != order.model:
                return
            if body.order is not None and body.order != order.id:
                return
            if body.order is None and body.version != order.version:
                return
            reason = getattr(body, "reason", None)
            provider = variant = None
            if isinstance(body, ModelActive):
                self.swapped = time.monotonic()
                self.marks = {n: Marks.of(s) for n, s in self._stats(order.model).items()}
                provider = body.provider
            elif isinstance(body, ModelProbationPassed) and self.last is not None:
                provider = self.last.provider
            elif isinstance(body, (ModelDownloading, ModelVerifying)):
                variant = body.variant
            self._send(state, provider, reason if isinstance(reason, str) else None, variant)

    def tick(self) -> None:
        """Publish a young active version's vitals again (the updater's loop calls this every second)."""
        with self._lock:
            last = self.last
            if last is None or last.state != "active" or self.swapped is None:
                return
            now = time.monotonic()
            if now - self.swapped > VITALS_FOR or now - self.sent < VITALS_EVERY:
                return
            self._send("active", last.provider)

    def _vitals(self, model: str) -> Vitals | None:
        if self.swapped is None:
            return None
        stats = self._stats(model)
        runs = errors = nan = drops = 0
        for name, s in stats.items():
            mark = self.marks.get(name, Marks(0, 0, 0))
            runs += s["inferences"] - mark.inferences
            errors += s["inference_errors"] - mark.errors
            nan += s["nan_outputs"] - mark.nan
            drops += s["dropped"]
        return Vitals(
            inferences=runs,
            errors=errors,
            nan=nan,
            drops=drops,
            p95_ms=p95(stats),
            baseline_p95_ms=self.baseline,
            active_s=round(time.monotonic() - self.swapped, 1),
        )

    def _send(
        self, state: ReportState, provider: str | None = None, reason: str | None = None, variant: str | None = None
    ) -> None:
        order = self.order
        assert order is not None  # callers checked, under the lock
        digest, active_variant = self._digest(order.model)
        running = next((s["model_version"] for s in self._stats(order.model).values()), None)
        before = self.previous_provider
        report = DeviceReport(
            schema=1,
            device=self.device,
            order=order.id,
            ts=utc_iso(time.time()),
            model=order.model,
            version=order.version,
            state=state,
            running=running,
            digest=digest,
            variant=variant or active_variant,
            provider=provider,
            previous=self.previous,
            previous_provider=before,
            # A fall back to the CPU from the accelerator the previous version ran on here.
            fallback=bool(provider and before and provider != before and provider.startswith("CPU")),
            reason=reason,
            vitals=self._vitals(order.model) if state == "active" else None,
        )
        self.last, self.sent = report, time.monotonic()
        self._publish(sign_report(self.key, report))  # retained, and sent again on every connect
        log.debug("report order=%s state=%s", order.id, state)


def reporter_for(updater: Updater) -> Reporter | None:
    """The updater's reporter: with a broker only (the reports are for the fleet)."""
    connection = updater.parts.connection
    if connection is None:
        return None
    device, store = updater.profile.device, updater.store

    def active_file(model: str) -> tuple[str | None, str | None]:
        active = store.active(model)
        return (active.digest, active.variant.id) if active is not None else (None, None)

    return Reporter(
        device.id,
        load_or_create(device.state_dir),
        lambda payload: connection.publish_latest(connection.topics.report, payload),
        lambda model: {p.name: p.stats() for p in updater.pipelines_of(model)},
        active_file,
    )
