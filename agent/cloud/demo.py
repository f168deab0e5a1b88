"""`edge-agent demo`: a signing key, a registry, a broker, one agent and a real model, all on this machine.

Everything lives in one fresh temporary directory that is removed at the end; the one thing kept
outside it is the sample-model cache (~/.cache/edge-agent/samples, or $EDGE_AGENT_CACHE), so that the
second run does not download the PP-OCR wheel again.

Order: key pair -> registry folder with text-detector 1.0.0 on channel `stable` -> registry server (a
thread of this process) -> broker (Mosquitto when installed, else amqtt in a subprocess) -> our own
MQTT subscriber -> the agent (`edge-agent run`, a subprocess) -> a table printed once a second -> half
way, text-detector 1.1.0 (the int8 variant of the same detector) is published and `stable` moved to
it; the agent's registry poll picks it up and swaps it in while frames keep coming -> at --duration or
on Ctrl-C: agent (SIGTERM, it flushes its outbox), subscriber, broker, registry, temporary directory.

Children run in their own process group (a Ctrl-C in the terminal reaches the demo alone, which then
stops them in order) and, on Linux, get SIGTERM should the demo itself die without cleaning up.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

MODEL = "text-detector"
SAMPLE = "ppocr-det"
DEVICE = "demo-01"
PIPELINE = "gate"
CHANNEL = "stable"
FIRST, SECOND = "1.0.0", "1.1.0"
SWAP_AFTER = 12.0  # seconds of results before the second version is pushed when no --duration is given
AGENT_STOP_TIMEOUT = 20.0
TEXTS = ["EDGE AGENT", "GATE 42", "HELLO ONNX", "PLATE KX-4521", "DOCK 7", "EXIT"]
BROKER_CHOICES = ("auto", "mosquitto", "embedded")


class DemoError(Exception):
    """The demo cannot go on; the message says why (and what to do)."""


# ---- small helpers ------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def wait_port(port: int, timeout: float, alive: Callable[[], bool] = lambda: True, host: str = "127.0.0.1") -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    for path in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto"):
        if os.access(path, os.X_OK):
            return path
    return None


def amqtt_available() -> bool:
    try:
        import amqtt.broker  # noqa: F401
    except Exception:  # noqa: BLE001 (missing, or broken by a dependency)
        return False
    return True


def _child_setup() -> None:
    """In the child, before exec: its own process group (the terminal's Ctrl-C reaches the demo only, which
    stops the children in order), and SIGTERM when the demo dies without stopping it (Linux)."""
    os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except Exception:  # noqa: BLE001 (best effort)
            pass


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
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
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_amqtt(port: int) -> None:
    """The embedded broker (amqtt), for machines without Mosquitto: `python -c` runs this in a child."""
    import asyncio
    import logging

    from amqtt.broker import Broker

    logging.basicConfig(level=logging.WARNING)
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        broker = Broker(config)
        await broker.start()
        await stop.wait()
        await broker.shutdown()

    asyncio.run(main())


# ---- what arrives over MQTT ---------------------------------------------------------------------


@dataclass
class Tally:
    """Everything counted from the results: for the rows, the seq check and the summary."""

    results: int = 0
    seqs: set[int] = field(default_factory=set)
    source_seqs: set[int] = field(default_factory=set)
    duplicates: int = 0
    versions: list[str] = field(default_factory=list)
    swap_seq: int | None = None
    first_at: float | None = None
    window: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=200))
    health: dict[str, Any] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    status: str | None = None

    def add_result(self, msg: dict[str, Any]) -> None:
        seq = msg.get("seq")
        if isinstance(seq, int):
            if seq in self.seqs:
                self.duplicates += 1
            self.seqs.add(seq)
        if isinstance(msg.get("source_seq"), int):
            self.source_seqs.add(msg["source_seq"])
        self.results += 1
        if self.first_at is None:
            self.first_at = time.monotonic()
        version = str(msg.get("model_version"))
        if not self.versions or self.versions[-1] != version:
            if self.versions and self.swap_seq is None:
                self.swap_seq = seq if isinstance(seq, int) else None
            self.versions.append(version)
        msg["_arrived"] = time.monotonic()
        self.window.append(msg)

    @property
    def frames_skipped(self) -> int:
        """Camera frames between the first and the last result that were not inferred (a busy pipeline skips)."""
        s = self.source_seqs
        return (max(s) - min(s) + 1) - len(s) if s else 0

    @property
    def gaps(self) -> int:
        if not self.seqs:
            return 0
        return (max(self.seqs) - min(self.seqs) + 1) - len(self.seqs)


def _parse_ts(value: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _total_latency(msg: dict[str, Any]) -> float:
    lat = msg.get("latency_ms") or {}
    return float(sum(v for v in lat.values() if isinstance(v, (int, float))))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def short_provider(name: Any) -> str:
    return str(name or "?").replace("ExecutionProvider", "")


class Printer:
    """The live table on stdout; progress and set-up notes on stderr."""

    HEADER = f"{'time':8}  {'model':13} {'provider':9} {'fps':>5} {'p50 ms':>7} {'p95 ms':>7} {'cpu%':>5}  {'seq':>11}  boxes"

    def __init__(self, out: TextIO, err: TextIO, color: bool) -> None:
        self.out, self.err, self.color = out, err, color
        self.lock = threading.Lock()
        self.rows = 0
        self.gone = threading.Event()  # stdout or stderr was closed by its reader (`edge-agent demo | head`)

    def _print(self, text: str, stream: TextIO) -> None:
        if self.gone.is_set():
            return
        with self.lock:
            try:
                print(text, file=stream, flush=True)
            except (BrokenPipeError, OSError, ValueError):
                self.gone.set()

    def paint(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def note(self, text: str) -> None:
        self._print(self.paint("==> ", "1;34") + text, self.err)

    def line(self, text: str) -> None:
        self._print(text, self.out)

    def header(self) -> None:
        self.line(self.paint(self.HEADER, "1"))

    def row(self, tally: Tally) -> None:
        """One line for the results that arrived since the previous line."""
        now = time.monotonic()
        fresh = [m for m in tally.window if not m.get("_shown")]
        for m in fresh:
            m["_shown"] = True
        recent = [m for m in tally.window if m["_arrived"] > now - 5.0]
        clock = time.strftime("%H:%M:%S")
        if not fresh:
            self.line(f"{clock}  {self.paint('(no results this second)', '2')}")
            return
        last = fresh[-1]
        stamps = [t for t in (_parse_ts(m.get("ts")) for m in recent[-15:]) if t is not None]
        fps = (
            f"{(len(stamps) - 1) / (stamps[-1] - stamps[0]):5.1f}"
            if len(stamps) > 2 and stamps[-1] > stamps[0]
            else "    -"
        )
        lat = [_total_latency(m) for m in recent]
        boxes = (last.get("output") or {}).get("boxes") or []
        shown = " ".join("[" + ",".join(str(int(v)) for v in b.get("box", [])) + "]" for b in boxes[:2])
        more = " ..." if len(boxes) > 2 else ""
        seqs = [m.get("seq") for m in fresh if isinstance(m.get("seq"), int)]
        seq = f"{min(seqs)}-{max(seqs)}" if len(seqs) > 1 else (str(seqs[0]) if seqs else "?")
        system = (tally.health or {}).get("system") or {}
        cpu = system.get("cpu_percent")
        version = f"{MODEL[:4]}@{last.get('model_version')}"
        if tally.versions and last.get("model_version") != tally.versions[0]:
            version = self.paint(f"{version:13}", "1;32")
        else:
            version = f"{version:13}"
        self.rows += 1
        self.line(
            f"{clock}  {version} {short_provider(last.get('provider')):9} {fps} {_percentile(lat, 0.5):7.1f} "
            f"{_percentile(lat, 0.95):7.1f} {cpu if cpu is not None else '-':>5}  {seq:>11}  "
            f"{len(boxes)} {shown}{more}"
        )

    def event(self, msg: dict[str, Any]) -> None:
        kind = str(msg.get("type", "?"))
        details = {k: v for k, v in msg.items() if k not in ("device", "seq", "ts", "type")}
        if kind == "model.activated":
            text = (
                f"{details.get('model')} {details.get('version')} ({details.get('variant')}) activated on "
                f"{short_provider(details.get('provider'))}"
                + (f", replacing {details['previous']}" if details.get("previous") else "")
            )
        elif kind == "model.swapped":
            text = (
                f"pipeline {details.get('pipeline', PIPELINE)} now runs {details.get('model')} {details.get('version')} "
                f"(was {details.get('previous')}) on {short_provider(details.get('provider'))}: hot swap"
            )
        elif kind == "model.downloading":
            text = f"downloading {details.get('model')} {details.get('version')} ({details.get('variant')}, {details.get('bytes')} bytes)"
        elif kind == "model.verifying":
            text = f"verifying {details.get('model')} {details.get('version')}: signature, digest, test vectors"
        elif kind == "pipeline.started":
            text = (
                f"pipeline {details.get('pipeline')} started: {details.get('model')} {details.get('version')} on "
                f"{short_provider(details.get('provider'))}, source {details.get('source')}"
            )
        elif kind == "model.active":
            text = f"{details.get('model')} {details.get('version')} serves every pipeline that uses it" + (
                f" (previous {details['previous']}, kept for rollback)" if details.get("previous") else ""
            )
        elif kind == "model.probation_passed":
            text = f"{details.get('model')} {details.get('version')} passed its probation"
        elif kind == "model.rolled_back":
            text = (
                f"{details.get('model')} {details.get('version')} rolled back to {details.get('to') or details.get('previous')}"
                + (f": {details['reason']}" if details.get("reason") else "")
            )
        elif kind == "model.refused":
            text = f"{details.get('model')} {details.get('version')} refused: {details.get('reason')}"
        elif kind == "agent.started":
            text = f"agent {details.get('version')} serving pipelines {', '.join(map(str, details.get('pipelines') or []))}"
        elif kind in ("pipeline.stopped", "pipeline.finished"):
            text = f"pipeline {details.get('pipeline')} {kind.split('.')[1]} after {details.get('results')} results"
        else:
            text = " ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in details.items())
        bad = kind.endswith(("refused", "error", "failed", "rolled_back", "lost", "dropped"))
        self.line(f"{time.strftime('%H:%M:%S')}  " + self.paint(f"* {kind:17}", "1;31" if bad else "1;33") + f" {text}")


class Subscriber:
    """Our MQTT client: everything under edge/<device>/#, handed to the main thread through a queue."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.queue: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.connected = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"edge-agent-demo-{os.getpid()}", protocol=paho.MQTTv311
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.port = port

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any = None) -> None:
        if not getattr(reason, "is_failure", False):
            client.subscribe(f"edge/{DEVICE}/#", qos=1)
            self.connected.set()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        try:
            body = json.loads(message.payload.decode("utf-8")) if message.payload else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            return
        if isinstance(body, dict):
            self.queue.put((message.topic, body))

    def start(self, timeout: float = 10.0) -> Subscriber:
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        if not self.connected.wait(timeout):
            self.stop()
            raise DemoError(f"could not subscribe on the local broker (127.0.0.1:{self.port})")
        return self

    def stop(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


# ---- the demo -----------------------------------------------------------------------------------


@dataclass
class Options:
    duration: float | None = None
    port_base: int | None = None
    color: bool = True
    broker: str = "auto"
    keep_tmp: bool = False


class Demo:
    def __init__(self, options: Options, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self.o = options
        self.p = Printer(out, err, options.color)
        self.stop = threading.Event()
        self.tmp: Path | None = None
        self.saved_tmp: tuple[str | None, str | None] | None = None
        self.server: Any = None
        self.broker: subprocess.Popen[bytes] | None = None
        self.broker_kind = ""
        self.agent: subprocess.Popen[bytes] | None = None
        self.sub: Subscriber | None = None
        self.tally = Tally()
        self.second: Path | None = None
        self.deriving: threading.Thread | None = None
        self.second_kind = ""
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

    def prepare_model(self) -> Path:
        from agent.cloud.samples import cache_dir, sample_model

        cached = (cache_dir() / "models" / f"{SAMPLE}.onnx").exists()
        if not cached:
            self.p.note(
                f"first run: fetching the PP-OCR text detector (rapidocr wheel, ~15 MB, sha256-pinned) into {cache_dir()}"
            )
        path = sample_model(SAMPLE, quiet=False)
        if not cached:
            self.p.note(f"cached {path} (kept for the next runs; delete {cache_dir()} to remove it)")
        return path

    def start_broker(self, port: int) -> None:
        assert self.tmp is not None
        choice = self.o.broker
        binary = mosquitto_binary() if choice in ("auto", "mosquitto") else None
        if choice == "mosquitto" and binary is None:
            raise DemoError("--broker mosquitto: mosquitto is not installed (apt-get install mosquitto)")
        log = self.tmp / "broker.log"
        if binary is not None:
            conf = self.tmp / "mosquitto.conf"
            # As root Mosquitto switches to its own user, which clears the parent-death signal (and could not
            # write here): keep the user we are.
            user = "user root\n" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""
            conf.write_text(
                f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{user}"
                "log_dest stderr\nlog_type error\nlog_type warning\n"
            )
            self.broker = spawn([binary, "-c", str(conf)], log)
            self.broker_kind = f"Mosquitto ({binary})"
        else:
            if not amqtt_available():
                raise DemoError(
                    "no MQTT broker: install Mosquitto (apt-get install mosquitto) or the embedded one "
                    "(pip install 'edge-agent[cloud]', which brings amqtt)"
                )
            code = f"from agent.cloud.demo import run_amqtt; run_amqtt({port})"
            self.broker = spawn([sys.executable, "-c", code], log)
            self.broker_kind = "embedded amqtt (Mosquitto not found)" if choice == "auto" else "embedded amqtt"
        if not wait_port(port, 20.0, alive=lambda: self.broker is not None and self.broker.poll() is None):
            raise DemoError(f"the broker did not start on 127.0.0.1:{port}:\n{tail(log)}")

    def write_profile(self, registry_url: str, broker_port: int, http_port: int) -> Path:
        assert self.tmp is not None
        profile = {
            "device": {"id": DEVICE, "group": "demo", "state_dir": str(self.tmp / "state")},
            # Probation watches a new version for a while and rolls it back when its inference p95 exceeds the
            # previous one's by a factor: the default 1.5 rolled the very same weights back on a 2-core machine
            # busy with other work, so the demo allows 2.5 (an int8 copy 3x slower is still rolled back).
            "registry": {
                "url": registry_url,
                "public_key": str(self.tmp / "keys" / "registry.pub"),
                "poll_interval": "2s",
                "probation": {"duration": "60s", "max_latency_ratio": 2.5},
            },
            # amqtt speaks MQTT 3.1.1 only, and answers an MQTT 5 CONNECT that has a Will with silence (no
            # CONNACK, socket left open), which the agent's `auto` cannot tell from a slow broker: pin 3.1.1.
            "mqtt": {
                "url": f"mqtt://127.0.0.1:{broker_port}",
                "client_id": DEVICE,
                "protocol": "3.1.1" if self.broker_kind.startswith("embedded") else "auto",
            },
            "runtime": {"providers": "auto", "threads": "auto", "http": f"127.0.0.1:{http_port}"},
            "health": {"interval": "2s"},
            "pipelines": [
                {
                    "name": PIPELINE,
                    "model": MODEL,
                    "channel": CHANNEL,
                    "source": {"type": "synthetic", "width": 640, "height": 480, "fps": 5, "text": TEXTS[:3]},
                    "preprocess": {
                        "resize": [640, 480],
                        "color": "rgb",
                        "scale": 0.00392156862745098,
                        "mean": [0.485, 0.456, 0.406],
                        "std": [0.229, 0.224, 0.225],
                        "layout": "nchw",
                        "dtype": "float32",
                    },
                    "postprocess": {"type": "text-detection", "threshold": 0.3},
                }
            ],
        }
        path = self.tmp / "profile.yaml"
        path.write_text("# written by `edge-agent demo` (JSON is valid YAML)\n" + json.dumps(profile, indent=2) + "\n")
        return path

    def derive_second(self, model: Path) -> None:
        """The file version 1.1.0 publishes: the same PP-OCR weights with a release note in the model's
        metadata (so a new digest, a real download and a real swap), written with onnx (the cloud extra);
        the very same file when onnx is missing. (The int8 variant `--derive int8` makes is about three times
        slower on x86 CPUs: the agent's probation would roll it back, which is a demo of its own.)"""
        assert self.tmp is not None
        work = self.tmp / "derived"
        work.mkdir(exist_ok=True)
        try:
            import onnx

            proto = onnx.load(str(model))
            entry = proto.metadata_props.add()
            entry.key, entry.value = "release", f"{SECOND}: same PP-OCRv4 weights, republished by edge-agent demo"
            target = work / f"{SAMPLE}-{SECOND}.onnx"
            onnx.save(proto, str(target))
            self.second, self.second_kind = target, "fp32, new metadata"
        except Exception as exc:  # noqa: BLE001 (ImportError without the cloud extra: the same file)
            self.p.note(f"onnx not usable ({exc.__class__.__name__}); {SECOND} republishes the same file")
            self.second, self.second_kind = model, "fp32, same file"

    def push_second(self) -> None:
        from agent.cloud.publish import publish

        assert self.tmp is not None and self.second is not None
        publish(self.tmp / "registry", MODEL, SECOND, self.second, self.tmp / "keys" / "registry.key", channel=CHANNEL)
        self.pushed_at = time.monotonic()
        self.p.line(
            f"{time.strftime('%H:%M:%S')}  "
            + self.p.paint(f"> {'registry':17}", "1;36")
            + f" published {MODEL} {SECOND} ({self.second_kind}) and moved channel {CHANNEL} -> {SECOND}; "
            "the agent picks it up at its next poll (2 s)"
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
                self.p.line(
                    f"{time.strftime('%H:%M:%S')}  "
                    + self.p.paint(f"* {'status':17}", "1;33")
                    + f" agent {state}"
                    + (f" ({body['reason']})" if body.get("reason") else "")
                )

    def drain(self, until: float) -> None:
        assert self.sub is not None
        while True:
            left = until - time.monotonic()
            try:
                topic, body = self.sub.queue.get(timeout=max(0.0, min(left, 0.2)))
            except queue.Empty:
                if time.monotonic() >= until or self.stop.is_set():
                    return
                continue
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
        from agent.cloud.publish import publish
        from agent.cloud.server import RegistryHTTPServer
        from agent.models.signing import generate_keypair

        self.tmp = Path(tempfile.mkdtemp(prefix="edge-agent-demo-"))
        self.p.note(f"working in {self.tmp} (removed at the end)")
        # Scratch files of this process and its children land in the temporary directory too: onnxruntime
        # writes $TMPDIR/.ses (its telemetry session id) as soon as it is imported.
        self.saved_tmp = (os.environ.get("TMPDIR"), tempfile.tempdir)
        os.environ["TMPDIR"] = str(self.tmp)
        tempfile.tempdir = str(self.tmp)
        broker_port, registry_port, http_port = self.ports()
        model = self.prepare_model()
        if self.stop.is_set():
            return
        generate_keypair(self.tmp / "keys", "registry")
        publish(self.tmp / "registry", MODEL, FIRST, model, self.tmp / "keys" / "registry.key", channel=CHANNEL)
        self.p.note(f"signed {MODEL} {FIRST} (PP-OCRv4 detector, fp32) on channel {CHANNEL} in {self.tmp / 'registry'}")
        self.server = RegistryHTTPServer(self.tmp / "registry", "127.0.0.1", registry_port, quiet=True).start()
        self.p.note(f"registry on {self.server.url}")
        self.start_broker(broker_port)
        self.p.note(f"broker: {self.broker_kind} on mqtt://127.0.0.1:{broker_port}")
        self.sub = Subscriber(broker_port).start()
        profile = self.write_profile(self.server.url, broker_port, http_port)
        if self.stop.is_set():
            return
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.agent = spawn(
            [sys.executable, "-m", "agent", "--log-level", "info", "run", "--profile", str(profile)],
            self.tmp / "agent.log",
            env=env,
        )
        self.p.note(
            f"agent started (pid {self.agent.pid}, profile {profile}); status page http://127.0.0.1:{http_port}/"
        )
        self.p.note(f"watch it yourself: mosquitto_sub -p {broker_port} -t 'edge/#' -v   (Ctrl-C stops the demo)")
        deriving = self.deriving = threading.Thread(
            target=self.derive_second, args=(model,), name="demo-derive", daemon=True
        )
        deriving.start()

        deadline = self.started + self.o.duration if self.o.duration else None
        swap_at: float | None = None
        header_done = False
        next_tick = time.monotonic() + 1.0
        while not self.stop.is_set():
            self.drain(next_tick)
            if self.stop.is_set():
                break
            next_tick += 1.0
            if self.p.gone.is_set():
                break  # nobody reads what we print any more
            now = time.monotonic()
            if self.agent.poll() is not None:
                raise DemoError(f"the agent exited with code {self.agent.returncode}:\n{tail(self.tmp / 'agent.log')}")
            if self.tally.first_at is not None:
                if not header_done:
                    self.p.note(f"first result {self.tally.first_at - self.started:.1f} s after start")
                    self.p.header()
                    header_done = True
                self.p.row(self.tally)
                if swap_at is None:
                    left = (deadline - self.tally.first_at) if deadline else 2 * SWAP_AFTER
                    swap_at = self.tally.first_at + max(2.0, left / 2 - 2.0)  # minus the poll: the swap shows half way
                if self.pushed_at is None and now >= swap_at and not deriving.is_alive():
                    self.push_second()
            elif now - self.started > 120:
                raise DemoError(f"no result after 120 s; the agent's log says:\n{tail(self.tmp / 'agent.log')}")
            if deadline is not None and now >= deadline:
                break

    # -- the end -------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Agent first (it flushes its outbox to the broker and says `offline`), then our subscriber, the broker,
        the registry and the temporary directory; every step runs even when an earlier one failed."""
        steps: list[str] = []

        def step(name: str | None, action: Callable[[], Any]) -> None:
            try:
                detail = action()
                if name:
                    steps.append(f"{name} ({detail})" if detail else name)
            except Exception as exc:  # noqa: BLE001 (the next steps must run)
                steps.append(f"{name or action} (failed: {exc.__class__.__name__}: {exc})")

        def stop_registry() -> None:
            self.server.shutdown()
            self.server.server_close()

        if self.agent is not None:
            step("agent", lambda: f"exit {stop_process(self.agent, AGENT_STOP_TIMEOUT)}")
        if self.sub is not None and self.agent is not None:  # the last results it flushed, and its `offline`
            self.stop.clear()
            step(None, lambda: self.drain(time.monotonic() + 0.5))
        if self.sub is not None:
            step(None, self.sub.stop)
        if self.broker is not None:
            step("broker", lambda: f"exit {stop_process(self.broker, 10.0)}")
        if self.server is not None:
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


def run_demo(options: Options, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    demo = Demo(options, out, err)
    previous: dict[int, Any] = {}

    def on_signal(signum: int, frame: Any) -> None:
        if demo.stop.is_set():
            return
        demo.p.note("stopping (" + ("Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name) + ") ...")
        demo.stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: the terminal closed
        previous[sig] = signal.signal(sig, on_signal)
    try:
        return demo.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
