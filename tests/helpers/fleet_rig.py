"""A rollout rig for tests: a broker, a registry with versions of model `m`, simulated devices, their
inventory, and the real controller as a process that a test can kill -9 and start again."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from agent.cloud.fleet.state import Rollout, StateDB, Target
from agent.models.signing import load_public_keys
from tests.helpers.broker import Mosquitto
from tests.helpers.registry import Registry, make_registry
from tests.helpers.simfleet import SimFleet, make_devices, write_inventory
from tests.helpers.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
VERSIONS = ("1.0.0", "2.0.0", "3.0.0")


class ControllerProcess:
    """`edge-agent fleet controller` in a subprocess, its log in a file."""

    def __init__(
        self, tmp: Path, broker: Mosquitto, key: Path, inventory: Path, name: str = "c1", registry: str | None = None
    ) -> None:
        self.tmp, self.db = tmp, tmp / "controller.db"
        self.argv = [sys.executable, "-m", "agent", "fleet", "controller", "--broker", broker.url, "--db", str(self.db),
                     "--key", str(key), "--inventory", str(inventory), "--lease", "3s", "--name", name]  # fmt: skip
        if registry is not None:
            self.argv += ["--registry", registry]  # the key is checked against its keys/root.json
        self.log = tmp / f"controller-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready: bool = True) -> ControllerProcess:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=log, cwd=REPO)
        if ready:
            started = self.text().count("fleet read devices=")
            assert wait_for(lambda: self.text().count("fleet read devices=") > started, 30), self.text()[-3000:]
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Rig:
    tmp: Path
    broker: Mosquitto
    registry: Registry
    fleet: SimFleet
    inventory: Path
    controller: ControllerProcess
    started: list[str] = field(default_factory=list)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "agent", "fleet", "rollout", *args, "--db", str(self.controller.db)]
        return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=60)

    def start_rollout(self, version: str, *args: str) -> str:
        run = self.cli("start", "--model", "m", "--version", version, "--to", "group:g", *args)
        assert run.returncode == 0, run.stderr
        rollout_id = run.stdout.split()[1].rstrip(":")
        self.started.append(rollout_id)
        return rollout_id

    def rollout(self, rollout_id: str) -> Rollout:
        db = StateDB(self.controller.db)
        try:
            found = db.rollout(rollout_id)
            assert found is not None
            return found
        finally:
            db.close()

    def targets(self, rollout_id: str) -> list[Target]:
        db = StateDB(self.controller.db)
        try:
            return db.targets(rollout_id)
        finally:
            db.close()

    def events(self) -> list[tuple[float, str | None, str, str]]:
        db = StateDB(self.controller.db)
        try:
            return db.events(limit=1000)
        finally:
            db.close()

    def wait_state(self, rollout_id: str, *states: str, timeout: float = 60) -> Rollout:
        assert wait_for(lambda: self.rollout(rollout_id).state in states, timeout, interval=0.1), (
            f"{self.rollout(rollout_id)}\n{[(t.device, t.state, t.reason) for t in self.targets(rollout_id)]}\n"
            f"{self.controller.text()[-3000:]}"
        )
        return self.rollout(rollout_id)

    def versions(self) -> dict[str, str]:
        return {d.id: d.version for d in self.fleet.devices}


def make_rig(tmp: Path, broker: Mosquitto, n: int = 8, regress: dict[str, tuple[str, float]] | None = None) -> Rig:
    registry = make_registry(tmp / "reg")
    for version in VERSIONS:
        registry.publish("m", version, registry.tiny(f"m-{version}"), channel="stable" if version == "1.0.0" else None)
    devices = make_devices(n, group="g", model="m", version="1.0.0", seed="test", regress=regress or {})
    inventory = tmp / "inventory.yaml"
    write_inventory(inventory, devices)
    fleet = SimFleet(devices, broker.port, registry.url, load_public_keys(registry.public_key)).start()
    assert wait_for(lambda: fleet.online() == n, 30)
    controller = ControllerProcess(tmp, broker, registry.key, inventory, registry=registry.url)
    return Rig(tmp, broker, registry, fleet, inventory, controller)
