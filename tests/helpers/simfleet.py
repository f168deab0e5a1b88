"""Simulated devices for the fleet bench and tests: real MQTT clients that speak the agent's protocol.

Each device is its own paho client (its own connection, client id, Last Will and subscriptions), and
does what an agent does around a deployment: it verifies the signed order with the key the registry's
root names for orders (`agent.models.trust`: the pinned root key, then keys/root.json over HTTP, read
once per process and shared by its devices), fetches the signed manifest and its signature over HTTP
(every device: that is the registry's load; the check of the exact bytes served is done once per
process, as its result cannot differ), switches, and publishes its retained health and a report signed with its own identity key (through the
agent's own contract and signing code). It runs
no model: its latency figures are made up, and a device can be told to regress on a version (p95 x3,
or a fall back to the CPU provider) to test the rollout gates.

Thousands fit in one process: every client is driven through paho's external-loop API from a single
selector thread, so a device costs a socket and a few objects, not a thread. `python -m
tests.helpers.simfleet` runs one such process for the bench (one per core, each with a slice of the fleet).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import queue
import selectors
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from paho.mqtt.enums import CallbackAPIVersion

from agent.models.deploy import DeployOrder, OrderError, applies_to, parse_order
from agent.models.manifest import Manifest, parse_manifest
from agent.models.signing import MANIFEST, ORDER, load_public_keys, verify
from agent.models.trust import Trust, TrustError
from agent.service.identity import enrollment_entry, sign_report
from agent.transport.contract.report import DeviceReport, Vitals
from agent.transport.contract.status import StatusMessage
from agent.transport.topics import Topics
from agent.util.timefmt import utc_iso

ARCHS = ("x86_64", "aarch64")
PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider", "OpenVINOExecutionProvider")
CONNECT_BATCH = 200  # connections opened before waiting for their CONNACKs (the broker's listen backlog)


def device_key(seed: str, device: str) -> Ed25519PrivateKey:
    """A device's identity key, derived from a seed: the bench's devices and their inventory agree without
    sending 10,000 keys between processes."""
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"{seed}/{device}".encode()).digest())


def regression(device: str, mode: str, fraction: float) -> str | None:
    """How this device regresses (`p95`, `cpu`, or for `mixed` either, half each), or None: a share
    `fraction` of the devices, spread evenly by the hash of their ids."""
    digest = int(hashlib.sha256(device.encode()).hexdigest()[:8], 16)
    if digest / 0xFFFFFFFF >= fraction:
        return None
    return mode if mode != "mixed" else ("p95", "cpu")[digest % 2]


@dataclass
class SimDevice:
    id: str
    group: str
    key: Ed25519PrivateKey
    arch: str
    provider: str
    model: str
    version: str
    regress: dict[str, str] = field(default_factory=dict)  # version -> "p95" | "cpu"
    base_p95: float = 10.0
    previous: str | None = None
    previous_provider: str | None = None
    p95: float = 10.0
    running_provider: str = ""
    ran: set[str] = field(default_factory=set)  # every version it ever ran
    handled: set[str] = field(default_factory=set)
    orders: dict[str, DeployOrder | None] = field(default_factory=dict)
    topics: Topics = field(init=False)
    client: paho.Client | None = None
    connected: bool = False

    def __post_init__(self) -> None:
        self.topics = Topics("edge", self.id, self.group)
        self.running_provider = self.running_provider or self.provider
        self.p95 = self.base_p95
        self.ran.add(self.version)

    def health(self) -> bytes:
        p95 = round(self.p95, 2)
        latency = {"infer": {"p50": round(p95 * 0.8, 2), "p95": p95, "n": 200}}
        doc = {
            "ts": utc_iso(time.time()),
            "device": self.id,
            "agent": {"uptime_s": 60.0, "version": "sim"},
            "system": {"cpu_percent": 5.0, "cpu_count": 4, "memory": {"total_mb": 4096, "available_mb": 2048, "percent": 50.0}, "uptime_s": 600},
            "group": self.group,
            "pipelines": {
                "p": {
                    "pipeline": "p", "state": "running", "source": "synthetic", "model": self.model,
                    "model_version": self.version, "provider": self.running_provider, "frames": 200, "skipped": 0,
                    "rejected": 0, "inferences": 200, "results": 200, "inference_errors": 0, "post_errors": 0,
                    "sink_errors": 0, "source_errors": 0, "swaps": 0 if self.previous is None else 1, "nan_outputs": 0,
                    "dropped": 0, "results_per_s": 10.0, "inference_running_s": 0.0, "latency_ms": latency,
                    "last_error": None,
                }
            },
            "models": {self.model: {"version": self.version, "provider": self.running_provider, "pipelines": ["p"]}},
            "hardware": {"arch": self.arch, "fingerprint": f"sim-{self.arch}-{self.provider}"},
        }  # fmt: skip
        return json.dumps(doc, separators=(",", ":")).encode()


class SimFleet:
    """Many simulated devices on one selector thread."""

    def __init__(
        self,
        devices: list[SimDevice],
        broker_port: int,
        registry_url: str,
        pinned: dict[str, Ed25519PublicKey],
        on_note: Callable[[str], None] | None = None,
    ) -> None:
        """`pinned`: the registry key(s) a device is installed with (`registry.public_key`: the root key of
        a registry with signing roles)."""
        self.devices, self.port = devices, broker_port
        url = urlsplit(registry_url)
        self.http_host, self.http_port, self.http_base = (
            url.hostname or "127.0.0.1",
            url.port or 80,
            url.path.rstrip("/"),
        )
        self._http: http.client.HTTPConnection | None = None
        self.trust = Trust(pinned, None)
        self._manifests: dict[tuple[bytes, bytes], Manifest] = {}  # (bytes, signature) -> verified manifest
        self.sel = selectors.DefaultSelector()
        self.note = on_note or (lambda line: None)
        self.gets = 0
        self.refused: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held: set[str] = set()  # devices that sit on their orders until `release`
        self._waiting: list[tuple[SimDevice, DeployOrder]] = []
        self._calls: queue.Queue[Callable[[], None]] = queue.Queue()  # run on the loop thread
        self.received: dict[str, list[str]] = {}  # device -> every order id it acted on, in order

    # ---- the loop ----------------------------------------------------------------------------

    def start(self) -> SimFleet:
        self.trust.refresh(self._doc)  # before any order: the keys of each role, as an agent's first poll
        self._thread = threading.Thread(target=self._run, name="simfleet", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def online(self) -> int:
        return sum(d.connected for d in self.devices)

    def _run(self) -> None:
        pending = list(self.devices)
        last_misc = time.monotonic()
        while not self._stop.is_set():
            if pending and sum(1 for d in self.devices if d.client is not None and not d.connected) < CONNECT_BATCH:
                for dev in pending[:CONNECT_BATCH]:
                    self._connect(dev)
                pending = pending[CONNECT_BATCH:]
            for key, mask in self.sel.select(0.05):
                client: paho.Client = key.data
                if mask & selectors.EVENT_READ:
                    client.loop_read(100)
                if mask & selectors.EVENT_WRITE:
                    client.loop_write()
            while not self._calls.empty():
                self._calls.get_nowait()()
            if time.monotonic() - last_misc > 5:
                last_misc = time.monotonic()
                for dev in self.devices:
                    if dev.client is not None:
                        dev.client.loop_misc()
        for dev in self.devices:
            if dev.client is not None:
                dev.client.disconnect()
                dev.client.loop_write()

    def _connect(self, dev: SimDevice) -> None:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"sim-{dev.id}", protocol=paho.MQTTv311)
        client.user_data_set(dev)
        will = StatusMessage(device=dev.id, group=dev.group, state="offline", reason="connection lost")
        client.will_set(dev.topics.status, will.model_dump_json(exclude_none=True), 1, retain=True)
        client.on_socket_open = lambda c, u, s: self.sel.register(s, selectors.EVENT_READ, c)
        client.on_socket_close = lambda c, u, s: self._forget(s)
        client.on_socket_register_write = lambda c, u, s: self.sel.modify(
            s, selectors.EVENT_READ | selectors.EVENT_WRITE, c
        )
        client.on_socket_unregister_write = lambda c, u, s: self._read_only(s, c)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        dev.client = client
        client.connect("127.0.0.1", self.port, keepalive=600)

    def _forget(self, sock: Any) -> None:
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _read_only(self, sock: Any, client: paho.Client) -> None:
        try:
            self.sel.modify(sock, selectors.EVENT_READ, client)
        except (KeyError, ValueError):
            pass

    # ---- what a device does --------------------------------------------------------------------

    def _on_connect(self, client: paho.Client, dev: SimDevice, flags: Any, reason: Any, props: Any) -> None:
        dev.connected = True
        client.subscribe([(dev.topics.deploy, 1), (dev.topics.fleet_deploy, 1)])
        status = StatusMessage(device=dev.id, group=dev.group, state="online", ts=utc_iso(time.time()), version="sim")
        client.publish(dev.topics.status, status.model_dump_json(exclude_none=True), 1, retain=True)
        client.publish(dev.topics.health, dev.health(), 1, retain=True)

    def _on_message(self, client: paho.Client, dev: SimDevice, msg: paho.MQTTMessage) -> None:
        try:
            order = parse_order(msg.payload, self.trust.keyring(ORDER))
        except (OrderError, TrustError) as exc:
            self.refused.append(f"{dev.id}: {exc}")
            return
        dev.orders[msg.topic] = order
        live = [o for o in dev.orders.values() if o is not None and applies_to(o, dev.id, dev.group)]
        newest = max(live, key=lambda o: (o.issued, o.target_kind == "device"), default=None)
        if newest is None or newest.id in dev.handled or newest.model != dev.model:
            return
        dev.handled.add(newest.id)
        if dev.id in self.held:
            self._waiting.append((dev, newest))
            return
        self._follow(client, dev, newest)

    def release(self, *devices: str) -> None:
        """Let held devices act on the orders they sit on (from any thread)."""

        def run() -> None:
            self.held.difference_update(devices)
            waiting, self._waiting = self._waiting, []
            for dev, order in waiting:
                if dev.id in self.held:
                    self._waiting.append((dev, order))
                elif dev.client is not None:
                    self._follow(dev.client, dev, order)

        self._calls.put(run)

    def call(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the loop thread (paho clients are not thread-safe)."""
        self._calls.put(fn)

    def _follow(self, client: paho.Client, dev: SimDevice, order: DeployOrder) -> None:
        self.received.setdefault(dev.id, []).append(order.id)
        if order.version == dev.version:
            return  # already runs it: an agent's pull is `current`, and says nothing
        try:
            manifest = self._manifest(order.model, order.version)
        except (OSError, ValueError) as exc:
            self._report(client, dev, order, "error", reason=f"manifest: {exc}")
            return
        variant = manifest.variants[0]
        dev.previous, dev.previous_provider = dev.version, dev.running_provider
        dev.version = order.version
        dev.ran.add(order.version)
        mode = dev.regress.get(order.version)
        dev.p95 = dev.base_p95 * (3.0 if mode == "p95" else 1.0)
        dev.running_provider = "CPUExecutionProvider" if mode == "cpu" else dev.provider
        fallback = dev.running_provider != (dev.previous_provider or dev.running_provider)
        vitals = Vitals(
            inferences=200, errors=0, nan=0, drops=0, p95_ms=round(dev.p95, 2),
            baseline_p95_ms=dev.base_p95 if dev.previous else None, active_s=1.0,
        )  # fmt: skip
        self._report(
            client, dev, order, "active", digest=variant.blob.digest, variant=variant.id,
            provider=dev.running_provider, fallback=fallback, vitals=vitals,
        )  # fmt: skip
        client.publish(dev.topics.health, dev.health(), 1, retain=True)

    def _report(self, client: paho.Client, dev: SimDevice, order: DeployOrder, state: Any, **fields: Any) -> None:
        report = DeviceReport(
            schema=1, device=dev.id, order=order.id, ts=utc_iso(time.time()), model=order.model, version=order.version,
            state=state, running=dev.version, previous=dev.previous, previous_provider=dev.previous_provider, **fields,
        )  # fmt: skip
        client.publish(dev.topics.report, sign_report(dev.key, report), 1, retain=True)

    def _manifest(self, model: str, version: str) -> Manifest:
        """GET the manifest and its signature (every device asks: that is the registry's load), verify, parse."""
        base = f"{self.http_base}/models/{model}/{version}/manifest.json"
        data, sig = self._get(base), self._get(base + ".sig")
        assert data is not None and sig is not None  # a 404 raised
        known = self._manifests.get((data, sig))
        if known is None:
            verify(self.trust.keyring(MANIFEST), data, sig, f"manifest of {model} {version}", MANIFEST)
            known = self._manifests[(data, sig)] = parse_manifest(data)
        return known

    def _doc(self, path: str) -> bytes | None:
        """A registry document by its path from the root, or None for a 404 (`agent.models.trust.Getter`)."""
        return self._get(f"{self.http_base}/{path}", missing_ok=True)

    def _get(self, path: str, missing_ok: bool = False) -> bytes | None:
        for attempt in (1, 2):
            if self._http is None:
                self._http = http.client.HTTPConnection(self.http_host, self.http_port, timeout=10)
            try:
                self._http.request("GET", path)
                response = self._http.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException):
                self._http.close()
                self._http = None
                if attempt == 2:
                    raise
                continue
            self.gets += 1
            if response.status == 404 and missing_ok:
                return None
            if response.status != 200:
                raise OSError(f"GET {path}: HTTP {response.status}")
            return body
        raise AssertionError("unreachable")


def make_devices(
    n: int, *, start: int = 0, group: str, model: str, version: str, seed: str, regress: dict[str, tuple[str, float]]
) -> list[SimDevice]:
    """Devices dev-00000.. spread over architectures and providers; `regress`: version -> (mode, fraction),
    mode `p95` (x3), `cpu` (a fall back to CPUExecutionProvider) or `mixed`. A device that runs on the CPU
    already cannot fall back: it regresses on p95 instead, so that the share that regresses is `fraction`."""
    out = []
    for i in range(start, start + n):
        name = f"dev-{i:05d}"
        modes = {v: m for v, (mode, fraction) in regress.items() if (m := regression(name, mode, fraction))}
        if PROVIDERS[i % 3] == "CPUExecutionProvider":
            modes = dict.fromkeys(modes, "p95")
        out.append(
            SimDevice(
                name,
                group,
                device_key(seed, name),
                ARCHS[i % 2],
                PROVIDERS[i % 3],
                model,
                version,
                modes,
                base_p95=8.0 + (i % 7),
            )  # fmt: skip
        )
    return out


def write_inventory(path: Path, devices: list[SimDevice]) -> None:
    path.write_text("devices:\n" + "".join(enrollment_entry(d.id, d.group, d.key) for d in devices))


def main() -> None:
    """One process of simulated devices, for the bench: prints `online N` when all are connected, then, when
    stdin closes, one JSON line (registry GETs, the devices per version they run now and per version they
    ever ran) and exits."""
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--registry", required=True)
    p.add_argument("--registry-key", type=Path, required=True, help="the pinned key (a root key, or a single key)")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--group", default="g")
    p.add_argument("--model", default="m")
    p.add_argument("--version", default="1.0.0")
    p.add_argument("--seed", default="bench")
    p.add_argument("--regress", action="append", default=[], metavar="VERSION:MODE:FRACTION")
    args = p.parse_args()
    regress = {v: (m, float(f)) for v, m, f in (r.split(":") for r in args.regress)}
    devices = make_devices(
        args.count, start=args.start, group=args.group, model=args.model, version=args.version, seed=args.seed,
        regress=regress,
    )  # fmt: skip
    fleet = SimFleet(devices, args.port, args.registry, load_public_keys(args.registry_key)).start()
    while fleet.online() < len(devices):
        time.sleep(0.1)
    print(f"online {len(devices)}", flush=True)
    sys.stdin.read()
    fleet.stop()
    now: dict[str, int] = {}
    ever: dict[str, int] = {}
    for dev in devices:
        now[dev.version] = now.get(dev.version, 0) + 1
        for version in dev.ran:
            ever[version] = ever.get(version, 0) + 1
    print(json.dumps({"gets": fleet.gets, "running": now, "ran": ever}), flush=True)


if __name__ == "__main__":
    main()
