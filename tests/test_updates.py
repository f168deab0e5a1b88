"""Model updates that must not go wrong silently, on real agents (`edge-agent run`), a real registry and
Mosquitto: held versions stay held, withdrawn orders are forgotten, NaN is caught, rollbacks walk back,
and power cuts are not mistaken for crashes (issue 13, defects 2 to 7)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.models.crashguard import CrashGuard
from agent.models.store import Store
from tests.helpers.broker import Mosquitto
from tests.helpers.daemon_proc import REPO, AgentProcess, heavy_linear, sensor_csv
from tests.helpers.faulty_models import nan_model, slow_model, zipmap_classifier
from tests.helpers.mqtt_client import Subscriber
from tests.helpers.registry import Registry, make_registry
from tests.helpers.waiting import wait_for
from tests.test_e2e_daemon import command, deploy, linear, wait_until

pytestmark = pytest.mark.slow


@dataclass
class Device:
    """One real agent serving model m (channel stable) from the test's registry, polling every second,
    and a subscriber to everything it publishes."""

    agent: AgentProcess
    broker: Mosquitto
    registry: Registry
    sub: Subscriber

    @property
    def name(self) -> str:
        return self.agent.device

    @property
    def store(self) -> Store:
        return Store(self.agent.state_dir)

    def start(self) -> Device:
        self.agent.start()
        return self

    def events(self, type_: str, version: str | None = None, after: int = 0) -> list[dict[str, Any]]:
        """The device's events of `type_` (about `version`), past the first `after` ones."""
        found = self.sub.payloads(f"edge/{self.name}/events")[after:]
        return [e for e in found if e["type"] == type_ and (version is None or e.get("version") == version)]

    def mark(self) -> int:
        """How many events so far: `events(..., after=mark)` reads only what comes next."""
        return len(self.sub.on(f"edge/{self.name}/events"))

    def results(self) -> list[dict[str, Any]]:
        return self.sub.payloads(f"edge/{self.name}/p/results")

    def serves(self, version: str) -> bool:
        rows = self.results()[-3:]
        return bool(rows) and {r["model_version"] for r in rows} == {version}

    def health(self) -> dict[str, Any]:
        reports = self.sub.payloads(f"edge/{self.name}/health")
        return reports[-1] if reports else {}

    def wait(self, check: Callable[[], Any], timeout: float, what: str) -> Any:
        return wait_until(check, timeout, what, [self.agent])

    def deploy(self, version: str, *extra: str, wait: str = "60s") -> subprocess.CompletedProcess[str]:
        """`edge-agent fleet deploy` of m `version` to this device."""
        return deploy(self.broker, self.registry, version, f"device:{self.name}", *extra, wait=wait)

    def command(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        return command(self.sub, self.name, name, args)

    def withdraw(self) -> None:
        """What withdrawing an order is: an empty retained payload on its topic."""
        self.sub.client.publish(f"edge/{self.name}/deploy", b"", qos=1, retain=True).wait_for_publish(5)


@pytest.fixture
def make_device(tmp_path: Path, own_broker: Mosquitto) -> Iterator[Callable[..., Device]]:
    """`make_device(name, probation=..., csv=..., model=...)`: a Device, not started yet; its registry
    serves m 1.0.0 on stable (publish more with `device.registry.publish`)."""
    registry = make_registry(tmp_path / "reg")
    registry.publish("m", "1.0.0", linear(tmp_path, "v1", 1.0), channel="stable")
    made: list[Device] = []

    def make(name: str, probation: object = "20s", csv: Path | None = None, **extra: Any) -> Device:
        settings = {"poll_interval": "1s", "probation": {"duration": probation, "min_inferences": 20}}
        agent = AgentProcess(
            tmp_path,
            name,
            "g",
            own_broker.url,
            registry.url,
            registry.public_key,
            csv=csv or sensor_csv(tmp_path / "sensor.csv"),
            registry=settings,
            **extra,
        )
        made.append(Device(agent, own_broker, registry, Subscriber(own_broker.port, "edge/#")))
        return made[-1]

    yield make
    for device in made:
        device.agent.stop()
        device.sub.close()
    registry.server.stop()


def test_a_rolled_back_version_stays_held_until_an_order_overrides_it(make_device: Callable[..., Device]) -> None:
    dev = make_device("dev-h", probation=0).start()
    dev.registry.publish("m", "2.0.0", linear(dev.agent.dir, "v2", 2.0), channel=None)
    dev.wait(dev.results, 60, "first results")
    out = dev.deploy("2.0.0")
    assert out.returncode == 0, out.stdout + out.stderr
    dev.wait(lambda: dev.events("model.active", "2.0.0"), 10, "v2 active")

    # The operator's rollback; the order still names 2.0.0, and the device polls every second.
    before = dev.mark()
    reply = dev.command("rollback", {"model": "m"})
    assert reply["ok"] and reply["result"] == {"model": "m", "version": "1.0.0", "from": "2.0.0"}, reply
    time.sleep(4)
    assert dev.events("model.activated", after=before) == [], "the next poll undid the rollback"
    # Results travel through the outbox: under load the last few seen may still be 2.0.0's.
    assert wait_for(lambda: dev.serves("1.0.0"), 20, 0.1), dev.results()[-3:]
    held = dev.wait(lambda: dev.health().get("models", {}).get("m", {}).get("held"), 10, "the held list in health")
    assert [(h["version"], h["reason"]) for h in held] == [("2.0.0", "rolled back by the rollback command")]
    assert held[0]["since"].startswith("20")
    listed = subprocess.run(
        [sys.executable, "-m", "agent", "models", "list", "--state-dir", str(dev.agent.state_dir)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert "  held: 2.0.0 since 20" in listed.stdout and "rolled back by the rollback command" in listed.stdout

    # A new order naming it without an override: refused, with the reason, and nothing changes.
    refused = dev.deploy("2.0.0")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "2.0.0 is held on this device (rolled back by the rollback command)" in refused.stdout
    assert dev.store.active("m").version == "1.0.0"
    # With the override (a rollback order names it on purpose): installed again, and no longer held.
    again = dev.deploy("2.0.0", "--allow-older")
    assert again.returncode == 0, again.stdout + again.stderr
    assert dev.store.held("m") == []


def test_a_version_probation_rolled_back_is_not_reinstalled_and_its_next_probation_is_judged_afresh(
    make_device: Callable[..., Device],
) -> None:
    dev = make_device("dev-p").start()
    dev.registry.publish("m", "2.0.0", heavy_linear(dev.agent.dir / "v2.onnx", 1.0, 256, 12), channel=None)
    dev.wait(lambda: len(dev.results()) > 30, 60, "results")
    dev.deploy("2.0.0", wait="0s")
    rolled = dev.wait(lambda: dev.events("model.rolled_back", "2.0.0"), 90, "the rollback")
    assert "probation failed: inference p95" in rolled[0]["reason"], rolled
    before = dev.mark()
    time.sleep(4)  # four polls of an order that still names 2.0.0
    assert dev.events("model.activated", after=before) == [], "the rolled-back version came back"
    assert rolled[0]["cause"] == "probation"

    # Deployed again on purpose: its probation compares with 1.0.0's own latency, and fails again.
    dev.deploy("2.0.0", "--allow-older", wait="0s")
    dev.wait(lambda: dev.events("model.active", "2.0.0", after=before), 60, "v2 again")
    again = dev.wait(lambda: dev.events("model.rolled_back", "2.0.0", after=before), 90, "the second rollback")
    assert "probation failed: inference p95" in again[0]["reason"], again


def test_a_withdrawn_order_is_forgotten_and_the_device_follows_its_channel_again(
    make_device: Callable[..., Device],
) -> None:
    dev = make_device("dev-w", probation=0).start()
    publish = dev.registry.publish
    publish("m", "2.0.0", linear(dev.agent.dir, "v2", 2.0), channel=None)
    dev.wait(dev.results, 60, "first results")
    assert dev.deploy("2.0.0").returncode == 0
    order = dev.wait(lambda: dev.events("model.active", "2.0.0"), 10, "v2 active")[0]["order"]

    dev.withdraw()
    withdrawn = dev.wait(lambda: dev.events("deploy.withdrawn"), 10, "the withdrawal")
    assert withdrawn[0] == {**withdrawn[0], "order": order, "model": "m", "version": "2.0.0"}
    dev.wait(lambda: dev.events("model.active", "1.0.0"), 20, "back on the channel's 1.0.0")
    assert order not in (dev.agent.state_dir / "orders.json").read_text()

    # After a restart the device still follows its channel: it moves to 3.0.0 with it.
    assert dev.agent.terminate() == 0
    dev.start()
    publish("m", "3.0.0", linear(dev.agent.dir, "v3", 3.0), channel="stable")
    dev.wait(lambda: dev.events("model.active", "3.0.0"), 60, "the channel's 3.0.0")
    dev.wait(lambda: dev.serves("3.0.0"), 20, "v3 results")

    # Withdrawn while the device is away: nothing is retained any more, so no empty payload reaches it;
    # the order the broker no longer has is forgotten once the device is back.
    publish("m", "4.0.0", linear(dev.agent.dir, "v4", 4.0), channel=None)
    assert dev.deploy("4.0.0").returncode == 0
    assert dev.agent.terminate() == 0
    dev.withdraw()
    before = dev.mark()
    dev.start()
    dev.wait(lambda: dev.events("deploy.withdrawn", "4.0.0", after=before), 60, "the late withdrawal")
    dev.wait(lambda: dev.events("model.active", "3.0.0", after=before), 20, "back on 3.0.0")
    assert json.loads((dev.agent.state_dir / "orders.json").read_text()) == {}


def test_a_model_that_outputs_only_nan_is_rolled_back_by_probation(make_device: Callable[..., Device]) -> None:
    dev = make_device("dev-n").start()
    # Published without test vectors: nothing catches it before probation.
    dev.registry.publish("m", "2.0.0", nan_model(dev.agent.dir / "nan.onnx"), channel=None, no_tests=True)
    dev.wait(lambda: len(dev.results()) > 30, 60, "results")
    # Health is published every second, on its own schedule: wait for one that reports the pipeline.
    pipeline = dev.wait(lambda: dev.health().get("pipelines", {}).get("p"), 20, "the pipeline in health")
    assert pipeline["nan_outputs"] == 0, pipeline
    dev.deploy("2.0.0", wait="0s")
    rolled = dev.wait(lambda: dev.events("model.rolled_back", "2.0.0"), 60, "the rollback")
    assert rolled[0]["cause"] == "probation" and rolled[0]["to"] == "1.0.0"
    assert "inferences gave NaN or infinite outputs" in rolled[0]["reason"], rolled
    # A health report published before the rollback may still be the latest seen: wait for the full count.
    counted = wait_for(lambda: dev.health().get("pipelines", {}).get("p", {}).get("nan_outputs", 0) >= 5, 20, 0.1)
    assert counted, f"fewer than 5 NaN outputs counted in health: {dev.health()}"
    assert dev.store.held_reason("m", "2.0.0") == rolled[0]["reason"]


def test_a_scikit_learn_zipmap_model_with_default_vectors_runs_on_the_device(
    make_device: Callable[..., Device],
) -> None:
    dev = make_device("dev-z", model="clf")
    dev.registry.publish("clf", "1.0.0", zipmap_classifier(dev.agent.dir / "clf.onnx"), channel="stable")
    dev.start()
    rows = dev.wait(dev.results, 60, "results of the classifier")
    output = rows[0]["output"]
    assert set(output) == {"output_label", "output_probability"}, output
    assert set(output["output_probability"][0]) == {"0", "1"} and rows[0]["model_version"] == "1.0.0"
    assert dev.agent.proc is not None and dev.agent.proc.poll() is None


def test_rollbacks_walk_back_through_history_and_the_command_honours_its_version(
    make_device: Callable[..., Device],
) -> None:
    dev = make_device("dev-r", probation=0).start()
    dev.wait(dev.results, 60, "first results")
    for version, weight in (("2.0.0", 2.0), ("3.0.0", 3.0)):
        dev.registry.publish("m", version, linear(dev.agent.dir, f"v{weight}", weight), channel="stable")
        dev.wait(lambda v=version: dev.events("model.active", v), 30, f"{version} active")

    first = dev.command("rollback", {"model": "m"})
    second = dev.command("rollback", {"model": "m"})
    assert (first["result"]["version"], second["result"]["version"]) == ("2.0.0", "1.0.0"), (first, second)
    third = dev.command("rollback", {"model": "m"})
    assert third["ok"] is False and "m has no earlier version to roll back to" in third["error"]["message"]
    named = dev.command("rollback", {"model": "m", "version": "3.0.0"})
    assert named["result"] == {"model": "m", "version": "3.0.0", "from": "1.0.0"}, named
    # The reply goes straight out; the events come through the outbox, a moment later.
    dev.wait(lambda: len(dev.events("model.rolled_back")) >= 3, 20, "the third rollback event")
    assert [(e["version"], e["to"], e["cause"]) for e in dev.events("model.rolled_back")] == [
        ("3.0.0", "2.0.0", "command"),
        ("2.0.0", "1.0.0", "command"),
        ("1.0.0", "3.0.0", "command"),
    ]
    dev.wait(lambda: dev.serves("3.0.0"), 20, "v3 serving")


def test_power_cuts_before_any_data_arrives_do_not_roll_back_a_good_model(
    tmp_path: Path, make_device: Callable[..., Device]
) -> None:
    quiet = tmp_path / "quiet.csv"
    quiet.write_text("a,b,c\n")  # a sensor that has sent nothing yet
    dev = make_device("dev-c", probation=0, csv=quiet)
    profile = json.loads(dev.agent.profile.read_text())
    profile["pipelines"][0]["source"]["follow"] = True
    dev.agent.profile.write_text(json.dumps(profile))
    dev.registry.publish("m", "2.0.0", linear(tmp_path, "v2", 2.0), channel=None)
    dev.start()
    dev.wait(lambda: dev.events("agent.started"), 60, "the start")
    assert dev.deploy("2.0.0").returncode == 0
    dev.wait(lambda: dev.events("model.active", "2.0.0"), 10, "v2 active")
    for cut in range(1, 4):  # three power cuts, each once the agent is up again, before any data
        time.sleep(1)
        dev.agent.kill9()
        dev.start()
        dev.wait(lambda n=cut: len(dev.events("agent.started")) > n, 60, f"start {cut + 1}")
    time.sleep(2)
    assert dev.events("model.rolled_back") == [], dev.agent.stderr()[-2000:]
    assert dev.store.active("m").version == "2.0.0" and CrashGuard(dev.agent.state_dir).pending("m") is None
    assert dev.health()["models"]["m"]["version"] == "2.0.0"


def test_a_version_the_agent_dies_warming_up_three_starts_in_a_row_is_rolled_back(
    make_device: Callable[..., Device],
) -> None:
    dev = make_device("dev-k").start()
    dev.registry.publish("m", "2.0.0", slow_model(dev.agent.dir / "slow.onnx"), channel=None, no_tests=True)
    guard = CrashGuard(dev.agent.state_dir)
    dev.wait(dev.results, 60, "first results")
    dev.deploy("2.0.0", wait="0s")
    for attempt in (1, 2, 3):  # each warm-up of 2.0.0 takes seconds: a kill -9 lands in it, as an OOM kill would
        dev.wait(lambda n=attempt: (p := guard.pending("m")) is not None and p.attempts == n, 60, f"load {attempt}")
        time.sleep(1)
        dev.agent.kill9()
        dev.start()
    rolled = dev.wait(lambda: dev.events("model.rolled_back", "2.0.0"), 60, "the rollback")
    assert (rolled[0]["cause"], rolled[0]["to"]) == ("crash_guard", "1.0.0"), rolled
    assert "was loading when the agent died 3 starts in a row" in rolled[0]["reason"]
    dev.wait(lambda: dev.serves("1.0.0"), 30, "v1 serving")
    assert dev.store.held_reason("m", "2.0.0") == rolled[0]["reason"]
