"""The product end to end, with real processes: a Mosquitto, a registry server, agents started with
`edge-agent run`, and deployments written with `edge-agent fleet deploy`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from agent.models.store import Store
from agent.models.vectors import encode
from agent.transport.outbox import open_outbox
from tests.helpers.broker import Mosquitto, free_port
from tests.helpers.daemon_proc import REPO, AgentProcess, heavy_linear, sensor_csv, slow_on_data
from tests.helpers.models import linear_model, save
from tests.helpers.mqtt_client import Subscriber
from tests.helpers.registry import Registry, make_registry
from tests.helpers.waiting import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def fleet_registry(tmp_path: Path) -> Iterator[Registry]:
    reg = make_registry(tmp_path / "reg")
    yield reg
    reg.server.stop()


def linear(tmp: Path, name: str, weight: float) -> Path:
    return save(linear_model(np.full((3, 1), weight)), tmp / f"{name}.onnx")


def events(sub: Subscriber, device: str, type_: str, version: str | None = None) -> list[dict[str, Any]]:
    return [
        e
        for e in sub.payloads(f"edge/{device}/events")
        if e["type"] == type_ and (version is None or e.get("version") == version)
    ]


def results(sub: Subscriber, device: str) -> list[dict[str, Any]]:
    return sub.payloads(f"edge/{device}/p/results")


def deploy(
    broker: Mosquitto, reg: Registry, version: str, target: str, *extra: str, wait: str = "60s"
) -> subprocess.CompletedProcess[str]:
    """`edge-agent fleet deploy` of model m, as an operator runs it (`extra`: more options)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "fleet",
            "deploy",
            "--broker",
            broker.url,
            "--model",
            "m",
            "--version",
            version,
            "--to",
            target,
            "--key",
            str(reg.key),
            "--wait",
            wait,
            "--settle",
            "0.5s",
            *extra,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=180,
    )


def assert_no_gap(rows: list[dict[str, Any]], device: str) -> None:
    seen = sorted({r["source_seq"] for r in rows})
    missing = sorted(set(range(seen[0], seen[-1] + 1)) - set(seen))
    assert not missing, f"{device}: source frames without a result: {missing[:10]}"


def wait_until(check: Any, timeout: float, what: str, agents: list[AgentProcess] = ()) -> Any:
    value = wait_for(check, timeout, interval=0.1)
    if value:
        return value
    logs = "\n".join(f"--- {a.device}\n{a.stderr()[-3000:]}" for a in agents)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


def status_page(url: str) -> dict[str, Any] | None:
    """/api/status once the page listens (it starts after the pipelines), else None."""
    try:
        return requests.get(url + "api/status", timeout=5).json()
    except requests.ConnectionError:
        return None


def test_group_deploy_activates_refuses_and_rolls_back(
    tmp_path: Path, own_broker: Mosquitto, fleet_registry: Registry
) -> None:
    reg = fleet_registry
    reg.publish("m", "1.0.0", linear(tmp_path, "v1", 1.0), channel="stable")
    csv = sensor_csv(tmp_path / "sensor.csv")
    sub = Subscriber(own_broker.port, "edge/#")
    agents = [
        AgentProcess(tmp_path, d, "g1", own_broker.url, reg.url, reg.public_key, csv=csv).start()
        for d in ("dev-a", "dev-b")
    ]
    try:
        for a in agents:
            wait_until(lambda a=a: len(results(sub, a.device)) > 10, 60, f"{a.device} results", agents)

        # v2 to the group: both switch with no frame dropped, and the deploy command sees them go active.
        reg.publish("m", "2.0.0", linear(tmp_path, "v2", 2.0), channel=None)
        out = deploy(own_broker, reg, "2.0.0", "group:g1")
        assert out.returncode == 0, out.stdout + out.stderr
        for a in agents:
            # The CLI saw the event on its own connection; this subscriber may get it a moment later.
            wait_until(lambda a=a: events(sub, a.device, "model.active", "2.0.0"), 5, "model.active 2.0.0", agents)
            wait_until(
                lambda a=a: any(r["model_version"] == "2.0.0" for r in results(sub, a.device)[-5:]),
                20,
                "v2 results",
                agents,
            )
            rows = results(sub, a.device)
            assert_no_gap(rows, a.device)
            v2 = [r for r in rows if r["model_version"] == "2.0.0"]
            assert all(r["output"]["y"][0][0] == pytest.approx(2 * sum(_row(r["source_seq"]))) for r in v2[:20])

        # v3 whose test vectors fail on the device: refused by both, v2 keeps serving.
        reg.publish("m", "3.0.0", linear(tmp_path, "v3", 3.0), channel=None)
        wrong = reg.put(encode({"y": np.full((1, 1), 99.0, np.float32)}))
        reg.resign("m", "3.0.0", lambda doc: doc["tests"][0].update(expected=wrong))
        out = deploy(own_broker, reg, "3.0.0", "group:g1")
        assert out.returncode == 1, out.stdout + out.stderr
        for a in agents:
            # The CLI saw the refusal on its own connection; this subscriber may get it a moment later.
            refused = wait_until(
                lambda a=a: events(sub, a.device, "model.refused", "3.0.0"), 10, "model.refused 3.0.0", agents
            )
            assert "test vector" in refused[0]["reason"], refused
            before = len(results(sub, a.device))
            wait_until(
                lambda a=a, n=before: len(results(sub, a.device)) > n + 10, 20, "results after the refusal", agents
            )
            assert {r["model_version"] for r in results(sub, a.device)[before:]} == {"2.0.0"}

        # v4 loads and passes its tests but is far slower: probation rolls it back to v2.
        reg.publish("m", "4.0.0", heavy_linear(tmp_path / "v4.onnx", 2.0, size=256, layers=12), channel=None)
        deploy(own_broker, reg, "4.0.0", "group:g1", wait="0s")
        for a in agents:
            rolled = wait_until(
                lambda a=a: events(sub, a.device, "model.rolled_back", "4.0.0"),
                90,
                f"{a.device} rollback of v4",
                agents,
            )
            assert "probation failed: inference p95" in rolled[0]["reason"] and rolled[0]["to"] == "2.0.0", rolled
            before = len(results(sub, a.device))
            wait_until(
                lambda a=a, n=before: len(results(sub, a.device)) > n + 5, 20, "results after the rollback", agents
            )
            assert {r["model_version"] for r in results(sub, a.device)[before:]} == {"2.0.0"}
            assert_no_gap(results(sub, a.device), a.device)
    finally:
        for a in agents:
            a.stop()
        sub.close()


def _row(i: int) -> tuple[int, int, int]:
    return (i % 7, i % 5, i % 3)


def test_kill9_during_download_and_activation_leaves_a_verified_model(tmp_path: Path, own_broker: Mosquitto) -> None:
    reg = make_registry(tmp_path / "reg", throttle_bps=400_000)
    try:
        reg.publish("m", "1.0.0", linear(tmp_path, "v1", 1.0), channel="stable")
        csv = sensor_csv(tmp_path / "sensor.csv", rows=50_000)
        sub = Subscriber(own_broker.port, "edge/#")
        agent = AgentProcess(
            tmp_path,
            "dev-k",
            "g2",
            own_broker.url,
            reg.url,
            reg.public_key,
            csv=csv,
            registry={"probation": {"duration": 0}},
        ).start()
        wait_until(lambda: results(sub, "dev-k"), 60, "first results", [agent])

        # A 3 MB version downloads at 400 kB/s: kill -9 while it comes in, then start again.
        reg.publish("m", "2.0.0", heavy_linear(tmp_path / "v2.onnx", 2.0, size=512, layers=1), channel=None)
        deploy(own_broker, reg, "2.0.0", "device:dev-k", wait="0s")
        wait_until(lambda: events(sub, "dev-k", "model.downloading", "2.0.0"), 30, "the download", [agent])
        time.sleep(1.5)
        agent.kill9()
        store = Store(agent.state_dir)
        assert store.check("m") == [] and store.active("m").version == "1.0.0"
        agent.start()
        wait_until(lambda: events(sub, "dev-k", "model.active", "2.0.0"), 90, "v2 active after the restart", [agent])
        downloads = events(sub, "dev-k", "model.downloading", "2.0.0")
        assert downloads[-1]["resume_from"] > 0, downloads  # the second start resumed, it did not start over

        # Kill -9 as soon as v3 is being verified (activation under way), then start again.
        reg.publish("m", "3.0.0", linear(tmp_path, "v3", 3.0), channel=None)
        deploy(own_broker, reg, "3.0.0", "device:dev-k", wait="0s")
        wait_until(lambda: events(sub, "dev-k", "model.verifying", "3.0.0"), 30, "verifying v3", [agent])
        agent.kill9()
        store = Store(agent.state_dir)
        assert store.check("m") == [], store.check("m")
        assert store.active("m").version in ("2.0.0", "3.0.0")
        seen = len(results(sub, "dev-k"))
        agent.start()
        wait_until(
            lambda: events(sub, "dev-k", "model.active", "3.0.0") or events(sub, "dev-k", "model.activated", "3.0.0"),
            60,
            "the deployment of v3 finished after the restart",
            [agent],
        )
        wait_until(
            lambda: any(r["model_version"] == "3.0.0" for r in results(sub, "dev-k")[seen:]), 30, "v3 results", [agent]
        )
        assert Store(agent.state_dir).check("m") == []
        agent.stop()
        sub.close()
    finally:
        reg.server.stop()


def test_sigterm_delivers_every_queued_result_before_exit(
    tmp_path: Path, own_broker: Mosquitto, fleet_registry: Registry
) -> None:
    reg = fleet_registry
    reg.publish("m", "1.0.0", linear(tmp_path, "v1", 1.0), channel="stable")
    csv = sensor_csv(tmp_path / "sensor.csv")
    sub = Subscriber(own_broker.port, "edge/dev-t/#")
    agent = AgentProcess(tmp_path, "dev-t", "g3", own_broker.url, reg.url, reg.public_key, csv=csv, rate=3000).start()
    wait_until(lambda: len(results(sub, "dev-t")) > 500, 60, "results flowing", [agent])
    assert agent.terminate() == 0, agent.stderr()[-2000:]
    outbox = open_outbox(agent.state_dir)
    try:
        last = outbox.last_seq("results/p")
        assert outbox.depth == 0, f"{outbox.depth} messages were still queued at exit"
    finally:
        outbox.close()
    # The broker acknowledged every result before the agent exited; it forwards them (and the retained
    # offline status) to this subscriber on its own time, so wait for them to arrive.
    assert last > 500, last
    expected = set(range(1, last + 1))
    got = wait_for(lambda: {r["seq"] for r in results(sub, "dev-t")} == expected, 20, interval=0.1)
    missing = sorted(expected - {r["seq"] for r in results(sub, "dev-t")})
    assert got, f"missing {missing[:10]}"
    offline = wait_for(
        lambda: (st := sub.on("edge/dev-t/status")) and json.loads(st[-1].payload)["state"] == "offline",
        20,
        interval=0.1,
    )
    assert offline, [m.payload for m in sub.on("edge/dev-t/status")]
    sub.close()


def notify_socket(tmp_path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(0.2)
    return sock


def datagrams(sock: socket.socket, seconds: float) -> list[tuple[float, str]]:
    out = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            out.append((time.monotonic(), sock.recv(4096).decode()))
        except TimeoutError:
            pass
    return out


@pytest.mark.parametrize("stuck", [False, True], ids=["healthy", "stuck-inference"])
def test_watchdog_pings_only_while_inference_is_alive(
    tmp_path: Path, own_broker: Mosquitto, fleet_registry: Registry, stuck: bool
) -> None:
    # The stuck model is instant on its warm-up input and takes seconds on real rows.
    model = slow_on_data(tmp_path / "stuck.onnx", iterations_per_unit=10000) if stuck else linear(tmp_path, "fast", 1.0)
    csv = sensor_csv(tmp_path / "sensor.csv", rows=10_000)
    sock = notify_socket(tmp_path)
    agent = AgentProcess(
        tmp_path,
        "dev-w",
        "g4",
        own_broker.url,
        fleet_registry.url,
        fleet_registry.public_key,
        csv=csv,
        model=str(model),
        rate=20,
        health={"stuck_after": "0.5s"},
    )
    agent.start(env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"})
    try:
        seen = datagrams(sock, 6 if not stuck else 4)
        deadline = time.monotonic() + 60
        while not any("READY=1" in m for _, m in seen) and time.monotonic() < deadline:
            seen += datagrams(sock, 1)
        assert any("READY=1" in m for _, m in seen), agent.stderr()[-2000:]
        ready_at = next(t for t, m in seen if "READY=1" in m)
        later = seen + datagrams(sock, 3)
        if not stuck:
            assert len([t for t, m in later if "WATCHDOG=1" in m and t > ready_at]) >= 5, later
        else:
            stuck_at = next((t for t, m in later if "one inference has run for" in m), None)
            assert stuck_at is not None, later
            pings = [t - stuck_at for t, m in later if "WATCHDOG=1" in m and stuck_at < t < stuck_at + 2.0]
            assert pings == [], f"the watchdog was fed during a stuck inference: {later}"
    finally:
        agent.stop()
        sock.close()


def command(
    sub: Subscriber, device: str, name: str, args: dict[str, Any] | None = None, timeout: float = 30
) -> dict[str, Any]:
    topic = f"edge/{device}/cmd/{name}/reply"
    before = len(sub.on(topic))
    sub.publish(f"edge/{device}/cmd/{name}", json.dumps(args or {}))
    if not sub.wait_for(lambda: len(sub.on(topic)) > before, timeout):
        # IndexError, as callers that poll with a short timeout expect (tests/test_reload_command.py)
        raise IndexError(f"no reply to {name} within {timeout}s; seen on {topic}: {[m.payload for m in sub.on(topic)]}")
    return json.loads(sub.on(topic)[before].payload)


def test_commands_and_reload_on_a_running_agent(
    tmp_path: Path, own_broker: Mosquitto, fleet_registry: Registry
) -> None:
    from tests.helpers.models import unary_model

    model = save(unary_model("Relu", shape=(1, 3, 48, 64)), tmp_path / "relu.onnx")
    secret = tmp_path / "password"
    secret.write_text("hunter2\n")
    sub = Subscriber(own_broker.port, "edge/dev-c/#")
    agent = AgentProcess(
        tmp_path,
        "dev-c",
        "g5",
        own_broker.url,
        fleet_registry.url,
        fleet_registry.public_key,
        csv=sensor_csv(tmp_path / "sensor.csv", rows=1000),
        rate=20,
    )
    profile = json.loads(agent.profile.read_text())
    profile["mqtt"]["password_file"] = str(secret)
    profile["mqtt"]["username"] = "dev-c"
    profile["pipelines"] = [
        {
            "name": "cam",
            "model": str(model),
            "source": {"type": "synthetic", "fps": 10, "width": 320, "height": 240},
            "preprocess": {"resize": [64, 48]},
            "postprocess": {"type": "raw", "outputs": ["y"], "round": 2},
        }
    ]
    page = f"http://127.0.0.1:{free_port()}/"
    profile["runtime"] = {"http": page.removeprefix("http://").rstrip("/")}
    agent.profile.write_text(json.dumps(profile))
    agent.start()
    try:
        # Under parallel load (3 workers on 2 cores) starting the daemon alone can take most of a minute.
        wait_until(lambda: sub.on("edge/dev-c/cam/results"), 120, "camera results", [agent])
        assert command(sub, "dev-c", "ping")["ok"] is True

        # The status page: the daemon's own snapshot, with the broker connection and the outbox. It starts
        # after the pipelines, and each part reports its own state: wait for the snapshot to show them all.
        def status_ok(status: dict[str, Any] | None) -> bool:
            return (
                status is not None
                and status["connection"]["state"] == "online"
                and status["outbox"]["max_bytes"] > 0
                and [(p["pipeline"], p["state"], p["source"]) for p in status["pipelines"]]
                == [("cam", "running", "synthetic")]
            )

        wait_until(lambda: status_page(page), 60, "the status page", [agent])
        shown = wait_for(lambda: status_ok(status := status_page(page)) and status, 30, 0.2)
        assert shown, f"the status page never showed cam running online: {status_page(page)}"

        def metrics_text() -> str:
            return requests.get(page + "metrics", timeout=5).text

        wanted = (
            'edge_agent_mqtt_state{edge_agent_mqtt_state="online"} 1.0',
            'edge_agent_pipeline_state{edge_agent_pipeline_state="running",pipeline="cam"} 1.0',
        )
        metrics = wait_for(lambda: (m := metrics_text()) and all(w in m for w in wanted) and m, 30, 0.2)
        assert metrics, f"missing {[w for w in wanted if w not in metrics_text()]} in /metrics"
        frame = wait_until(
            lambda: (f := requests.get(page + "frame/cam.jpg", timeout=5)).status_code == 200 and f,
            30,
            "a frame of cam on the status page",
            [agent],
        )
        assert frame.content[:2] == b"\xff\xd8", frame.content[:16]

        config = command(sub, "dev-c", "config")
        assert config["ok"] and config["result"]["device"]["id"] == "dev-c"
        assert "hunter2" not in json.dumps(config)

        shot = command(sub, "dev-c", "snapshot", {"pipeline": "cam", "max_width": 160})
        assert shot["ok"] and (shot["result"]["width"], shot["result"]["height"]) == (160, 120), shot
        import base64

        import cv2

        image = cv2.imdecode(np.frombuffer(base64.b64decode(shot["result"]["jpeg_base64"]), np.uint8), cv2.IMREAD_COLOR)
        assert image.shape == (120, 160, 3)

        bad = command(sub, "dev-c", "pipeline", {"name": "nope", "action": "stop"})
        assert bad["ok"] is False and bad["error"] == {
            "code": "bad_argument",
            "message": "no pipeline named 'nope' (known: cam)",
        }
        assert command(sub, "dev-c", "pipeline", {"name": "cam", "action": "stop"})["result"] == {
            "pipeline": "cam",
            "state": "stopped",
        }
        assert command(sub, "dev-c", "pipeline", {"name": "cam", "action": "start"})["result"]["state"] == "running"

        # An invalid profile on disk: the reload is refused, the event names the line, the old profile serves.
        good = agent.profile.read_text()
        agent.profile.write_text(good.replace('"health": {"interval": "1s"}', '"health": {"interval": "soon"}'))
        reply = command(sub, "dev-c", "reload")
        assert reply["ok"] is False and "invalid" in reply["error"]["message"], reply
        # The event travels through the outbox, the reply straight to the broker: it may arrive second.
        invalid = wait_until(lambda: events(sub, "dev-c", "profile.invalid"), 20, "the profile.invalid event", [agent])
        assert "health.interval: expected a duration like 30s or 5min, got 'soon'" in invalid[-1]["reason"], invalid

        # SIGHUP with a valid change: the pipeline is rebuilt with the new settings, nothing else restarts.
        profile["pipelines"][0]["postprocess"]["round"] = 1
        agent.profile.write_text(json.dumps(profile))
        online_before = len(sub.on("edge/dev-c/status"))
        agent.proc.send_signal(__import__("signal").SIGHUP)
        wait_until(lambda: events(sub, "dev-c", "profile.reloaded"), 60, "the reload", [agent])
        assert len(sub.on("edge/dev-c/status")) == online_before  # the MQTT connection was kept
        seen = len(sub.on("edge/dev-c/cam/results"))
        wait_until(lambda: len(sub.on("edge/dev-c/cam/results")) > seen + 3, 60, "results after the reload", [agent])
        assert agent.proc.poll() is None, agent.stderr()[-2000:]
        states = wait_for(
            lambda: (
                (s := [p["state"] for p in requests.get(page + "api/status", timeout=5).json()["pipelines"]])
                == ["running"]
                and s
            ),
            30,
            0.2,
        )
        assert states, requests.get(page + "api/status", timeout=5).json()["pipelines"]
    finally:
        agent.stop()
        sub.close()
