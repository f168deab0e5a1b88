"""Fleet at scale: N simulated devices (tests/helpers/simfleet.py) on one Mosquitto, a static registry
behind nginx (or the project's server), and the real rollout controller (`edge-agent fleet controller`).

Measured side by side in one run:
- `fleet status`: the wall time of the real command line, and how many devices it printed; again once
  the rollouts left their orders retained, one per device (`--json`: devices, orders, the table per group);
- a rollout in four waves with no soak: from `fleet rollout start` to completed, every device counted
  only on its signed report; the controller's peak RSS; the broker's messages per second;
- a rollout whose version regresses on 10% of the devices (p95 x3 or a CPU fallback): when it aborts,
  in which wave, and whether every device that took the version was rolled back (and no device of a
  later wave saw it), as the simulated devices themselves say at the end (what they run, what they ran).

The registry has signing roles (docs/trust.md): the devices pin its root key and verify orders and
manifests with the online keys its keys/root.json names.

Prints a table, writes bench/results/fleet.json. The broker runs with Mosquitto's defaults (only a
listener and $SYS every second), as operators run it: `max_queued_messages` 1000 included.

    .venv/bin/python bench/bench_fleet.py --devices 10000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.cloud.fleet.state import StateDB
from agent.cloud.publish import publish
from agent.cloud.roots import first, install, sign_draft, write_draft
from agent.cloud.server import RegistryHTTPServer
from agent.device.onnxproto import AI_ONNX, identity_model
from agent.models.signing import generate_keypair, load_private_key, load_public_keys
from agent.models.trust import ROLES
from tests.helpers.broker import Mosquitto
from tests.helpers.mqtt_client import Subscriber
from tests.helpers.nginx import Nginx, nginx_binary
from tests.helpers.simfleet import make_devices, write_inventory

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
SEED = "bench"


class Broker(Mosquitto):
    """Mosquitto with its defaults: the test helper's raised `max_queued_messages` taken out again."""

    def _write_conf(self) -> Path:
        conf = super()._write_conf()
        text = conf.read_text().replace("max_queued_messages 100000\n", "")
        conf.write_text(text + "sys_interval 1\n")
        return conf


class Sampler:
    """The controller's peak RSS, sampled while a rollout runs."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return round(self.peak / 2**20, 1)


def broker_counts(port: int) -> tuple[int, int]:
    """Messages the broker received and sent so far ($SYS, refreshed every second)."""
    topics = ("$SYS/broker/messages/received", "$SYS/broker/messages/sent")
    sub = Subscriber(port, *topics)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not all(sub.on(t) for t in topics):
            time.sleep(0.05)
        return int(sub.on(topics[0])[-1].payload), int(sub.on(topics[1])[-1].payload)
    finally:
        sub.close()


def registry_with_roles(work: Path) -> tuple[Path, Path, Path]:
    """(registry folder, the online key that signs manifests and orders, the root public key devices pin)."""
    key, public = generate_keypair(work / "keys")
    root_key, root_public = generate_keypair(work / "offline", "root")
    online = load_public_keys(public)
    draft = write_draft(first(load_public_keys(root_public), 1, dict.fromkeys(ROLES, online)), work / "drafts")
    sign_draft(draft, load_private_key(root_key))
    install(work / "registry", draft)
    return work / "registry", key, root_public


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], capture_output=True, text=True, cwd=REPO, timeout=timeout
    )


def wait_rollout(db_path: Path, states: tuple[str, ...], timeout: float) -> tuple[str, float]:
    """(the rollout's final state, seconds) once the latest rollout reaches one of `states`."""
    start = time.monotonic()
    db = StateDB(db_path)
    try:
        while time.monotonic() - start < timeout:
            rollouts = db.rollouts()
            if rollouts and rollouts[-1].state in states:
                return rollouts[-1].state, round(time.monotonic() - start, 2)
            time.sleep(0.05)
        return (db.rollouts()[-1].state if db.rollouts() else "none"), round(time.monotonic() - start, 2)
    finally:
        db.close()


def rollout(db_path: Path, version: str, waves: str, port: int, pid: int, timeout: float) -> dict[str, Any]:
    before = broker_counts(port)
    sampler = Sampler(pid)
    started = time.monotonic()
    run = cli("fleet", "rollout", "start", "--db", str(db_path), "--model", "m", "--version", version,
              "--to", "group:g", "--waves", waves, "--soak", "0s", "--device-timeout", "60s")  # fmt: skip
    if run.returncode != 0:
        raise SystemExit(f"rollout start failed: {run.stderr}")
    state, _ = wait_rollout(db_path, ("completed", "aborted"), timeout)
    seconds = round(time.monotonic() - started, 2)
    rss = sampler.stop()
    time.sleep(1.5)  # $SYS counters are refreshed every second: wait for the one after the rollout
    after = broker_counts(port)
    shown = json.loads(cli("fleet", "rollout", "status", "--db", str(db_path), "--json").stdout)
    return {
        "version": version,
        "state": state,
        "seconds": seconds,
        "controller_rss_mb": rss,
        "broker_msgs_per_s": round((after[0] - before[0] + after[1] - before[1]) / max(seconds, 0.001)),
        "broker_received": after[0] - before[0],
        "broker_sent": after[1] - before[1],
        "waves": shown["waves"],
        "states": shown["states"],
        "rollback": shown["rollback"],
        "reason": shown["reason"],
    }


def status_after(url: str) -> dict[str, Any]:
    """`fleet status --json` once the rollouts left their orders retained (a device order each, the group's):
    its time, and what it counted."""
    started = time.monotonic()
    run = cli("fleet", "status", "--broker", url, "--json")
    seconds = round(time.monotonic() - started, 2)
    if run.returncode != 0:
        raise SystemExit(f"fleet status failed: {run.stderr}")
    state = json.loads(run.stdout)
    return {"seconds": seconds, "devices": len(state["devices"]), "orders": len(state["orders"]),
            "groups": state["groups"], "versions": state["versions"]}  # fmt: skip


def devices_say(procs: list[subprocess.Popen[str]]) -> dict[str, Any]:
    """End the simulated devices' processes and add up what each says: registry GETs, the devices per
    version they run now and per version they ever ran."""
    total: dict[str, Any] = {"gets": 0, "running": {}, "ran": {}}
    for proc in procs:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        said = json.loads(proc.stdout.readline())
        total["gets"] += said["gets"]
        for key in ("running", "ran"):
            for version, count in said[key].items():
                total[key][version] = total[key].get(version, 0) + count
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=10000)
    p.add_argument("--processes", type=int, default=2, help="processes of simulated devices (default: 2)")
    p.add_argument("--regress", type=float, default=0.10, help="share of devices the bad version regresses on")
    args = p.parse_args()
    n = args.devices
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 1000:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n * 2 + 1000), hard))
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    procs: list[subprocess.Popen[str]] = []
    server: Nginx | RegistryHTTPServer | None = None
    broker = Broker(work / "mosquitto")
    try:
        registry, key, pinned = registry_with_roles(work)
        model = work / "m.onnx"
        model.write_bytes(identity_model(8, {AI_ONNX: 13}))
        for version in ("1.0.0", "2.0.0", "3.0.0"):
            publish(registry, "m", version, model, key, channel="stable" if version == "1.0.0" else None,
                    no_tests=True)  # fmt: skip
        if nginx_binary() is not None:
            server = Nginx(registry, work / "nginx").start()
            registry_url, served_by = server.url, "nginx"
        else:
            server = RegistryHTTPServer(registry)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            registry_url, served_by = server.url, "edge-agent registry server"
        broker.start()
        t0 = time.monotonic()
        per = n // args.processes
        for k in range(args.processes):
            count = per if k < args.processes - 1 else n - per * k
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "tests.helpers.simfleet",
                        "--port",
                        str(broker.port),
                        "--registry",
                        registry_url,
                        "--registry-key",
                        str(pinned),
                        "--start",
                        str(k * per),
                        "--count",
                        str(count),
                        "--seed",
                        SEED,
                        "--regress",
                        f"3.0.0:mixed:{args.regress}",
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    cwd=REPO,
                )  # fmt: skip
            )
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line.startswith("online"):
                raise SystemExit(f"simulated devices did not come up: {line!r}")
        connect_s = round(time.monotonic() - t0, 1)
        inventory = work / "inventory.yaml"
        write_inventory(inventory, make_devices(n, group="g", model="m", version="1.0.0", seed=SEED, regress={}))

        t = time.monotonic()
        status = cli("fleet", "status", "--broker", broker.url)
        status_s = round(time.monotonic() - t, 2)
        status_rows = sum(1 for line in status.stdout.splitlines() if line.startswith("dev-"))

        db_path = work / "controller.db"
        log = (work / "controller.log").open("w")
        controller = subprocess.Popen(
            [sys.executable, "-m", "agent", "fleet", "controller", "--broker", broker.url, "--db", str(db_path),
             "--key", str(key), "--registry", registry_url, "--inventory", str(inventory)],
            stdout=subprocess.DEVNULL, stderr=log, cwd=REPO,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while "fleet read devices=" not in (work / "controller.log").read_text():
            if time.monotonic() > deadline or controller.poll() is not None:
                raise SystemExit("the controller did not start:\n" + (work / "controller.log").read_text()[-2000:])
            time.sleep(0.1)
        good = rollout(db_path, "2.0.0", "25%,50%,75%,100%", broker.port, controller.pid, 300)
        bad = rollout(db_path, "3.0.0", "25%,50%,75%,100%", broker.port, controller.pid, 300)
        controller.terminate()
        controller.wait(30)
        after = status_after(broker.url)
        devices = devices_say(procs)
        sent = sum(n for w in bad["waves"] for state, n in w["states"].items() if state != "planned")
        bad["devices_sent_the_version"] = sent
        bad["devices_that_ran_it"] = devices["ran"].get("3.0.0", 0)
        bad["devices_running_now"] = devices["running"]
        gets = sum(1 for r in server.log() if r.method == "GET") if isinstance(server, Nginx) else devices["gets"]
        result = {
            "devices": n,
            "processes": args.processes,
            "registry": served_by,
            "connect_s": connect_s,
            "status_s": status_s,
            "status_devices": status_rows,
            "status_after_rollouts": after,
            "rollout": good,
            "regressing_rollout": bad,
            "registry_gets": gets,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "command": " ".join([".venv/bin/python", "bench/bench_fleet.py", *sys.argv[1:]]),
        }
    finally:
        for proc in procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        if isinstance(server, Nginx):
            server.stop()
        elif server is not None:
            server.shutdown()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fleet.json").write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)


def print_table(r: dict[str, Any]) -> None:
    good, bad = r["rollout"], r["regressing_rollout"]
    rows = [
        (
            "devices (simulated, one Mosquitto)",
            f"{r['devices']} in {r['processes']} processes, up in {r['connect_s']} s",
        ),
        ("fleet status: devices printed / time", f"{r['status_devices']} / {r['status_s']} s (bound: 5 s)"),
        (
            "  again after the rollouts: devices / orders / time",
            f"{r['status_after_rollouts']['devices']} / {r['status_after_rollouts']['orders']} / "
            f"{r['status_after_rollouts']['seconds']} s",
        ),
        (
            "  per group: on latest / devices",
            ", ".join(
                f"{g['group']} {g['model']} {g['latest']}: {g['on_latest']} / {g['devices']}"
                for g in r["status_after_rollouts"]["groups"]
            ),
        ),  # fmt: skip
        ("rollout 4 waves, no soak: state / time", f"{good['state']} / {good['seconds']} s (bound: 60 s)"),
        ("  devices passed on a signed report", str(good["states"].get("passed", 0))),
        ("  controller peak RSS", f"{good['controller_rss_mb']} MiB"),
        ("  broker messages/s (in + out)", f"{good['broker_msgs_per_s']}"),
        ("regressing rollout: state / time", f"{bad['state']} / {bad['seconds']} s"),
        ("  why", str(bad["reason"])),
        ("  waves reached", ", ".join(f"{w['wave'] + 1}: {w['states']}" for w in bad["waves"])),
        ("  rollback orders", str(bad["rollback"])),
        (
            "  devices sent it / ran it / run now",
            f"{bad['devices_sent_the_version']} / {bad['devices_that_ran_it']} / {bad['devices_running_now']}",
        ),
        ("registry GETs (manifest + signature)", str(r["registry_gets"])),
    ]
    width = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"{a.ljust(width)}  {b}")


if __name__ == "__main__":
    main()
