"""Each deployment outcome end to end: real agents (`edge-agent run`), a real registry and Mosquitto, and
the real `edge-agent fleet deploy` command line. A case publishes version 2.0.0 of model `m` to a group of
two devices that serve 1.0.0, deploys it, and checks what the command printed, its exit code, whether
the group order was written, and what each device serves at the end (from its own retained health).

What the agents publish is checked against the wire contract as it arrives (tests/helpers/daemon_proc.py).
To add an outcome: one test that prepares the version with `fleet.publish`, calls `fleet.deploy` and
ends with `assert_outcome`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from agent.models.crashguard import CrashGuard
from agent.models.vectors import encode
from agent.transport.contract import parse_health
from tests.helpers.broker import Mosquitto
from tests.helpers.daemon_proc import REPO, AgentProcess, heavy_linear, sensor_csv
from tests.helpers.faulty_models import flaky_model, nan_model, slow_model
from tests.helpers.models import linear_model, save
from tests.helpers.mqtt_client import Subscriber
from tests.helpers.registry import Registry, make_registry
from tests.helpers.waiting import wait_for

pytestmark = pytest.mark.slow

GROUP = "g1"
DEVICES = ("dev-a", "dev-b")  # dev-a sorts first: the canary of `--canary 1`
NEW = "2.0.0"


@dataclass
class Fleet:
    """Two real agents of one group serving m 1.0.0, their registry and their broker."""

    tmp: Path
    broker: Mosquitto
    registry: Registry
    agents: list[AgentProcess]

    def publish(self, version: str, file: Path, **kwargs: object) -> None:
        self.registry.publish("m", version, file, channel=None, **kwargs)

    def deploy(self, version: str, *args: str, wait: str = "60s") -> subprocess.CompletedProcess[str]:
        """The real command line, as an operator runs it."""
        argv = ["fleet", "deploy", "--broker", self.broker.url, "--key", str(self.registry.key), "--settle", "1s"]
        argv += ["--model", "m", "--version", version, "--to", f"group:{GROUP}", "--wait", wait, *args]
        return subprocess.run(
            [sys.executable, "-m", "agent", *argv], capture_output=True, text=True, cwd=REPO, timeout=300
        )

    def serving(self) -> dict[str, str | None]:
        """What each device's retained health says it serves."""
        sub = Subscriber(self.broker.port, "edge/+/health")
        try:
            sub.sync()  # every retained health is in (a device that has none yet serves None)
            seen: dict[str, str | None] = dict.fromkeys(DEVICES)
            for device in DEVICES:
                messages = sub.on(f"edge/{device}/health")
                if messages:  # the latest: a live health may follow the retained one
                    served = parse_health(messages[-1].payload).model_versions().get("m")
                    seen[device] = served.version if served is not None else None
            return seen
        finally:
            sub.close()

    def group_order(self) -> bytes | None:
        """The retained group order, if one was written and not withdrawn."""
        topic = f"edge/fleet/{GROUP}/deploy"
        sub = Subscriber(self.broker.port, topic)
        try:
            sub.sync()  # the retained order, if any, is in; the command waited for its PUBACK before it exited
            payloads = [bytes(m.payload) for m in sub.on(topic) if m.payload]
            return payloads[-1] if payloads else None
        finally:
            sub.close()

    def logs(self) -> str:
        return "\n".join(f"--- {a.device}\n{a.stderr()[-3000:]}" for a in self.agents)


def linear(tmp: Path, name: str, weight: float) -> Path:
    return save(linear_model(np.full((3, 1), weight)), tmp / f"{name}.onnx")


@pytest.fixture
def fleet(tmp_path: Path, own_broker: Mosquitto) -> Iterator[Fleet]:
    registry = make_registry(tmp_path / "reg")
    registry.publish("m", "1.0.0", linear(tmp_path, "v1", 1.0), channel="stable")
    csv = sensor_csv(tmp_path / "sensor.csv")
    agents = [
        AgentProcess(tmp_path, d, GROUP, own_broker.url, registry.url, registry.public_key, csv=csv) for d in DEVICES
    ]
    fleet = Fleet(tmp_path, own_broker, registry, agents)
    try:
        for agent in agents:
            agent.start()
        ready = wait_for(lambda: fleet.serving() == dict.fromkeys(DEVICES, "1.0.0"), 90, interval=0.5)
        assert ready, f"the agents did not come up on m 1.0.0\n{fleet.logs()}"
        yield fleet
    finally:
        for agent in agents:
            agent.stop()
        registry.server.stop()


def assert_outcome(
    fleet: Fleet,
    run: subprocess.CompletedProcess[str],
    *,
    code: int,
    says: list[str],
    group_order: bool,
    serving: dict[str, str],
) -> None:
    """The command's exit code and lines, the group order on the broker, and what the devices serve."""
    report = f"exit {run.returncode}\n{run.stdout}{run.stderr}\n{fleet.logs()}"
    assert run.returncode == code, report
    for line in says:
        assert line in run.stdout, f"{line!r} not in the output\n{report}"
    assert (fleet.group_order() is not None) == group_order, report
    assert wait_for(lambda: fleet.serving() == serving, 30, interval=0.5), f"{fleet.serving()}\n{report}"


def assert_canary_stopped(fleet: Fleet, run: subprocess.CompletedProcess[str], says: list[str]) -> None:
    """Exit 1, these lines, no group order, and both devices back on (or still on) 1.0.0."""
    assert_outcome(fleet, run, code=1, says=says, group_order=False, serving=dict.fromkeys(DEVICES, "1.0.0"))


def test_a_canary_that_goes_active_and_stays_healthy_lets_the_group_order_through(fleet: Fleet) -> None:
    sub = Subscriber(fleet.broker.port, "edge/dev-a/#")
    fleet.publish(NEW, linear(fleet.tmp, "v2", 2.0))
    run = fleet.deploy(NEW, "--canary", "1", "--probation", "3s")
    assert_outcome(
        fleet,
        run,
        code=0,
        says=[
            "canary: m 2.0.0 -> dev-a (device orders written)",
            "canary: passed; writing the group order",
            "done: 2/2 device(s) active on m 2.0.0",
        ],
        group_order=True,
        serving=dict.fromkeys(DEVICES, NEW),
    )
    # The canary's own order is withdrawn only once the group order is written, and the device carries
    # orders out in arrival order: it never went back to its channel's version in between.
    events = "edge/dev-a/events"
    withdrawn = wait_for(lambda: [e for e in sub.payloads(events) if e["type"] == "deploy.withdrawn"], 30)
    assert withdrawn and withdrawn[0]["version"] == NEW, f"{sub.payloads(events)}\n{fleet.logs()}"
    # The device follows what is left after the event, under the lock an update takes: its reply comes after.
    sub.publish("edge/dev-a/cmd/update", json.dumps({"model": "m"}))
    replied = wait_for(lambda: sub.on("edge/dev-a/cmd/update/reply"), 30)
    assert replied, f"dev-a did not answer cmd/update\n{fleet.logs()}"
    assert "version='1.0.0' previous='2.0.0'" not in fleet.logs(), fleet.logs()
    sub.close()


def test_a_canary_that_refuses_the_version_for_its_opsets_stops_the_rollout(fleet: Fleet) -> None:
    model = linear_model(np.full((3, 1), 2.0), opset=40)  # newer than any runtime: refused before it loads
    fleet.publish(NEW, save(model, fleet.tmp / "v2-opset40.onnx"), no_tests=True)
    run = fleet.deploy(NEW, "--canary", "1", "--probation", "3s")
    assert_outcome(
        fleet,
        run,
        code=1,
        says=["canary failed: dev-a refused: ", "needs ai.onnx opset 40", "the group order was not written"],
        group_order=False,
        serving=dict.fromkeys(DEVICES, "1.0.0"),
    )


def test_a_canary_whose_probation_rolls_back_for_latency_stops_the_rollout(fleet: Fleet) -> None:
    """Issue 13, defect 1: the canary's own probation rolled the new version back (far slower than the one
    before), and `fleet deploy` still said `canary: passed` and wrote the group order."""
    fleet.publish(NEW, heavy_linear(fleet.tmp / "v2-slow.onnx", 2.0, size=256, layers=12))
    run = fleet.deploy(NEW, "--canary", "1", "--probation", "60s")
    assert_outcome(
        fleet,
        run,
        code=1,
        says=["canary failed: dev-a rolled-back: probation failed: inference p95", "group order was not written"],
        group_order=False,
        serving=dict.fromkeys(DEVICES, "1.0.0"),
    )
    assert "canary: passed" not in run.stdout


def test_a_canary_that_refuses_the_version_for_its_test_vectors_stops_the_rollout(fleet: Fleet) -> None:
    fleet.publish(NEW, linear(fleet.tmp, "v2", 2.0))
    wrong = fleet.registry.put(encode({"y": np.full((1, 1), 99.0, np.float32)}))
    fleet.registry.resign("m", NEW, lambda doc: doc["tests"][0].update(expected=wrong))
    run = fleet.deploy(NEW, "--canary", "1", "--probation", "3s")
    assert_canary_stopped(
        fleet,
        run,
        [
            "canary failed: dev-a refused: test vector fp32-0 failed on CPUExecutionProvider: output 'y' differs",
            "the group order was not written",
        ],
    )


def test_a_canary_whose_probation_rolls_back_for_errors_stops_the_rollout(fleet: Fleet) -> None:
    fleet.publish(NEW, flaky_model(fleet.tmp / "v2-flaky.onnx"))  # its first runs pass: vectors, warm-up
    run = fleet.deploy(NEW, "--canary", "1", "--probation", "60s")
    assert_canary_stopped(
        fleet, run, ["canary failed: dev-a rolled-back: probation failed: pipeline p: error rate", "not written"]
    )


def test_a_canary_whose_probation_rolls_back_for_nan_outputs_stops_the_rollout(fleet: Fleet) -> None:
    fleet.publish(NEW, nan_model(fleet.tmp / "v2-nan.onnx"), no_tests=True)  # no vectors to catch it first
    run = fleet.deploy(NEW, "--canary", "1", "--probation", "60s")
    assert_canary_stopped(
        fleet, run, ["canary failed: dev-a rolled-back: probation failed: pipeline p: ", "NaN or infinite outputs"]
    )


def test_a_canary_that_dies_warming_the_version_up_stops_the_rollout_and_its_crash_guard_rolls_back(
    fleet: Fleet,
) -> None:
    """The canary's agent is killed (-9, as the OOM killer would) while it warms the version up, and
    restarted as systemd would, three times: the crash guard rolls back, and the command, which waited
    through the canary's time offline, reports that rollback with its reason and stops the rollout."""
    fleet.publish(NEW, slow_model(fleet.tmp / "v2-slow-load.onnx"), no_tests=True)
    canary = fleet.agents[0]
    guard = CrashGuard(canary.state_dir)
    sub = Subscriber(fleet.broker.port, "edge/dev-a/events")
    argv = ["fleet", "deploy", "--broker", fleet.broker.url, "--key", str(fleet.registry.key), "--settle", "1s"]
    argv += ["--model", "m", "--version", NEW, "--to", f"group:{GROUP}", "--canary", "1", "--wait", "90s"]
    command = subprocess.Popen(
        [sys.executable, "-m", "agent", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        for attempt in (1, 2, 3):
            loading = wait_for(lambda n=attempt: (p := guard.pending("m")) is not None and p.attempts == n, 60)
            assert loading, f"load {attempt} of {NEW} did not begin\n{fleet.logs()}"
            time.sleep(1)
            canary.kill9()
            canary.start()
        out, err = command.communicate(timeout=180)
        run = subprocess.CompletedProcess(command.args, command.returncode, out, err)
        rolled = wait_for(
            lambda: [e for e in sub.payloads("edge/dev-a/events") if e["type"] == "model.rolled_back"], 60
        )
        assert rolled and rolled[0]["cause"] == "crash_guard" and rolled[0]["version"] == NEW, fleet.logs()
        # Its canary order was withdrawn once the rollback was reported: the device forgets it.
        forgot = wait_for(lambda: [e for e in sub.payloads("edge/dev-a/events") if e["type"] == "deploy.withdrawn"], 30)
        assert forgot and forgot[0]["version"] == NEW, f"{run.stdout}\n{run.stderr}\n{fleet.logs()}"
        assert "dev-a: offline; waiting for it to come back and report" in run.stdout, run.stdout
        assert_canary_stopped(
            fleet,
            run,
            [
                f"canary failed: dev-a rolled-back: {rolled[0]['reason']}; the canary orders were withdrawn",
                f"model m version {NEW} was loading when the agent died 3 starts in a row",
                "starting on 1.0.0 instead",
                "the group order was not written",
            ],
        )
        assert "not every canary reported" not in run.stdout and "no final report" not in run.stdout, run.stdout
    finally:
        command.kill()
        sub.close()


def test_a_withdrawn_canary_order_is_forgotten_and_the_canary_follows_its_channel_again(fleet: Fleet) -> None:
    """A failed canary's order is withdrawn (an empty retained payload): the device forgets it, also
    across a restart, and follows its profile's channel again."""
    sub = Subscriber(fleet.broker.port, "edge/dev-a/#")
    fleet.publish(NEW, heavy_linear(fleet.tmp / "v2-slow.onnx", 2.0, size=256, layers=12))
    run = fleet.deploy(NEW, "--canary", "1", "--probation", "60s")
    assert run.returncode == 1 and "the canary orders were withdrawn" in run.stdout, run.stdout + fleet.logs()
    withdrawn = wait_for(lambda: [e for e in sub.payloads("edge/dev-a/events") if e["type"] == "deploy.withdrawn"], 10)
    assert withdrawn and withdrawn[0]["version"] == NEW, fleet.logs()
    canary = fleet.agents[0]
    assert canary.terminate() == 0
    canary.start()
    fleet.registry.publish("m", "3.0.0", linear(fleet.tmp, "v3", 3.0), channel="stable")
    topic = "edge/dev-a/cmd/update/reply"
    for _ in range(20):  # until the restarted agent has subscribed to its commands
        sub.publish("edge/dev-a/cmd/update", json.dumps({"model": "m"}))
        if wait_for(lambda: sub.on(topic), 3):
            break
    assert sub.on(topic), f"the restarted agent never answered cmd/update\n{fleet.logs()}"
    # The first command answered did the update; one sent again while it ran (a slow machine) finds it done.
    reply = json.loads(sub.on(topic)[0].payload)
    assert reply["result"]["models"][0]["status"] == "active", [json.loads(m.payload) for m in sub.on(topic)]
    assert wait_for(lambda: fleet.serving()["dev-a"] == "3.0.0", 30, interval=0.5), fleet.logs()
    sub.close()
