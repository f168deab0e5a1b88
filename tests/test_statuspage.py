"""The status page against a real HTTP server on loopback, fed by fake snapshot/frame/alive callables."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import requests

from agent.config.profile import load_profile
from agent.inference.stats import PipelineStats
from agent.service.daemon import Daemon
from agent.service.statuspage import (
    MAX_CLIENTS,
    ConnectionStatus,
    StatusPageError,
    StatusServer,
    StatusSnapshot,
    draw_boxes,
    parse_address,
    render_metrics,
)
from agent.service.statuspage.server import page
from agent.transport.outbox import OutboxStats
from tests.helpers.broker import free_port
from tests.helpers.models import save
from tests.helpers.waiting import wait_for

REPO = Path(__file__).resolve().parent.parent


def make_jpeg(width: int = 320, height: int = 240, shade: int = 40) -> bytes:
    image = np.full((height, width, 3), shade, dtype=np.uint8)
    cv2.putText(image, "EDGE 42", (40, 130), cv2.FONT_HERSHEY_SIMPLEX, 1.5, (255, 255, 255), 3)
    ok, buf = cv2.imencode(".jpg", image)
    assert ok
    return buf.tobytes()


def pipeline_stats(**fields: Any) -> PipelineStats:
    """What `Pipeline.stats()` reports, every counter at zero except the fields given."""
    base: PipelineStats = {
        "pipeline": "gate",
        "state": "running",
        "source": "camera",
        "model": "text-detector",
        "model_version": "1.4.0",
        "provider": "CPUExecutionProvider",
        "results_per_s": 0.0,
        "latency_ms": {},
        "frames": 0,
        "dropped": 0,
        "skipped": 0,
        "rejected": 0,
        "inferences": 0,
        "results": 0,
        "swaps": 0,
        "inference_errors": 0,
        "post_errors": 0,
        "sink_errors": 0,
        "source_errors": 0,
        "inference_running_s": 0.0,
        "last_error": None,
    }
    return PipelineStats(**{**base, **fields})


def snapshot_of(*pipelines: PipelineStats, **fields: Any) -> StatusSnapshot:
    base: dict[str, Any] = {
        "device": "d",
        "agent_version": "0.1.0",
        "uptime_s": 1.0,
        "connection": None,
        "outbox": None,
        "pipelines": pipelines,
    }
    return StatusSnapshot(**{**base, **fields})


class FakeAgent:
    """What the daemon hands the status page: a changing snapshot, the latest frames, a health verdict."""

    def __init__(self) -> None:
        self.calls = 0
        self.reason: str | None = None
        self.model_version = "1.4.0"
        self.jpeg = make_jpeg()
        self.boxes: list[Any] = [{"box": [30, 95, 290, 140], "score": 0.93}]
        self.lock = threading.Lock()

    def snapshot(self) -> StatusSnapshot:
        with self.lock:
            self.calls += 1
            n = self.calls
        return StatusSnapshot(
            device="gate-cam-01",
            agent_version="0.1.0",
            uptime_s=100.0 + n,
            connection=ConnectionStatus(
                state="online", broker="127.0.0.1:1883", connects=1, error=None, protocol="5", connected_for_s=3.5
            ),
            outbox=OutboxStats(
                depth=3,
                bytes=1200,
                max_bytes=268435456,
                oldest_age_s=0.4,
                dropped=2,
                dropped_full=2,
                dropped_age=0,
                rejected=0,
                acked=57,
            ),
            pipelines=(
                pipeline_stats(
                    model_version=self.model_version,
                    frames=60 + n,
                    dropped=5,
                    inferences=50 + n,
                    results=50 + n,
                    source_errors=1,
                    results_per_s=round(10.0 + n * 0.5, 2),
                    latency_ms={
                        "pre": {"p50": 2.1, "p95": 3.0, "n": 50},
                        "infer": {"p50": 80.0 + n, "p95": 95.5, "n": 50},
                        "post": {"p50": 1.9, "p95": 2.5, "n": 50},
                        "total": {"p50": 84.0 + n, "p95": 101.0, "n": 50},
                    },
                ),
                pipeline_stats(
                    pipeline="door-mic",
                    source="audio",
                    model='vad "silero"\\v5',
                    model_version="5.1",
                    frames=10,
                    results_per_s=31.25,
                    latency_ms={"infer": {"p50": None, "p95": None, "n": 0}},
                ),
            ),
        )

    def frame(self, pipeline: str) -> tuple[bytes, list[Any]] | None:
        return (self.jpeg, self.boxes) if pipeline == "gate" else None

    def alive(self) -> str | None:
        return self.reason


@pytest.fixture
def agent() -> FakeAgent:
    return FakeAgent()


@pytest.fixture
def server(agent: FakeAgent) -> Iterator[StatusServer]:
    with StatusServer("127.0.0.1:0", agent.snapshot, agent.frame, agent.alive) as srv:
        yield srv


def get(server: StatusServer, path: str) -> requests.Response:
    return requests.get(server.url + path.lstrip("/"), timeout=5)


def test_healthz_ok_then_unhealthy_with_the_reason(server: StatusServer, agent: FakeAgent) -> None:
    response = get(server, "/healthz")
    assert (response.status_code, response.text) == (200, "ok\n")
    agent.reason = "pipeline gate: source lost"
    response = get(server, "/healthz")
    assert (response.status_code, response.text) == (503, "pipeline gate: source lost\n")
    assert requests.head(server.url + "healthz", timeout=5).status_code == 503


def test_a_failing_health_check_is_503_not_a_crash(agent: FakeAgent) -> None:
    def broken() -> str | None:
        raise RuntimeError("outbox closed")

    with StatusServer("127.0.0.1:0", agent.snapshot, agent.frame, broken) as srv:
        response = get(srv, "/healthz")
    assert response.status_code == 503 and "outbox closed" in response.text


def test_api_status_is_the_snapshot_as_json(server: StatusServer) -> None:
    response = get(server, "/api/status")
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/json"
    doc = response.json()
    assert doc["device"] == "gate-cam-01" and doc["connection"]["state"] == "online" and doc["outbox"]["depth"] == 3
    gate = doc["pipelines"][0]
    assert (gate["pipeline"], gate["model_version"], gate["provider"]) == ("gate", "1.4.0", "CPUExecutionProvider")
    assert gate["latency_ms"]["infer"]["p95"] == 95.5


def test_api_status_writes_nan_as_null(agent: FakeAgent) -> None:
    doc = snapshot_of(pipeline_stats(results_per_s=float("nan"), inference_running_s=float("inf")))
    with StatusServer("127.0.0.1:0", lambda: doc, agent.frame, agent.alive) as srv:
        got = get(srv, "/api/status").json()
    (gate,) = got["pipelines"]
    assert (gate["pipeline"], gate["state"], gate["results_per_s"], gate["inference_running_s"]) == (
        "gate",
        "running",
        None,
        None,
    )


def test_connection_status_reads_the_health_report_and_refuses_a_state_it_does_not_know() -> None:
    connection = ConnectionStatus(
        state="refused", broker="b:1883", connects=0, error="bad password", protocol=None, connected_for_s=None
    )
    assert ConnectionStatus.from_health(dataclasses.asdict(connection)) == connection
    with pytest.raises(ValueError, match="unknown connection state 'connected'"):
        ConnectionStatus.from_health({**dataclasses.asdict(connection), "state": "connected"})


# -- /metrics -------------------------------------------------------------------------------------

METRIC_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
SAMPLE = re.compile(rf"^({METRIC_NAME})(?:\{{(?:{LABEL}(?:,{LABEL})*)?\}})? (-?[0-9.eE+-]+|NaN|[+-]Inf)$")
LABELS = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')


def parse_exposition(text: str) -> dict[str, dict[str, Any]]:
    """A strict reader of the text format: every sample belongs to a family declared by # HELP and # TYPE
    before it, families are contiguous and no sample is repeated."""
    families: dict[str, dict[str, Any]] = {}
    current: str | None = None
    seen: set[str] = set()
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in families, f"family {name} declared twice"
            families[name] = {"help": line.split(" ", 3)[3], "samples": []}
            current = None
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name in families and "type" not in families[name], f"# TYPE {name} without its # HELP first"
            assert kind in ("counter", "gauge"), line
            assert kind != "counter" or name.endswith("_total"), f"counter {name} should end in _total"
            families[name]["type"] = kind
            current = name
        else:
            match = SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            assert match.group(1) == current, f"sample {line!r} outside its family's # TYPE block"
            assert line.rsplit(" ", 1)[0] not in seen, f"repeated sample {line!r}"
            seen.add(line.rsplit(" ", 1)[0])
            labels = {
                k: v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
                for k, v in LABELS.findall(line.rsplit(" ", 1)[0])
            }
            families[current]["samples"].append((labels, float(match.group(2))))
    return families


def value(families: dict[str, dict[str, Any]], name: str, **labels: str) -> float:
    matches = [v for got, v in families[name]["samples"] if all(got.get(k) == want for k, want in labels.items())]
    assert len(matches) == 1, f"{name}{labels}: {families[name]['samples']}"
    return matches[0]


def test_metrics_parse_and_carry_every_measure(server: StatusServer) -> None:
    response = get(server, "/metrics")
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = parse_exposition(response.text)
    assert value(families, "edge_agent_pipeline_fps", pipeline="gate") == 10.5
    assert value(families, "edge_agent_pipeline_fps", pipeline="door-mic") == 31.25
    assert (
        value(families, "edge_agent_pipeline_latency_seconds", pipeline="gate", stage="infer", quantile="0.95")
        == 0.0955
    )
    assert (
        value(families, "edge_agent_pipeline_latency_seconds", pipeline="gate", stage="pre", quantile="0.5") == 0.0021
    )
    assert value(families, "edge_agent_pipeline_dropped_frames_total", pipeline="gate") == 5
    assert value(families, "edge_agent_pipeline_results_total", pipeline="gate") == 51
    assert value(families, "edge_agent_pipeline_errors_total", pipeline="gate", kind="source") == 1
    assert value(families, "edge_agent_outbox_messages") == 3
    assert value(families, "edge_agent_outbox_dropped_total") == 2
    assert value(families, "edge_agent_mqtt_connected") == 1
    assert value(families, "edge_agent_uptime_seconds") == 101
    assert (
        value(families, "edge_agent_model_info", pipeline="gate", version="1.4.0", provider="CPUExecutionProvider") == 1
    )
    # Unknown latencies are left out rather than reported as zero.
    assert not [s for s in families["edge_agent_pipeline_latency_seconds"]["samples"] if s[0]["pipeline"] == "door-mic"]
    assert families["edge_agent_pipeline_fps"]["type"] == "gauge"
    assert families["edge_agent_pipeline_results_total"]["type"] == "counter"


def test_metric_label_values_are_escaped() -> None:
    text = render_metrics(
        snapshot_of(pipeline_stats(pipeline="x\ny", model='vad "silero"\\v5', model_version="1"), device='a"b')
    )
    assert 'model="vad \\"silero\\"\\\\v5"' in text and 'pipeline="x\\ny"' in text and 'device="a\\"b"' in text
    families = parse_exposition(text)
    assert value(families, "edge_agent_model_info", pipeline="x\ny") == 1
    assert families["edge_agent_model_info"]["samples"][0][0]["model"] == 'vad "silero"\\v5'


def test_metrics_without_a_broker_or_outbox() -> None:
    families = parse_exposition(render_metrics(snapshot_of()))
    assert "edge_agent_mqtt_connected" not in families and "edge_agent_outbox_messages" not in families
    assert value(families, "edge_agent_info", device="d") == 1


# -- frames ---------------------------------------------------------------------------------------


def test_frame_is_a_jpeg_with_the_boxes_drawn(server: StatusServer, agent: FakeAgent) -> None:
    response = get(server, "/frame/gate.jpg")
    assert response.status_code == 200 and response.headers["Content-Type"] == "image/jpeg"
    image = cv2.imdecode(np.frombuffer(response.content, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (240, 320, 3)
    plain = cv2.imdecode(np.frombuffer(agent.jpeg, np.uint8), cv2.IMREAD_COLOR)
    # The box's top edge (y=95) is drawn in amber where the plain frame is dark grey.
    assert image[95, 100, 2] > 150 and plain[95, 100, 2] < 80
    assert get(server, "/frame/gate.jpg").content == response.content  # the same frame is rendered once


def test_frame_from_an_array_leaves_the_pipelines_frame_untouched() -> None:
    frame = np.zeros((120, 160, 3), np.uint8)
    jpeg = draw_boxes(frame, [[10, 10, 100, 100], {"box": [1, 2, "x", 4]}, {"box": [0, 0, float("inf"), 5]}])
    assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).shape == (120, 160, 3)
    assert not frame.any()


def test_unknown_pipeline_and_path_are_404(server: StatusServer) -> None:
    assert get(server, "/frame/nope.jpg").status_code == 404
    assert get(server, "/frame/door-mic.jpg").status_code == 404
    assert get(server, "/nothing-here").status_code == 404
    assert get(server, "/frame/..%2F..%2Fetc%2Fpasswd.jpg").status_code == 404


def test_a_broken_frame_or_snapshot_is_500_and_the_server_keeps_serving(agent: FakeAgent) -> None:
    def snapshot() -> StatusSnapshot:
        raise KeyError("pipelines")

    agent.jpeg = b"not a jpeg"
    with StatusServer("127.0.0.1:0", snapshot, agent.frame, agent.alive) as srv:
        assert get(srv, "/frame/gate.jpg").status_code == 500
        assert get(srv, "/api/status").status_code == 500
        assert get(srv, "/metrics").status_code == 500
        with socket.create_connection((srv.host, srv.port), timeout=5) as raw:
            raw.sendall(b"BREW /pot HTTP/1.0\r\n\r\n")
            assert raw.recv(100).startswith(b"HTTP/1.0 501")
        with socket.create_connection((srv.host, srv.port), timeout=5) as raw:
            raw.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n")  # a TLS hello on plain HTTP
            assert raw.recv(100)
        assert get(srv, "/healthz").status_code == 200


def test_index_is_one_self_contained_page(server: StatusServer) -> None:
    response = get(server, "/")
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/html")
    page = response.text
    assert 'getContext("2d")' in page and "<img" not in page.split("<script>")[0]
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "the page must not load anything from elsewhere"
    assert 'fetch("api/status"' in page


def test_idle_clients_beyond_the_limit_are_turned_away(server: StatusServer) -> None:
    idle = [socket.create_connection((server.host, server.port), timeout=5) for _ in range(MAX_CLIENTS)]
    try:
        time.sleep(0.3)
        assert get(server, "/healthz").status_code == 503
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 5
    while get(server, "/healthz").status_code != 200:
        assert time.monotonic() < deadline, "closed clients did not give their slots back"
        time.sleep(0.05)


def test_a_taken_address_is_a_clear_error(server: StatusServer, agent: FakeAgent) -> None:
    with pytest.raises(StatusPageError, match=rf"cannot listen on 127.0.0.1:{server.port}"):
        StatusServer(f"127.0.0.1:{server.port}", agent.snapshot, agent.frame, agent.alive).start()


def test_stop_releases_the_port(agent: FakeAgent) -> None:
    srv = StatusServer("127.0.0.1:0", agent.snapshot, agent.frame, agent.alive).start()
    port = srv.port
    srv.stop()
    srv.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)


@pytest.mark.parametrize(
    "address, expected",
    [
        ("127.0.0.1:8790", ("127.0.0.1", 8790)),
        ("[::1]:8790", ("::1", 8790)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
    ],
)
def test_parse_address(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["8790", "localhost", ":8790", "host:port", "host:70000"])
def test_parse_address_refuses(address: str) -> None:
    with pytest.raises(StatusPageError, match="expected host:port"):
        parse_address(address)


def test_ipv6_loopback(agent: FakeAgent) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        srv = StatusServer("[::1]:0", agent.snapshot, agent.frame, agent.alive).start()
    except StatusPageError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    try:
        assert get(srv, "/healthz").text == "ok\n" and srv.url.startswith("http://[::1]:")
    finally:
        srv.stop()


# -- the profile key -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "http, message",
    [
        ("localhost", "expected host:port such as 127.0.0.1:8790"),
        ("127.0.0.1:0", "the port in '127.0.0.1:0' is not a number from 1 to 65535"),
        ("127.0.0.1:99999", "the port in '127.0.0.1:99999' is not a number from 1 to 65535"),
    ],
)
def test_profile_http_key_is_checked(tmp_path: Any, http: str, message: str) -> None:
    from agent.config.errors import ProfileError
    from agent.config.profile import load_profile

    path = tmp_path / "profile.yaml"
    path.write_text(f"device: {{id: d}}\nruntime: {{http: {json.dumps(http)}}}\n")
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    assert f"profile.yaml:2: runtime.http: {message}" in str(err.value)


def test_profile_http_key_is_off_by_default(tmp_path: Any) -> None:
    from agent.config.profile import load_profile

    path = tmp_path / "profile.yaml"
    path.write_text("device: {id: d}\n")
    assert load_profile(path).runtime.http is None
    path.write_text("device: {id: d}\nruntime: {http: '[::1]:8790'}\n")
    assert load_profile(path).runtime.http == "[::1]:8790"


# -- the page as package data, the daemon as the producer -------------------------------------------


@pytest.mark.slow
def test_the_page_is_package_data_and_ships_in_the_wheel(tmp_path: Path) -> None:
    from tests.test_install import copy_source

    assert page() == (REPO / "agent/service/statuspage/page.html").read_bytes()
    source = copy_source(tmp_path / "src")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "wheels"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "wheels").glob("edge_agent-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read("agent/service/statuspage/page.html") == page()


def test_the_daemon_serves_its_pipelines_with_their_real_stats(tmp_path: Path) -> None:
    from tests.helpers.models import unary_model

    save(unary_model("Relu", shape=(1, 3, 48, 64)), tmp_path / "relu.onnx")
    port = free_port()
    path = tmp_path / "profile.yaml"
    path.write_text(
        json.dumps(
            {
                "device": {"id": "page-dev", "state_dir": str(tmp_path / "state")},
                "runtime": {"http": f"127.0.0.1:{port}"},
                "pipelines": [
                    {
                        "name": "cam",
                        "model": str(tmp_path / "relu.onnx"),
                        "source": {"type": "synthetic", "fps": 20, "width": 320, "height": 240},
                        "preprocess": {"resize": [64, 48]},
                        "postprocess": {"type": "raw", "outputs": ["y"], "round": 2},
                    }
                ],
            }
        )
    )
    daemon = Daemon(load_profile(path), path)
    daemon.start()
    try:
        url = f"http://127.0.0.1:{port}/"
        doc = wait_for(
            lambda: (d := requests.get(url + "api/status", timeout=5).json())["pipelines"][0]["results"] > 2 and d,
            timeout=30,
        )
        assert doc and (doc["device"], doc["connection"], doc["outbox"]) == ("page-dev", None, None)
        (cam,) = doc["pipelines"]
        assert (cam["pipeline"], cam["state"], cam["source"], cam["model"]) == ("cam", "running", "synthetic", "relu")
        assert cam["latency_ms"]["infer"]["n"] > 0 and cam["last_error"] is None
        families = parse_exposition(requests.get(url + "metrics", timeout=5).text)
        assert value(families, "edge_agent_pipeline_up", pipeline="cam", state="running") == 1
        assert value(families, "edge_agent_info", device="page-dev") == 1
        assert "edge_agent_mqtt_connected" not in families
        frame = requests.get(url + "frame/cam.jpg", timeout=5)
        image = cv2.imdecode(np.frombuffer(frame.content, np.uint8), cv2.IMREAD_COLOR)
        assert frame.status_code == 200 and image.shape == (240, 320, 3)
    finally:
        daemon.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
