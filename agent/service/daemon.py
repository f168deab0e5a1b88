"""The daemon: builds the parts in order, runs until told to stop, stops them in reverse.

Order: profile (given) -> sink (outbox + MQTT with the commands subscribed, or stdout) -> store and registry -> models -> pipelines
(each starts as soon as its model is loaded) -> probe -> health -> updates -> endpoint -> status page ->
commands -> systemd READY: nothing that the first result need not wait for runs before the pipelines. Stop: pipelines finish the frame in hand,
the outbox is flushed to the broker for a bounded time, `offline` is published, then everything closes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from agent import __version__
from agent.config.errors import ProfileError
from agent.config.profile import PipelineConfig, Profile, load_profile
from agent.inference.loader import open_pipelines, start_pipelines
from agent.inference.pipeline import Pipeline
from agent.service import notify
from agent.service.serving import models_health
from agent.transport.events import Event, Sink, log_event
from agent.transport.sinks.stdout import StdoutSink
from agent.util import redact
from agent.util.timeline import START

if TYPE_CHECKING:
    # The parts a profile may not use (a broker, a registry, the status page) are imported where they are
    # built: a start pays nothing for what it does not run, and nothing before its first result (issue 15).
    from agent.device.hardware import Probe
    from agent.inference.runtime import Model
    from agent.models.registry import RegistryClient
    from agent.models.store import Store
    from agent.models.updater import Updater
    from agent.service.commands.dispatch import CommandDispatcher
    from agent.service.endpoint.server import InferenceEndpoint
    from agent.service.health import HealthReporter
    from agent.service.homeassistant import HomeAssistantDiscovery
    from agent.service.statuspage import Frame, StatusSnapshot
    from agent.transport.connection import Connection
    from agent.transport.outbox import Outbox
    from agent.transport.pump import OutboxPump

log = logging.getLogger(__name__)

# The daemon's start waits this long at most for the pipelines' first results before the rest of the start
# (a camera that is not there yet holds up health, commands and READY by this much, no more).
FIRST_RESULTS_S = 1.0
FLUSH_TIMEOUT = 10.0  # on SIGTERM, how long queued results may take to reach the broker


class DaemonError(RuntimeError):
    """The daemon cannot serve at all (the CLI turns this into its failure exit code)."""


@dataclass
class Parts:
    """What `start()` built; `stop()` closes it in reverse. Without a broker `stdout` is the sink and
    `connection`, `outbox` and `pump` are None."""

    sink: Sink
    closers: list[tuple[str, Callable[[], None]]]
    stdout: StdoutSink | None = None
    connection: Connection | None = None
    outbox: Outbox | None = None
    pump: OutboxPump | None = None
    store: Store | None = None
    registry: RegistryClient | None = None
    health: HealthReporter | None = None
    updater: Updater | None = None
    discovery: HomeAssistantDiscovery | None = None
    endpoint: InferenceEndpoint | None = None
    commands: CommandDispatcher | None = None
    pipelines: dict[str, Pipeline] = field(default_factory=dict)


@dataclass(frozen=True)
class Reloaded:
    """What a reload did: `scope` "nothing" (the file is unchanged), "pipelines" (those in `changed`
    restarted) or "agent" (sections in `changed` differ: every part restarts); `pipelines` run after it."""

    scope: Literal["nothing", "pipelines", "agent"]
    changed: list[str]
    pipelines: list[str]


class Daemon:
    def __init__(self, profile: Profile, profile_path: Path | None = None) -> None:
        self.profile = profile
        self.profile_path = profile_path
        self.parts: Parts | None = None
        # A restart a command asked for: done by the thread in `run`, never by the command thread, which
        # the restart stops (issue 17, item 7).
        self._restart_with: Profile | None = None
        self.started_at = time.time()
        self.watchdog = notify.Watchdog()

    # -- events --------------------------------------------------------------------------------

    def emit(self, event: Event) -> None:
        masked = redact.doc(event.fields)
        if masked != event.fields:  # a camera URL's password in source.lost, say
            event = Event(event.type, masked, event.ts)
        log_event(event)
        if self.parts is not None and self.parts.sink is not None:
            try:
                self.parts.sink.event(event)
            except Exception:  # an event must never take down its producer
                log.exception("event not queued type=%s", event.type)
        if self.parts is not None and self.parts.health is not None:
            self.parts.health.poke()
        if self.parts is not None and self.parts.updater is not None:
            self.parts.updater.observe(event)  # the signed report on a deployment order

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        profile = self.profile
        state_dir = Path(profile.device.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        parts = self.parts = self._open_transport(state_dir)
        self._listen_for_commands(parts)
        START.mark("results sink open")
        self._open_registry(parts)
        self._bring_models(parts)
        notify.status("starting: loading pipelines")
        self.start_pipelines(profile.pipelines, settle=FIRST_RESULTS_S)
        START.mark("pipelines started")
        # What no result waits for comes after the pipelines' first results (cold start): their events, the
        # probe for health, health, updates, the status page, then the commands (queued since the connection
        # opened). On two cores these took the first frame's CPU: the events' contract alone (pydantic) ~0.1 s.
        from agent.device.hardware import probe

        found = probe(state_dir=state_dir)
        log.info("probe arch=%s cpu=%r accelerators=%d", found.cpu.arch, found.cpu.model, len(found.accelerators))
        self._start_health(parts, found)
        self._start_homeassistant(parts)
        self._start_updates(parts)
        self._start_endpoint(parts)
        self._start_status_page(parts)
        self._start_commands(parts)  # last: what arrived meanwhile waited, and finds every part it may ask for
        self.watchdog.register("pipelines", self._pipelines_alive)
        connection = parts.connection
        if connection is not None:
            self.watchdog.register("mqtt", lambda: None if connection.alive else "the MQTT loop thread ended")
        self.watchdog.start()
        notify.ready(self.status_line())
        START.mark("daemon ready")
        self.emit(Event("agent.started", {"version": __version__, "pipelines": sorted(parts.pipelines)}))

    def stop(self) -> None:
        parts = self.parts
        if parts is None:
            return
        notify.stopping("stopping: finishing the frames in hand")
        self.watchdog.stop()
        for name, close in reversed(parts.closers):  # events while stopping still reach the outbox
            try:
                close()
            except Exception:  # stop everything else even when one part fails
                log.exception("stopping %s failed", name)
        self.parts = None

    def run(self, stop: threading.Event, reload: threading.Event | None = None) -> int:
        """Serve until `stop`; re-read the profile whenever `reload` is set (SIGHUP).

        Without a broker (results on stdout) the run ends by itself when every source was finite and
        has ended, or when stdout's reader went away; with a broker the daemon keeps serving commands
        and updates even when no pipeline runs. DaemonError when there is nothing to serve.
        """
        reload = reload or threading.Event()
        self.start()
        parts = self.parts
        assert parts is not None  # start() sets it
        try:
            if parts.connection is None and self.profile.pipelines and not parts.pipelines:
                raise DaemonError("no pipeline could start (see the events above)")
            while not stop.wait(0.5):
                if reload.is_set():
                    reload.clear()
                    self.reload()
                restart, self._restart_with = self._restart_with, None
                if restart is not None:
                    self._restart(restart)
                if self._stdout_run_over():
                    break
                notify.status(self.watchdog_problem() or self.status_line())
        finally:
            failed = [
                n for n, p in (self.parts.pipelines.items() if self.parts else ()) if p.stats()["state"] == "failed"
            ]
            self.stop()
        return 1 if failed else 0

    def _stdout_run_over(self) -> bool:
        parts = self.parts
        if parts is None or parts.stdout is None:
            return False
        if parts.stdout.broken.is_set():  # its reader went away
            log.info("stdout was closed by its reader: stopping")
            return True
        return bool(parts.pipelines) and all(p.finished for p in parts.pipelines.values())

    def reload(self, defer_restart: bool = False) -> Reloaded | None:
        """Re-read the profile; an invalid one is an event (None) and the running one stays.
        `defer_restart`: a change outside `pipelines` restarts the agent from `run`'s thread, after
        this returns (a command's thread must reply, and the restart stops it)."""
        if self.profile_path is None:
            return None
        try:
            new = load_profile(self.profile_path, files="service", snapshot=True)
        except ProfileError as exc:
            first = exc.issues[0]
            self.emit(Event("profile.invalid", {"reason": str(first), "errors": len(exc.issues)}))
            return None
        notify.reloading("reloading the profile")
        if new == self.profile:
            notify.ready(self.status_line())
            return Reloaded("nothing", [], sorted(self.parts.pipelines) if self.parts else [])
        sections = sorted(
            f.name
            for f in dataclasses.fields(new)
            if f.name != "pipelines" and getattr(new, f.name) != getattr(self.profile, f.name)
        )
        if sections or self.parts is None:
            running = sorted(p.name for p in new.pipelines if p.enabled)
            if defer_restart:
                self._restart_with = new
            else:
                self._restart(new)
            return Reloaded("agent", sections, running)
        changed = self._restart_changed_pipelines(new)
        if self.parts.discovery is not None:
            self.parts.discovery.publish(new.pipelines)  # a pipeline gone takes its entities with it
        self._reloaded()
        return Reloaded("pipelines", changed, sorted(self.parts.pipelines))

    def _restart(self, new: Profile) -> None:
        """Every part stopped and started again under `new` (a change outside `pipelines`)."""
        self.stop()
        self.profile = new
        self.start()
        self._reloaded()

    def _reloaded(self) -> None:
        self.emit(Event("profile.reloaded", {"pipelines": sorted(self.parts.pipelines) if self.parts else []}))
        notify.ready(self.status_line())

    # -- parts -----------------------------------------------------------------------------------

    def _open_transport(self, state_dir: Path) -> Parts:
        """The sink every producer writes to: the outbox and its broker connection, or stdout."""
        mqtt = self.profile.mqtt
        if mqtt is None:
            stdout = StdoutSink(state_dir)
            return Parts(sink=stdout, stdout=stdout, closers=[("stdout", stdout.close)])
        from agent.transport.connection import Connection
        from agent.transport.outbox import open_outbox
        from agent.transport.pump import OutboxPump
        from agent.transport.sinks.outbox import OutboxSink

        outbox = open_outbox(state_dir, mqtt.outbox)
        connection = Connection(mqtt, self.profile.device, agent_version=__version__)
        pump = OutboxPump(connection, outbox)
        sink = OutboxSink.for_profile(outbox, connection.topics, mqtt, self.profile.pipelines)
        sink.start()
        pump.start()
        connection.start()

        def close_mqtt() -> None:
            sink.stop()
            notify.status("stopping: delivering queued results")
            if not pump.flush(FLUSH_TIMEOUT):
                log.warning("outbox not empty at exit depth=%d (kept on disk for the next start)", outbox.depth)
            pump.stop()
            connection.stop()
            outbox.close()

        return Parts(sink=sink, connection=connection, outbox=outbox, pump=pump, closers=[("mqtt", close_mqtt)])

    def _open_registry(self, parts: Parts) -> None:
        if self.profile.registry is None:
            return
        from agent.models.registry import RegistryClient

        registry = parts.registry = RegistryClient.from_profile(self.profile, emit=self.emit)
        parts.store = registry.store
        registry.store.recover()

    def _bring_models(self, parts: Parts) -> None:
        """Registry models with nothing active yet are pulled before their pipelines start."""
        if parts.registry is None:
            return
        from agent.models.startguard import skip_crashing_versions

        store = parts.registry.store
        for config in self.profile.registry_pipelines:
            if store.active(config.model) is None:
                notify.status(f"starting: pulling {config.model}")
                parts.registry.check_and_pull(config.model, config.channel, config.version)
        skip_crashing_versions(store, self.profile, self.emit)

    def start_pipelines(self, configs: tuple[PipelineConfig, ...], settle: float = 0.0) -> None:
        """Open and start these pipelines; one that cannot start is an event (pipeline.failed), not an error.
        `settle`: wait up to this long for their first results before they announce themselves (or ended)."""
        parts = self.parts
        if parts is None:
            return
        resolve = parts.store.resolve if parts.store is not None else None
        trial = None
        if parts.registry is not None:
            from agent.models.startguard import versions_on_trial

            trial = versions_on_trial(self.profile)
        pipelines = open_pipelines(
            self.profile,
            parts.sink,
            emit=self.emit,
            resolve=resolve,
            mqtt=parts.connection,
            on_trial=trial,
            only={config.name for config in configs},
        )
        for pipeline in start_pipelines(pipelines, settle):
            parts.pipelines[pipeline.name] = pipeline
        if not any(name == "pipelines" for name, _ in parts.closers):
            parts.closers.append(("pipelines", self.stop_pipelines))

    def stop_pipelines(self, names: list[str] | None = None) -> None:
        """Stop these running pipelines (all when None); names not running are ignored."""
        parts = self.parts
        if parts is None:
            return
        for name in list(parts.pipelines) if names is None else names:
            pipeline = parts.pipelines.pop(name, None)
            if pipeline is not None:
                pipeline.stop()

    def _restart_changed_pipelines(self, new: Profile) -> list[str]:
        """The pipelines that differ stopped and started under `new`; returns their names (new ones too)."""
        parts = self.parts
        assert parts is not None
        old = {p.name: p for p in self.profile.pipelines}
        fresh = {p.name: p for p in new.pipelines if p.enabled}
        changed = [n for n in old if n not in fresh or old[n] != fresh[n]]
        self.stop_pipelines([n for n in changed if n in parts.pipelines])
        self.profile = new
        self.start_pipelines(tuple(p for n, p in fresh.items() if n not in parts.pipelines))
        return sorted(set(changed) | (set(fresh) - set(old)))

    def _start_health(self, parts: Parts, found: Probe) -> None:
        connection, outbox = parts.connection, parts.outbox
        if connection is None or outbox is None:
            return
        from agent.service.health import HealthReporter

        health = HealthReporter(
            lambda payload: connection.publish_latest(connection.topics.health, payload),
            interval=self.profile.health.interval,
            device=self.profile.device.id,
            state_dir=self.profile.device.state_dir,
            agent_version=__version__,
        )
        health.add_source("group", lambda: self.profile.device.group)
        # A pipeline's stats name its source (a camera URL): masked like everything else that leaves
        health.add_source("pipelines", lambda: redact.doc({n: p.stats() for n, p in list(parts.pipelines.items())}))
        health.add_source("models", self._models_health)
        health.add_source("outbox", lambda: outbox.stats().as_dict())
        health.add_source("connection", connection.health)
        health.add_source("hardware", lambda: {"arch": found.cpu.arch, "fingerprint": found.fingerprint()})
        parts.health = health.start()
        parts.closers.append(("health", health.stop))

    def _listen_for_commands(self, parts: Parts) -> None:
        """Subscribe to the commands with the connection, before anything else starts: a command sent as
        soon as the first result shows waits in the dispatcher's queue instead of being lost while the
        pipelines start (the handlers answer once `_start_commands` has run)."""
        if parts.connection is None:
            return
        from agent.service.commands.dispatch import CommandDispatcher

        parts.commands = CommandDispatcher(self.profile.device.id, events=self.emit).attach(parts.connection)

    def _start_commands(self, parts: Parts) -> None:
        dispatcher = parts.commands
        if dispatcher is None:
            return
        from agent.service.commands.handlers import register_commands

        register_commands(dispatcher, self)
        dispatcher.start()
        parts.closers.append(("commands", dispatcher.stop))

    def _start_homeassistant(self, parts: Parts) -> None:
        if parts.connection is None or not self.profile.homeassistant.enabled:
            return
        from agent.service.homeassistant import HomeAssistantDiscovery

        discovery = HomeAssistantDiscovery(self.profile.homeassistant, parts.connection, __version__)
        parts.discovery = discovery.start(self.profile.pipelines)

    def _start_updates(self, parts: Parts) -> None:
        if parts.registry is None:
            return
        from agent.models.updater import Updater

        updater = parts.updater = Updater(self).start()
        parts.closers.append(("updates", updater.stop))

    def _start_status_page(self, parts: Parts) -> None:
        if self.profile.runtime.http is None:
            return
        from agent.service.statuspage import ConnectionStatus, StatusServer, StatusSnapshot

        def snapshot() -> StatusSnapshot:
            connection, outbox = parts.connection, parts.outbox
            pipelines = list(parts.pipelines.values())
            return StatusSnapshot(
                device=self.profile.device.id,
                agent_version=__version__,
                uptime_s=round(time.time() - self.started_at, 1),
                connection=ConnectionStatus.from_health(connection.health()) if connection is not None else None,
                outbox=outbox.stats() if outbox is not None else None,
                pipelines=tuple(redact.doc(p.stats()) for p in pipelines),
                latency={p.name: p.timings.histograms() for p in pipelines},
                endpoint=parts.endpoint.stats.figures() if parts.endpoint is not None else None,
            )

        def frame(name: str) -> Frame | None:
            pipeline = parts.pipelines.get(name)
            return pipeline.latest_frame() if pipeline is not None else None

        server = StatusServer(self.profile.runtime.http, snapshot=snapshot, frame=frame, alive=self.watchdog_problem)
        server.start()
        parts.closers.append(("status page", server.stop))

    def _start_endpoint(self, parts: Parts) -> None:
        """The KServe v2 endpoint: it serves each model in the session its pipelines run, as of each request."""
        if not self.profile.endpoint.enabled:
            return
        from agent.service.endpoint.server import EndpointError, InferenceEndpoint

        def models() -> dict[str, Model]:
            served: dict[str, Model] = {}
            for pipeline in list(parts.pipelines.values()):
                served.setdefault(pipeline.model.name, pipeline.model)
            return served

        def ready() -> str | None:
            return self.watchdog_problem() or (None if parts.pipelines else "no pipeline is serving a model")

        try:
            endpoint = InferenceEndpoint(self.profile.endpoint, models=models, ready=ready, environ=os.environ)
            parts.endpoint = endpoint.start()
        except EndpointError as exc:
            raise DaemonError(str(exc)) from None
        parts.closers.append(("endpoint", endpoint.stop))

    def _models_health(self) -> dict[str, dict[str, object]]:
        parts = self.parts
        return models_health(list(parts.pipelines.values()), parts.store) if parts is not None else {}

    def watchdog_problem(self) -> str | None:
        problems = self.watchdog.problems()
        return "; ".join(problems) if problems else None

    # -- helpers ---------------------------------------------------------------------------------

    def _pipelines_alive(self) -> str | None:
        parts = self.parts
        if parts is None:
            return None
        for name, pipeline in list(parts.pipelines.items()):
            busy = pipeline.busy_for()
            if busy is not None and busy > self.profile.health.stuck_after:
                return f"pipeline {name}: one inference has run for {busy:.0f} s"
        return None

    def status_line(self) -> str:
        parts = self.parts
        if parts is None:
            return "stopped"
        bits = []
        for name, pipeline in list(parts.pipelines.items()):
            s = pipeline.stats()
            bits.append(f"{name} {s['model']}@{s['model_version']} on {s['provider']} {s['results_per_s']:.1f}/s")
        conn = parts.connection.state if parts.connection is not None else "stdout"
        depth = f", outbox {parts.outbox.depth}" if parts.outbox is not None else ""
        return f"{'; '.join(bits) or 'no pipelines'} | mqtt {conn}{depth}"
