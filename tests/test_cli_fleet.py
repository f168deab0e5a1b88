"""`edge-agent fleet deploy|status` against a real Mosquitto, with fake devices that behave like agents:
retained status and health (with their group), deploy orders verified with agent.deploy, and the
model.* events a daemon publishes while it follows an order. The fake devices build every message
through the agent's wire contract (agent.transport.contract), so they cannot send what an agent would
not; tests/test_fleet_outcomes.py runs the same commands against real agents."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.cli import main
from agent.models.deploy import DeployOrder, OrderError, applies_to, parse_order
from agent.models.signing import generate_keypair, load_public_keys
from agent.transport.contract import event_body, event_payload
from agent.transport.contract.health import AgentHealth, HealthReport, Memory, ModelHealth, OutboxHealth, SystemHealth
from agent.transport.contract.status import StatusMessage
from agent.transport.topics import Topics
from tests.helpers.broker import Mosquitto
from tests.helpers.mqtt_client import Subscriber

REPO = Path(__file__).resolve().parent.parent
OPSET_REASON = "variant fp32 needs ai.onnx opset 27; this runtime loads up to 26"
PROBATION_REASON = "latency p95 84.7 ms -> 212.0 ms, worse by more than the 50% allowed"


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


class FakeDevice:
    """A paho client that does what the daemon does around deployments, and nothing else.

    behaviour: "activate" (downloading, verifying, activated, then health with the new version),
    "refuse" (model.refused with OPSET_REASON), or "silent"."""

    def __init__(
        self,
        port: int,
        prefix: str,
        device: str,
        group: str,
        keys: dict[str, Any],
        behaviour: str = "activate",
        models: dict[str, str] | None = None,
        online: bool = True,
    ) -> None:
        self.topics = Topics(prefix, device, group)
        self.device, self.group, self.keys, self.behaviour = device, group, keys, behaviour
        self.models = dict(models or {"text-detector": "1.4.0"})
        self.orders: list[DeployOrder | None] = []
        self.seq = 0
        self.handled: set[str] = set()
        self.workers: list[threading.Thread] = []
        self.closed = False
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"fake-{device}-{uuid.uuid4().hex[:6]}", protocol=paho.MQTTv5
        )
        will = StatusMessage(device=device, group=group, state="offline", reason="connection lost")
        self.client.will_set(self.topics.status, will.model_dump_json(exclude_none=True), 1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self._ready = threading.Event()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._ready.wait(10)
        if not online:  # a device that was seen, then went away
            gone = StatusMessage(device=device, group=group, state="offline", ts=iso(time.time()), reason="stopped")
            self._pub(self.topics.status, gone.model_dump(exclude_none=True), retain=True)
            self.close()

    def _pub(self, topic: str, body: Any, retain: bool = False) -> None:
        try:
            self.client.publish(topic, json.dumps(body), qos=1, retain=retain).wait_for_publish(5)
        except RuntimeError:
            if not self.closed:  # after close(): a message that raced the disconnect; a real device would be gone too
                raise

    def health(self) -> None:
        report = HealthReport(
            ts=iso(time.time()),
            device=self.device,
            group=self.group,
            agent=AgentHealth(uptime_s=12.0),
            system=SystemHealth(
                cpu_percent=5.0,
                cpu_count=4,
                memory=Memory(total_mb=4096, available_mb=2048, percent=50.0),
                uptime_s=600,
            ),
            outbox=OutboxHealth(
                depth=3,
                bytes=4096,
                max_bytes=2**28,
                oldest_age_s=0.5,
                dropped=0,
                dropped_full=0,
                dropped_age=0,
                rejected=0,
                acked=100,
            ),
            models={
                m: ModelHealth(version=v, provider="CPUExecutionProvider", pipelines=["p"])
                for m, v in self.models.items()
            },
        )
        self._pub(self.topics.health, report.model_dump(mode="json", exclude_none=True), retain=True)

    def event(self, type_: str, **fields: Any) -> None:
        self.seq += 1
        body = event_body(type_, fields)
        self._pub(self.topics.events, event_payload(self.device, self.seq, iso(time.time()), body))

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe(self.topics.deploy, 1)
        client.subscribe(self.topics.fleet_deploy, 1)
        online = StatusMessage(
            device=self.device, group=self.group, state="online", ts=iso(time.time()), protocol="5", version="0.1.0"
        )
        client.publish(self.topics.status, online.model_dump_json(exclude_none=True), 1, retain=True)
        threading.Thread(target=self._ready_up, daemon=True).start()

    def _ready_up(self) -> None:
        self.health()
        time.sleep(0.1)
        self._ready.set()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if self.closed:
            return
        payload, topic = bytes(msg.payload), msg.topic
        worker = threading.Thread(target=self._handle, args=(topic, payload), daemon=True)
        worker.start()
        self.workers.append(worker)  # started first: close() joins what it finds here

    def _handle(self, topic: str, payload: bytes) -> None:
        try:
            order = parse_order(payload, self.keys)
        except OrderError as exc:
            self.event("deploy.refused", order=exc.order_id, topic=topic, reason=str(exc))
            return
        self.orders.append(order)
        if order is None or not applies_to(order, self.device, self.group) or order.id in self.handled:
            return
        self.handled.add(order.id)
        fields = order.event_fields()
        if self.models.get(order.model) == order.version:
            return  # current: the health already says so
        if self.behaviour == "refuse":
            self.event("model.refused", **fields, reason=OPSET_REASON)
        elif self.behaviour == "activate":
            self.event("model.downloading", **fields, variant="fp32", bytes=2_845_718, resume_from=0)
            time.sleep(0.05)
            self.event("model.verifying", **fields, variant="fp32")
            time.sleep(0.05)
            previous = self.models.get(order.model)
            self.models[order.model] = order.version
            self.event("model.activated", **fields, variant="fp32", provider="CPUExecutionProvider", previous=previous)
            self.health()
        elif self.behaviour == "probation-fail":  # activates, then its probation swaps back (an event without `order`)
            previous = self.models.get(order.model)
            self.models[order.model] = order.version
            self.event("model.activated", **fields, variant="fp32", provider="CPUExecutionProvider", previous=previous)
            self.health()
            time.sleep(0.3)
            self.models[order.model] = previous  # type: ignore[assignment]
            self.event(
                "model.rolled_back",
                model=order.model,
                version=order.version,
                to=previous,
                reason=PROBATION_REASON,
                cause="probation",
            )
            self.health()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for worker in self.workers:
            worker.join(5)
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    d = tmp_path_factory.mktemp("keys")
    private, public = generate_keypair(d)
    return private, load_public_keys(public)


@pytest.fixture
def prefix() -> str:
    """Each test its own topic tree on the shared broker, so retained messages never leak between tests."""
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def fleet(broker: Mosquitto, prefix: str, keypair: tuple[Path, dict[str, Any]]) -> Iterator[Any]:
    devices: list[FakeDevice] = []

    def add(device: str, group: str = "north", behaviour: str = "activate", **kw: Any) -> FakeDevice:
        dev = FakeDevice(broker.port, prefix, device, group, keypair[1], behaviour, **kw)
        devices.append(dev)
        return dev

    yield add
    for dev in devices:
        dev.close()


def run_fleet(
    capsys: pytest.CaptureFixture[str], broker: Mosquitto, prefix: str, key: Path | None, *args: str
) -> tuple[int, str, str]:
    argv = ["fleet", args[0], "--broker", broker.url, "--topic-prefix", prefix, "--settle", "0.3", *args[1:]]
    if key is not None:
        argv += ["--key", str(key)]
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def retained(broker: Mosquitto, topic: str) -> list[bytes]:
    sub = Subscriber(broker.port, topic)
    try:
        sub.sync()
        return [bytes(m.payload) for m in sub.on(topic)]
    finally:
        sub.close()


def test_deploy_writes_a_retained_signed_order(broker: Mosquitto, prefix: str, keypair: Any, capsys: Any) -> None:
    key, public = keypair
    code, out, err = run_fleet(
        capsys,
        broker,
        prefix,
        key,
        "deploy",
        "--model",
        "text-detector",
        "--version",
        "1.5.0",
        "--to",
        "device:cam-9",
        "--wait",
        "0",
        "--expires",
        "2h",
    )
    assert code == 0, err
    assert f"written to {prefix}/cam-9/deploy (retained" in out
    (payload,) = retained(broker, f"{prefix}/cam-9/deploy")
    order = parse_order(payload, public)
    assert order is not None and (order.model, order.version, order.target) == (
        "text-detector",
        "1.5.0",
        "device:cam-9",
    )
    assert order.expires - order.issued == timedelta(hours=2)
    assert order.id in out

    code, out, err = run_fleet(
        capsys,
        broker,
        prefix,
        key,
        "deploy",
        "--model",
        "vad",
        "--version",
        "6.2.3",
        "--to",
        "group:north-gate",
        "--wait",
        "0",
    )
    assert code == 1 and "no device of group 'north-gate' is known" in out  # written, but nobody to follow
    (payload,) = retained(broker, f"{prefix}/fleet/north-gate/deploy")
    assert parse_order(payload, public).target == "group:north-gate"  # type: ignore[union-attr]


def test_deploy_shows_progress_until_every_device_is_active(
    broker: Mosquitto, prefix: str, keypair: Any, fleet: Any, capsys: Any
) -> None:
    fleet("cam-1")
    fleet("cam-2")
    fleet("cam-3", group="south")
    t0 = time.monotonic()
    code, out, err = run_fleet(
        capsys,
        broker,
        prefix,
        keypair[0],
        "deploy",
        "--model",
        "text-detector",
        "--version",
        "1.5.0",
        "--to",
        "group:north",
        "--wait",
        "20",
    )
    assert code == 0, out + err
    assert time.monotonic() - t0 < 10  # ends when all reported, not when --wait runs out
    for dev in ("cam-1", "cam-2"):
        assert f"{dev}: downloading (variant fp32, 2.8 MB)" in out
        assert f"{dev}: verifying" in out
        assert f"{dev}: active (variant fp32 on CPUExecutionProvider)" in out
    assert "cam-3" not in out
    assert out.rstrip().endswith("done: 2/2 device(s) active on text-detector 1.5.0")


def test_a_refusal_is_shown_with_its_reason_and_exits_1(
    broker: Mosquitto, prefix: str, keypair: Any, fleet: Any, capsys: Any
) -> None:
    fleet("cam-1")
    fleet("cam-2", behaviour="refuse")
    fleet("cam-3", models={"text-detector": "1.5.0"})  # already there: its retained health says so
    fleet("cam-4", online=False)
    code, out, err = run_fleet(
        capsys,
        broker,
        prefix,
        keypair[0],
        "deploy",
        "--model",
        "text-detector",
        "--version",
        "1.5.0",
        "--to",
        "group:north",
        "--wait",
        "6",
    )
    assert code == 1, out + err
    assert f"cam-2: refused: {OPSET_REASON}" in out
    assert "cam-1: active" in out and "cam-3: active (already runs text-detector 1.5.0)" in out
    assert "cam-4: offline; waiting for it to come back and report" in out  # offline is no outcome: waited for
    assert "not done: 2/4 device(s) active" in out
    assert f"  cam-2: refused: {OPSET_REASON}" in out
    assert "  cam-4: offline, no final report within 6s (the retained order applies when it reconnects)" in out


def test_a_device_that_never_reports_runs_out_the_wait(
    broker: Mosquitto, prefix: str, keypair: Any, fleet: Any, capsys: Any
) -> None:
    fleet("cam-1", behaviour="silent")
    code, out, err = run_fleet(
        capsys,
        broker,
        prefix,
        keypair[0],
        "deploy",
        "--model",
        "text-detector",
        "--version",
        "1.5.0",
        "--to",
        "device:cam-1",
        "--wait",
        "1",
    )
    assert code == 1, out + err
    assert "  cam-1: no final report within 1s" in out


def test_canary_refusal_stops_before_the_group_order(
    broker: Mosquitto, prefix: str, keypair: Any, fleet: Any, capsys: Any
) -> None:
    canary = fleet("cam-a", behaviour="refuse")  # sorted first: the canary
    rest = fleet("cam-b")
    code, out, err = run_fleet(
        capsys,
        broker,
        prefix,
        keypair[0],
        "deploy",
        "--model",
        "text-detector",
        "--version",
        "1.5.0",
        "--to",
        "group:north",
        "--canary",
        "1",
        "--wait",
        "15",
    )
    assert code == 1, out + err
    assert "canary: text-detector 1.5.0 -> cam-a (device orders written)" in out
    assert (
        f"canary failed: cam-a refused: {OPSET_REASON}; the canary orders were withdrawn and the group order was not written"
        in out
    )
    assert retained(broker, f"{prefix}/fleet/north/deploy") == []
    assert retained(broker, f"{prefix}/cam-a/deploy") == []  # withdrawn
    assert [o.target for o in canary.orders if o is not None] == ["device:cam-a"]
    assert [o for o in rest.orders if o is not None] == [] and rest.models["text-detector"] == "1.4.0"


def test_canary_that_goes_healthy_lets_the_group_order_through(
    broker: Mosquitto, prefix: str, keypair: Any, fleet: Any, capsys: Any
) -> None:
    a, b, c = fleet("cam-a"), fleet("cam-b"), fleet("cam-c")
    code, out, err = run_fleet(
        capsys,
        broker,
        prefix,
        keypair[0],
        "deploy",
        "--model",
        "text-detector",
        "--version",
        "1.5.0",
        "--to",
        "group:north",
        "--canary",
        "1",
        "--wait",
        "15",
        "--probation",
        "0.3s",
    )
    assert code == 0, out + err
    lines = out.splitlines()
    canary_active = next(i for i, line in enumerate(lines) if "cam-a: active (variant fp32" in line)
    group_written = next(i for i, line in enumerate(lines) if "-> group:north written to" in line)
    assert canary_active < group_written
    assert "canary: passed; writing the group order" in out
    assert "cam-a: active (already runs text-detector 1.5.0)" in out and "cam-b: active (variant fp32" in out
    assert out.rstrip().endswith("done: 3/3 device(s) active on text-detector 1.5.0")
    assert all(d.models["text-detector"] == "1.5.0" for d in (a, b, c))
    (group_payload,) = retained(broker, f"{prefix}/fleet/north/deploy")
    assert parse_order(group_payload, keypair[1]).target == "group:north"  # type: ignore[union-attr]
    assert retained(broker, f"{prefix}/cam-a/deploy") == []  # the canary's own order is superseded


def test_a_canary_rolled_back_in_probation_stops_the_rollout(
    broker: Mosquitto, prefix: str, keypair: Any, fleet: Any, capsys: Any
) -> None:
    fleet("cam-a", behaviour="probation-fail")
    fleet("cam-b")
    code, out, err = run_fleet(
        capsys,
        broker,
        prefix,
        keypair[0],
        "deploy",
        "--model",
        "text-detector",
        "--version",
        "1.5.0",
        "--to",
        "group:north",
        "--canary",
        "1",
        "--wait",
        "10",
        "--probation",
        "5s",
    )
    assert code == 1, out + err
    assert "cam-a: active (variant fp32" in out and "watching for 5s of probation" in out
    assert f"canary failed: cam-a rolled-back: {PROBATION_REASON}; the canary orders were withdrawn" in out
    assert retained(broker, f"{prefix}/fleet/north/deploy") == []


def test_a_device_that_cannot_verify_the_order_says_so(
    broker: Mosquitto, prefix: str, keypair: Any, fleet: Any, capsys: Any, tmp_path: Path
) -> None:
    other_private, _ = generate_keypair(tmp_path)  # the device does not trust this key
    fleet("cam-1")
    code, out, err = run_fleet(
        capsys,
        broker,
        prefix,
        other_private,
        "deploy",
        "--model",
        "text-detector",
        "--version",
        "1.5.0",
        "--to",
        "device:cam-1",
        "--wait",
        "10",
    )
    assert code == 1, out + err
    assert "cam-1: refused: deployment order " in out and "is signed by unknown key" in out


def test_status_lists_every_device_from_the_retained_topics(
    broker: Mosquitto, prefix: str, keypair: Any, fleet: Any, capsys: Any
) -> None:
    fleet("cam-1", models={"text-detector": "1.4.0", "vad": "6.2.3"})
    fleet("cam-2", group="south", online=False)
    code, out, err = run_fleet(capsys, broker, prefix, None, "status", "--json")
    assert code == 0, err
    state = json.loads(out)
    by_id = {d["device"]: d for d in state["devices"]}
    assert set(by_id) == {"cam-1", "cam-2"}
    one = by_id["cam-1"]
    assert (one["state"], one["group"], one["outbox_depth"], one["providers"]) == (
        "online",
        "north",
        3,
        ["CPUExecutionProvider"],
    )
    assert one["models"] == {
        "text-detector": {"version": "1.4.0", "provider": "CPUExecutionProvider"},
        "vad": {"version": "6.2.3", "provider": "CPUExecutionProvider"},
    }
    assert 0 <= one["health_age_s"] < 30
    assert by_id["cam-2"]["state"] == "offline"

    code, out, err = run_fleet(capsys, broker, prefix, None, "status", "--group", "south", "--json")
    assert [d["device"] for d in json.loads(out)["devices"]] == ["cam-2"]

    # the table, through the real command line, with a retained order listed under it
    run_fleet(
        capsys,
        broker,
        prefix,
        keypair[0],
        "deploy",
        "--model",
        "vad",
        "--version",
        "6.3.0",
        "--to",
        "device:cam-7",
        "--wait",
        "0",
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "fleet",
            "status",
            "--broker",
            broker.url,
            "--topic-prefix",
            prefix,
            "--settle",
            "0.3",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["DEVICE", "STATE", "GROUP", "MODELS", "PROVIDER", "HEALTH", "OUTBOX"]
    assert lines[1].split()[:3] == ["cam-1", "online", "north"] and "text-detector 1.4.0, vad 6.2.3" in lines[1]
    assert " CPU " in lines[1] and "s ago" in lines[1] and lines[1].endswith("3")
    assert lines[2].split()[:3] == ["cam-2", "offline", "south"]
    assert any(f"{prefix}/cam-7/deploy: vad 6.3.0 -> device:cam-7" in line for line in lines)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--to", "cam-1"], "--to: target 'cam-1' must be device:ID or group:NAME"),
        (["--to", "device:cam-1", "--canary", "1"], "--canary needs a group target"),
        (["--to", "group:g", "--canary", "0"], "--canary: expected a number of devices >= 1"),
        (["--to", "device:cam-1", "--wait", "soon"], "--wait: expected a duration"),
    ],
)
def test_bad_input_exits_2(
    broker: Mosquitto, prefix: str, keypair: Any, capsys: Any, args: list[str], message: str
) -> None:
    code, out, err = run_fleet(capsys, broker, prefix, keypair[0], "deploy", "--model", "m", "--version", "1", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_bad_names_keys_and_brokers(
    broker: Mosquitto, prefix: str, keypair: Any, capsys: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = run_fleet(
        capsys, broker, prefix, keypair[0], "deploy", "--model", "../x", "--version", "1", "--to", "device:a"
    )
    assert code == 2 and "model: '../x' is not a name" in err
    monkeypatch.delenv("EDGE_AGENT_REGISTRY_KEY", raising=False)
    code, _, err = run_fleet(
        capsys, broker, prefix, None, "deploy", "--model", "m", "--version", "1", "--to", "device:a"
    )
    assert code == 2 and "no signing key: pass --key" in err
    code, _, err = run_fleet(
        capsys, broker, prefix, tmp_path / "nope.key", "deploy", "--model", "m", "--version", "1", "--to", "device:a"
    )
    assert code == 2 and "--key:" in err and "no such file" in err
    code = main(["fleet", "status", "--broker", "http://x", "--settle", "0"])
    assert code == 2 and "--broker: expected mqtt://host[:port]" in capsys.readouterr().err
    from tests.helpers.broker import free_port

    code = main(["fleet", "status", "--broker", f"mqtt://127.0.0.1:{free_port()}", "--settle", "0"])
    err = capsys.readouterr().err
    assert code == 1 and "cannot connect to mqtt://127.0.0.1:" in err and len(err.strip().splitlines()) == 1


def test_the_documented_acl_lets_the_fleet_user_deploy_and_nobody_else(
    broker_factory: Any, tmp_path: Path, keypair: Any, capsys: Any
) -> None:
    from tests.test_mqtt_acl import acl_broker

    mosq = acl_broker(broker_factory, tmp_path)
    for user in ("fleet", "dev-a"):
        (tmp_path / f"{user}.pw").write_text(f"pw-{user}\n")
    base = [
        "fleet",
        "deploy",
        "--settle",
        "0.2",
        "--key",
        str(keypair[0]),
        "--model",
        "vad",
        "--version",
        "6.2.3",
        "--to",
        "device:dev-b",
        "--wait",
        "0",
    ]
    # The fleet user on the cloud's listener, a device on the devices' (docs/mqtt.md).
    fleet, device = ["--broker", mosq.fleet_url, "--username", "fleet"], ["--broker", mosq.url, "--username", "dev-a"]
    assert main([*base, *fleet, "--password-file", str(tmp_path / "fleet.pw")]) == 0
    assert "written to edge/dev-b/deploy" in capsys.readouterr().out

    assert main([*base, *device, "--password-file", str(tmp_path / "dev-a.pw")]) == 1
    err = capsys.readouterr().err
    assert "the broker refused the publish on edge/dev-b/deploy: Not authorized (check the ACL of this user)" in err

    assert main([*base, *fleet, "--password-file", str(tmp_path / "dev-a.pw")]) == 1
    err = capsys.readouterr().err
    assert "refused the connection: Not authorized (check --username, --password-file" in err


def test_fleet_commands_need_no_cloud_extra() -> None:
    """Fleet commands run where only the agent is installed: nothing of the `cloud` extra is imported."""
    code = (
        "import sys, agent.cli.fleet, agent.cloud.fleet.deploy, agent.cloud.fleet.status; "
        "print(sorted(m for m in ('onnx', 'amqtt') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_a_device_whose_health_goes_back_is_rolled_back_and_its_event_gives_the_reason() -> None:
    """The watch alone, fed the messages a device sends while its probation rolls a canary back."""
    from agent.cloud.fleet.inventory import Inventory
    from agent.cloud.fleet.watch import DeployWatch
    from agent.models.deploy import new_order

    inventory = Inventory(None, "edge")  # type: ignore[arg-type]  # absorb() needs no connection
    order = new_order("m", "2.0.0", "device:cam-a")
    watch = DeployWatch(inventory, order, "edge/cam-a/deploy", need_health=True)

    def health(models: object) -> list[str]:
        body = {"ts": iso(time.time()), "device": "cam-a", "group": "north", "agent": {"uptime_s": 1.0}}
        body["system"] = {"error": "psutil failed"}
        message = inventory.absorb("edge/cam-a/health", json.dumps({**body, "models": models}).encode())
        assert message is not None and message.error is None, message
        return watch.feed(message)

    def served(version: str) -> dict[str, object]:
        return {"m": {"version": version, "provider": "CPUExecutionProvider", "pipelines": ["p"]}}

    assert health(served("2.0.0")) == ["cam-a: active (health reports 2.0.0 on CPUExecutionProvider)"]
    assert health({"error": "the store could not be read"}) == []  # says nothing either way
    assert watch.ok("cam-a") and not watch.failures()
    assert health(served("1.0.0")) == ["cam-a: rolled-back: its health reports m 1.0.0 instead"]
    assert watch.unexplained() and watch.failures() == [("cam-a", "rolled-back: its health reports m 1.0.0 instead")]
    rolled = {"model": "m", "version": "2.0.0", "to": "1.0.0", "reason": PROBATION_REASON, "cause": "probation"}
    event = event_payload("cam-a", 9, iso(time.time()), event_body("model.rolled_back", rolled))
    message = inventory.absorb("edge/cam-a/events", json.dumps(event).encode())
    assert message is not None and watch.feed(message) == [f"cam-a: rolled-back: {PROBATION_REASON}"]
    assert not watch.unexplained() and watch.failures() == [("cam-a", f"rolled-back: {PROBATION_REASON}")]


def test_a_device_that_goes_offline_is_waited_for_and_its_crash_guard_rollback_is_the_outcome() -> None:
    """Issue 13: a canary killed while it loads the version goes offline, comes back on the old version
    and says why (`model.rolled_back`, cause crash_guard). Offline is not an outcome: the watch waits."""
    from agent.cloud.fleet.inventory import Inventory
    from agent.cloud.fleet.watch import DeployWatch
    from agent.models.deploy import new_order

    inventory = Inventory(None, "edge")  # type: ignore[arg-type]  # absorb() needs no connection
    order = new_order("m", "2.0.0", "device:cam-a")
    watch = DeployWatch(inventory, order, "edge/cam-a/deploy", need_health=True)

    def status(state: Literal["online", "offline"]) -> list[str]:
        body = StatusMessage(device="cam-a", group="north", state=state, ts=iso(time.time()))
        message = inventory.absorb("edge/cam-a/status", body.model_dump_json(exclude_none=True).encode())
        assert message is not None and message.error is None, message
        return watch.feed(message)

    assert status("online") == []
    for _ in range(3):  # killed while loading, restarted
        assert status("offline") == ["cam-a: offline; waiting for it to come back and report"]
        assert not watch.done() and not watch.failures()
        assert status("online") == ["cam-a: back online"]
    assert watch.summary(90) == ["  cam-a: no final report within 90s"]
    reason = "model m version 2.0.0 was loading when the agent died 3 starts in a row; starting on 1.0.0 instead"
    rolled = {"model": "m", "version": "2.0.0", "to": "1.0.0", "reason": reason, "cause": "crash_guard"}
    event = event_payload("cam-a", 3, iso(time.time()), event_body("model.rolled_back", rolled))
    message = inventory.absorb("edge/cam-a/events", json.dumps(event).encode())
    assert message is not None and watch.feed(message) == [f"cam-a: rolled-back: {reason}"]
    assert watch.done() and watch.failures() == [("cam-a", f"rolled-back: {reason}")]
    assert status("offline") == []  # an outcome is kept


def test_a_device_still_offline_when_the_wait_runs_out_is_named_offline() -> None:
    from agent.cloud.fleet.inventory import Inventory
    from agent.cloud.fleet.watch import DeployWatch
    from agent.models.deploy import new_order

    inventory = Inventory(None, "edge")  # type: ignore[arg-type]  # absorb() needs no connection
    gone = StatusMessage(device="cam-a", group="north", state="offline", ts=iso(time.time()))
    assert inventory.absorb("edge/cam-a/status", gone.model_dump_json(exclude_none=True).encode()) is not None
    watch = DeployWatch(inventory, new_order("m", "2.0.0", "device:cam-a"), "edge/cam-a/deploy")
    assert watch.seed() == ["cam-a: offline; waiting for it to come back and report"]
    assert not watch.done()
    assert watch.summary(30) == [
        "  cam-a: offline, no final report within 30s (the retained order applies when it reconnects)"
    ]
    canary = DeployWatch(inventory, new_order("m", "2.0.0", "device:cam-a"), "edge/cam-a/deploy", targets=["cam-a"])
    assert canary.summary(30) == ["  cam-a: offline, no final report within 30s"]  # its order is withdrawn


def test_a_key_the_registry_does_not_name_for_orders_is_refused_before_any_order(
    broker: Mosquitto, prefix: str, capsys: Any, tmp_path: Path
) -> None:
    """Since signing roles, devices trust orders signed by an orders key of the registry's root only:
    `fleet deploy` and `fleet controller` refuse any other key in one line when they know the registry
    (a folder or its URL), and write nothing; the orders key itself passes."""
    from tests.helpers.registry import make_registry

    registry = make_registry(tmp_path / "reg")
    url = registry.url
    stranger, _ = generate_keypair(tmp_path / "other")
    deploy = ["deploy", "--model", "m", "--version", "1.0.0", "--to", "device:cam-9", "--wait", "0"]
    try:
        for where in (str(registry.root), registry.url):
            code, out, err = run_fleet(capsys, broker, prefix, stranger, *deploy, "--registry", where)
            assert code == 2 and out == "", out
            (line,) = err.strip().splitlines()
            assert "is not an orders key of" in line and "root version 1" in line and "which it does not know" in line
        assert registry.root_key is not None
        code, _, err = run_fleet(capsys, broker, prefix, registry.root_key, *deploy, "--registry", registry.url)
        assert code == 2 and "trusts for root, not for orders" in err, err
        inventory = tmp_path / "inventory.yaml"
        inventory.write_text("devices: {}\n")
        controller = ["controller", "--inventory", str(inventory), "--db", str(tmp_path / "c.db")]
        code, _, err = run_fleet(capsys, broker, prefix, stranger, *controller, "--registry", registry.url)
        assert code == 2 and "is not an orders key of" in err and not (tmp_path / "c.db").exists()
        assert retained(broker, f"{prefix}/cam-9/deploy") == []

        code, out, err = run_fleet(capsys, broker, prefix, registry.key, *deploy, "--registry", registry.url)
        assert code == 0 and f"written to {prefix}/cam-9/deploy" in out and err == "", err
    finally:
        registry.server.stop()
    # The registry unreachable: a warning, and the order is written (the devices still check it).
    code, out, err = run_fleet(capsys, broker, prefix, stranger, *deploy, "--registry", url)
    assert code == 0 and err.startswith("warning: cannot read the registry's keys document"), err


def test_a_broker_lost_mid_command_ends_it_at_once_in_one_line(tmp_path: Path, keypair: Any) -> None:
    """paho's own loop reconnected silently into a new session without the subscriptions: the command
    then waited out its whole --wait hearing nothing. The fleet client does not reconnect: a lost
    connection ends the command with exit 1 and one line naming the broker."""
    own = Mosquitto(tmp_path / "mosquitto").start()
    device = FakeDevice(own.port, "edge", "cam-1", "north", keypair[1], behaviour="silent")
    try:
        argv = [sys.executable, "-m", "agent", "fleet", "deploy", "--broker", own.url, "--key", str(keypair[0])]
        argv += ["--model", "text-detector", "--version", "1.5.0", "--to", "device:cam-1", "--wait", "60"]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        assert proc.stdout is not None
        first = proc.stdout.readline()  # the order is written: the command now follows the device
        assert "written to edge/cam-1/deploy" in first, first + proc.stderr.read() if proc.stderr else first
        own.kill()
        started = time.monotonic()
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 1, out + err
        assert time.monotonic() - started < 10  # not the 60 s wait
        assert f"lost the connection to the broker at {own.url}" in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    finally:
        device.closed = True
        own.stop()


def test_an_ack_waited_for_ends_at_once_when_the_connection_is_lost(tmp_path: Path) -> None:
    """A publish waits for its PUBACK up to its timeout; a connection lost meanwhile ends the wait at once
    with the reason, not with "did not acknowledge" after the whole timeout."""
    import os
    import signal

    from agent.cloud.fleet.client import BrokerClient, BrokerSettings, FleetError

    own = Mosquitto(tmp_path / "mosquitto").start()
    client = BrokerClient(BrokerSettings(own.url)).connect()
    failed: list[str] = []

    def publish() -> None:
        try:
            client.publish_retained("edge/cam-1/deploy", b"{}", timeout=60)
        except FleetError as exc:
            failed.append(str(exc))

    try:
        assert own.proc is not None
        os.kill(own.proc.pid, signal.SIGSTOP)  # the broker takes the publish and never answers it
        waiting = threading.Thread(target=publish)
        waiting.start()
        time.sleep(0.3)
        own.kill()
        started = time.monotonic()
        waiting.join(30)
        assert not waiting.is_alive() and time.monotonic() - started < 10
        assert failed and failed[0].startswith(f"lost the connection to the broker at {own.url}"), failed
    finally:
        client.close()
        own.stop()
