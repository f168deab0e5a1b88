"""One demo run, in order, and its orderly end.

Key pair -> registry folder with text-detector 1.0.0 on channel `stable` -> registry server (a thread
of this process) -> broker -> our own MQTT subscriber -> the agent (`edge-agent run`, a subprocess) ->
a table printed once a second -> half way, text-detector 1.1.0 is published and `stable` moved to it;
the agent's registry poll picks it up and swaps it in while frames keep coming -> at --duration or on
Ctrl-C: agent (SIGTERM, it flushes its outbox), subscriber, broker, registry, temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from paho.mqtt.enums import MQTTProtocolVersion

from agent.cloud.demo import DemoError
from agent.cloud.demo.broker import BrokerChoice, start_broker
from agent.cloud.demo.models import ModelFile, derive_second, first_model
from agent.cloud.demo.printer import Printer
from agent.cloud.demo.processes import LOCALHOST, free_port, port_is_free, spawn, stop_process, tail, wait_port
from agent.cloud.demo.profile import CHANNEL, DEVICE, FIRST, MODEL, SECOND, write_profile
from agent.cloud.demo.tally import Tally
from agent.cloud.fleet.client import BrokerClient, BrokerSettings, FleetError
from agent.cloud.publish import publish
from agent.cloud.server import RegistryHTTPServer
from agent.models.signing import generate_keypair
from agent.transport.topics import Topics

SWAP_AFTER = 12.0  # seconds of results before the second version is pushed when no --duration is given
AGENT_STOP_TIMEOUT = 20.0
BROKER_STOP_TIMEOUT = 10.0
FIRST_RESULT_TIMEOUT = 120.0
TICK = 1.0  # one row a second
DRAIN_POLL = 0.2


@dataclass
class Options:
    duration: float | None = None
    port_base: int | None = None
    color: bool = True
    broker: BrokerChoice = "auto"
    keep_tmp: bool = False


class Demo:
    def __init__(self, options: Options, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self.o = options
        self.p = Printer(out, err, options.color)
        self.stop = threading.Event()
        self.tmp: Path | None = None
        self.saved_tmp: tuple[str | None, str | None] | None = None
        self.server: RegistryHTTPServer | None = None
        self.broker: subprocess.Popen[bytes] | None = None
        self.broker_kind = ""
        self.agent: subprocess.Popen[bytes] | None = None
        self.sub: BrokerClient | None = None
        self.tally = Tally()
        self.second: ModelFile | None = None
        self.deriving: threading.Thread | None = None
        self.pushed_at: float | None = None
        self.started = time.monotonic()
        self.failure: str | None = None

    # -- set-up --------------------------------------------------------------------------------

    def ports(self) -> tuple[int, int, int]:
        if self.o.port_base is None:
            return free_port(), free_port(), free_port()
        base = self.o.port_base
        ports = (base, base + 1, base + 2)
        busy = [p for p in ports if not port_is_free(p)]
        if busy:
            raise DemoError(f"--port-base {base}: port {busy[0]} is in use (the demo needs {base}..{base + 2})")
        return ports

    def start_broker(self, workdir: Path, port: int) -> None:
        self.broker, self.broker_kind = start_broker(self.o.broker, port, workdir)
        broker = self.broker
        if not wait_port(port, 20.0, alive=lambda: broker.poll() is None):
            raise DemoError(f"the broker did not start on {LOCALHOST}:{port}:\n{tail(workdir / 'broker.log')}")

    def subscribe(self, port: int) -> None:
        """Everything under edge/<device>/#, read on this thread by `drain`. MQTT 3.1.1: amqtt speaks no 5."""
        settings = BrokerSettings(f"mqtt://{LOCALHOST}:{port}")
        self.sub = BrokerClient(
            settings, client_id=f"edge-agent-demo-{os.getpid()}", protocol=MQTTProtocolVersion.MQTTv311
        )
        try:
            self.sub.connect()
            self.sub.subscribe(Topics("edge", DEVICE).base + "/#")
        except FleetError as exc:
            raise DemoError(f"could not subscribe on the local broker ({LOCALHOST}:{port}): {exc}") from None

    def derive(self, workdir: Path, model: Path) -> None:
        self.second = derive_second(model, workdir / "derived", self.p)

    def push_second(self, workdir: Path) -> None:
        assert self.second is not None
        publish(
            workdir / "registry", MODEL, SECOND, self.second.path, workdir / "keys" / "registry.key", channel=CHANNEL
        )
        self.pushed_at = time.monotonic()
        self.p.tagged(
            ">",
            "registry",
            f"published {MODEL} {SECOND} ({self.second.kind}) and moved channel {CHANNEL} -> {SECOND}; "
            "the agent picks it up at its next poll (2 s)",
            "1;36",
        )

    # -- the run -------------------------------------------------------------------------------

    def handle(self, topic: str, body: dict[str, Any]) -> None:
        if topic.endswith("/results"):
            if "results" in body and isinstance(body["results"], list):  # a batch
                for item in body["results"]:
                    self.tally.add_result({**body, **item})
            else:
                self.tally.add_result(body)
        elif topic.endswith("/health"):
            self.tally.health = body
        elif topic.endswith("/events"):
            self.tally.events.append(body)
            self.p.event(body)
        elif topic.endswith("/status"):
            state = body.get("state")
            if state != self.tally.status:
                self.tally.status = state
                reason = f" ({body['reason']})" if body.get("reason") else ""
                self.p.tagged("*", "status", f"agent {state}{reason}", "1;33")

    def drain(self, until: float) -> None:
        """Handle what arrives until `until` (monotonic), or until stopped."""
        assert self.sub is not None
        while True:
            received = self.sub.receive(min(until - time.monotonic(), DRAIN_POLL))
            if received is None:
                if time.monotonic() >= until or self.stop.is_set():
                    return
                continue
            topic, raw = received
            try:
                body = json.loads(raw.decode("utf-8")) if raw else {}
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(body, dict):
                self.handle(topic, body)

    def run(self) -> int:
        try:
            self._run()
        except DemoError as exc:
            self.failure = str(exc)
        except KeyboardInterrupt:
            self.stop.set()
        except subprocess.CalledProcessError as exc:
            if not self.stop.is_set():  # pip shares our terminal: a Ctrl-C during the download ends it too
                self.failure = f"{' '.join(map(str, exc.cmd[:6]))} ... failed with code {exc.returncode}"
        except Exception as exc:  # noqa: BLE001 (one line, everything still stopped)
            self.failure = f"{exc.__class__.__name__}: {exc}"
        finally:
            self.shutdown()
        return self.summary()

    def _run(self) -> None:
        tmp = self.tmp = Path(tempfile.mkdtemp(prefix="edge-agent-demo-"))
        self.p.note(f"working in {tmp} (removed at the end)")
        # Scratch files of this process and its children land in the temporary directory too: onnxruntime
        # writes $TMPDIR/.ses (its telemetry session id) as soon as it is imported.
        self.saved_tmp = (os.environ.get("TMPDIR"), tempfile.tempdir)
        os.environ["TMPDIR"] = str(tmp)
        tempfile.tempdir = str(tmp)
        broker_port, registry_port, http_port = self.ports()
        model = first_model(self.p)
        if self.stop.is_set():
            return
        generate_keypair(tmp / "keys", "registry")
        publish(tmp / "registry", MODEL, FIRST, model, tmp / "keys" / "registry.key", channel=CHANNEL)
        self.p.note(f"signed {MODEL} {FIRST} (PP-OCRv4 detector, fp32) on channel {CHANNEL} in {tmp / 'registry'}")
        server = self.server = RegistryHTTPServer(tmp / "registry", LOCALHOST, registry_port, quiet=True).start()
        self.p.note(f"registry on {server.url}")
        self.start_broker(tmp, broker_port)
        self.p.note(f"broker: {self.broker_kind} on mqtt://{LOCALHOST}:{broker_port}")
        self.subscribe(broker_port)
        profile = write_profile(
            tmp, server.url, broker_port, http_port, mqtt_311=self.broker_kind.startswith("embedded")
        )
        if self.stop.is_set():
            return
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        agent = self.agent = spawn(
            [sys.executable, "-m", "agent", "--log-level", "info", "run", "--profile", str(profile)],
            tmp / "agent.log",
            env=env,
        )
        self.p.note(f"agent started (pid {agent.pid}, profile {profile}); status page http://{LOCALHOST}:{http_port}/")
        self.p.note(f"watch it yourself: mosquitto_sub -p {broker_port} -t 'edge/#' -v   (Ctrl-C stops the demo)")
        deriving = self.deriving = threading.Thread(
            target=self.derive, args=(tmp, model), name="demo-derive", daemon=True
        )
        deriving.start()

        deadline = self.started + self.o.duration if self.o.duration else None
        swap_at: float | None = None
        header_done = False
        next_tick = time.monotonic() + TICK
        while not self.stop.is_set():
            self.drain(next_tick)
            if self.stop.is_set():
                break
            next_tick += TICK
            if self.p.gone.is_set():
                break  # nobody reads what we print any more
            now = time.monotonic()
            if agent.poll() is not None:
                raise DemoError(f"the agent exited with code {agent.returncode}:\n{tail(tmp / 'agent.log')}")
            first_at = self.tally.first_at
            if first_at is not None:
                if not header_done:
                    self.p.note(f"first result {first_at - self.started:.1f} s after start")
                    self.p.header()
                    header_done = True
                self.p.row(self.tally)
                if swap_at is None:
                    left = (deadline - first_at) if deadline else 2 * SWAP_AFTER
                    swap_at = first_at + max(2.0, left / 2 - 2.0)  # minus the poll: the swap shows half way
                if self.pushed_at is None and now >= swap_at and not deriving.is_alive():
                    self.push_second(tmp)
            elif now - self.started > FIRST_RESULT_TIMEOUT:
                raise DemoError(
                    f"no result after {FIRST_RESULT_TIMEOUT:g} s; the agent's log says:\n{tail(tmp / 'agent.log')}"
                )
            if deadline is not None and now >= deadline:
                break

    # -- the end -------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Agent first (it flushes its outbox to the broker and says `offline`), then our subscriber, the broker,
        the registry and the temporary directory; every step runs even when an earlier one failed."""
        steps: list[str] = []

        def step(name: str | None, action: Callable[[], object]) -> None:
            try:
                detail = action()
                if name:
                    steps.append(f"{name} ({detail})" if detail else name)
            except Exception as exc:  # noqa: BLE001 (the next steps must run; the failure is in the summary)
                steps.append(f"{name or action} (failed: {exc.__class__.__name__}: {exc})")

        agent, sub, broker, server = self.agent, self.sub, self.broker, self.server
        if agent is not None:
            step("agent", lambda: f"exit {stop_process(agent, AGENT_STOP_TIMEOUT)}")
        if sub is not None and agent is not None:  # the last results it flushed, and its `offline`
            self.stop.clear()
            step(None, lambda: self.drain(time.monotonic() + 0.5))
        if sub is not None:
            step(None, sub.close)
        if broker is not None:
            step("broker", lambda: f"exit {stop_process(broker, BROKER_STOP_TIMEOUT)}")
        if server is not None:

            def stop_registry() -> None:
                server.shutdown()
                server.server_close()

            step("registry", stop_registry)
        if self.failure and self.tmp is not None and "agent" not in self.failure:
            log = self.tmp / "agent.log"
            if log.exists() and log.stat().st_size:
                self.failure += f"\nthe agent's log:\n{tail(log)}"
        if self.deriving is not None:
            self.deriving.join(60)  # it writes into the temporary directory
        if self.saved_tmp is not None:
            env, tempfile.tempdir = self.saved_tmp
            if env is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = env
        if self.tmp is not None:
            if self.o.keep_tmp:
                steps.append(f"kept {self.tmp}")
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)
                steps.append(f"removed {self.tmp}")
        if steps:
            self.p.note("stopped " + ", ".join(steps))

    def summary(self) -> int:
        t = self.tally
        if self.failure:
            print(f"edge-agent demo: {self.failure}", file=self.p.err, flush=True)
        versions = " -> ".join(t.versions) or "none"
        swap = f" (swap at seq {t.swap_seq})" if t.swap_seq is not None else ""
        first = f", first after {t.first_at - self.started:.1f} s" if t.first_at is not None else ""
        seq_range = f"seq {min(t.seqs)}-{max(t.seqs)}, " if t.seqs else ""
        line = (
            f"summary: {t.results} results{first}, {seq_range}seq gaps {t.gaps}, duplicates {t.duplicates}, "
            f"versions seen {versions}{swap}, camera frames skipped {t.frames_skipped}, {len(t.events)} events"
        )
        ok = not self.failure and t.results > 0 and t.gaps == 0
        self.p.line(self.p.paint(line, "1;32" if ok else "1;31"))
        if self.failure:
            return 1
        if t.results == 0 and self.stop.is_set():
            return 130  # interrupted before the first result
        return 0 if t.results > 0 else 1


SignalHandler = Callable[[int, FrameType | None], Any] | int | None  # what signal.signal takes and gives back


def run_demo(options: Options, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """The demo with Ctrl-C, SIGTERM and SIGHUP (the terminal closed) turned into an orderly stop."""
    demo = Demo(options, out, err)
    previous: dict[signal.Signals, SignalHandler] = {}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if demo.stop.is_set():
            return
        demo.p.note("stopping (" + ("Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name) + ") ...")
        demo.stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, on_signal)
    try:
        return demo.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
