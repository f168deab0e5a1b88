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
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from agent.config.profile import load_profile
from agent.inference.stats import PipelineStats, Timings
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
from agent.service.statuspage import server as server_module
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
        "nan_outputs": 0,
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


def parse_exposition(text: str) -> dict[str, Metric]:
    """Families by name, read by prometheus_client's own parser (what a scraper reads)."""
    assert text.endswith("\n")
    families: dict[str, Metric] = {}
    for family in text_string_to_metric_families(text):
        assert family.name not in families, f"family {family.name} declared twice"
        assert family.documentation, f"family {family.name} has no help"
        families[family.name] = family
    return families


def samples(families: dict[str, Metric], name: str, **labels: str) -> list[float]:
    """The values of the samples called `name` (e.g. a counter's `..._total`) whose labels include these."""
    return [
        s.value
        for family in families.values()
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def value(families: dict[str, Metric], name: str, **labels: str) -> float:
    found = samples(families, name, **labels)
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0]


def test_metrics_parse_and_carry_every_measure(server: StatusServer) -> None:
    response = get(server, "/metrics")
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = parse_exposition(response.text)
    assert value(families, "edge_agent_pipeline_dropped_frames_total", pipeline="gate") == 5
    assert value(families, "edge_agent_pipeline_results_total", pipeline="gate") == 51
    assert value(families, "edge_agent_pipeline_errors_total", pipeline="gate", kind="source") == 1
    assert value(families, "edge_agent_outbox_messages") == 3
    assert value(families, "edge_agent_outbox_oldest_age_seconds") == 0.4
    assert value(families, "edge_agent_mqtt_connects_total") == 1
    assert (
        value(families, "edge_agent_model_info", pipeline="gate", version="1.4.0", provider="CPUExecutionProvider") == 1
    )
    assert families["edge_agent_pipeline_results"].type == "counter"
    assert families["edge_agent_outbox_messages"].type == "gauge"


def test_nan_outputs_are_a_counter_per_pipeline() -> None:
    """The NaN/infinity count that probation judges a version by, where a scraper can alert on it."""
    snapshot = snapshot_of(pipeline_stats(inferences=40, nan_outputs=7), pipeline_stats(pipeline="door-mic"))
    families = parse_exposition(render_metrics(snapshot))
    assert families["edge_agent_pipeline_nan_outputs"].type == "counter"
    assert "NaN" in families["edge_agent_pipeline_nan_outputs"].documentation
    assert value(families, "edge_agent_pipeline_nan_outputs_total", pipeline="gate") == 7
    assert value(families, "edge_agent_pipeline_nan_outputs_total", pipeline="door-mic") == 0


def test_outbox_drops_are_one_counter_with_every_reason() -> None:
    outbox = OutboxStats(
        depth=0, bytes=0, max_bytes=1, oldest_age_s=None, dropped=7, dropped_full=4, dropped_age=3, rejected=2, acked=9
    )
    families = parse_exposition(render_metrics(snapshot_of(outbox=outbox)))
    assert families["edge_agent_outbox_dropped"].type == "counter"
    assert {s.labels["reason"]: s.value for s in families["edge_agent_outbox_dropped"].samples} == {
        "full": 4,
        "age": 3,
        "rejected": 2,
    }
    assert value(families, "edge_agent_outbox_acked_total") == 9
    # Unknown is left out, not reported as zero.
    assert samples(families, "edge_agent_outbox_oldest_age_seconds") == []


def test_states_are_state_sets_whose_label_values_never_change(agent: FakeAgent) -> None:
    """Every state is a series of its own (0 or 1): a change of state changes values, never the set of series."""
    before = parse_exposition(render_metrics(agent.snapshot()))
    offline = ConnectionStatus(
        state="offline", broker="b:1883", connects=1, error="gone", protocol="5", connected_for_s=None
    )
    after = parse_exposition(
        render_metrics(snapshot_of(pipeline_stats(state="failed"), connection=offline, outbox=None))
    )
    for families in (before, after):
        # A state set is written as a gauge in text format 0.0.4: one series per state, labelled with the metric's name.
        assert families["edge_agent_mqtt_state"].type == families["edge_agent_pipeline_state"].type == "gauge"
    series = {tuple(sorted(s.labels.items())) for s in before["edge_agent_mqtt_state"].samples}
    assert series == {tuple(sorted(s.labels.items())) for s in after["edge_agent_mqtt_state"].samples}
    assert {s.labels["edge_agent_mqtt_state"] for s in before["edge_agent_mqtt_state"].samples} == {
        "online",
        "offline",
        "connecting",
        "refused",
        "stopped",
    }
    assert value(before, "edge_agent_mqtt_state", edge_agent_mqtt_state="online") == 1
    assert value(after, "edge_agent_mqtt_state", edge_agent_mqtt_state="online") == 0
    assert value(after, "edge_agent_mqtt_state", edge_agent_mqtt_state="offline") == 1
    gate = [s for s in after["edge_agent_pipeline_state"].samples if s.labels["pipeline"] == "gate"]
    assert {s.labels["edge_agent_pipeline_state"]: s.value for s in gate} == {
        "created": 0,
        "running": 0,
        "stopped": 0,
        "finished": 0,
        "failed": 1,
    }


def test_latency_is_a_histogram_per_stage() -> None:
    timings = Timings(("pre", "infer", "total"))
    for ms in (0.4, 3.0, 80.0, 80.0, 20_000.0):
        timings.add("infer", ms)
    timings.add("pre", 2.5)  # on a bound: counted in that bucket (le means "at most")
    snapshot = snapshot_of(pipeline_stats(), latency={"gate": timings.histograms()})
    families = parse_exposition(render_metrics(snapshot))
    latency = families["edge_agent_pipeline_latency_seconds"]
    assert latency.type == "histogram"
    buckets = {
        s.labels["le"]: s.value for s in latency.samples if s.name.endswith("_bucket") and s.labels["stage"] == "infer"
    }
    assert (buckets["0.001"], buckets["0.005"], buckets["0.1"], buckets["10.0"], buckets["+Inf"]) == (1, 2, 4, 4, 5)
    assert list(buckets.values()) == sorted(buckets.values())  # cumulative
    assert value(families, "edge_agent_pipeline_latency_seconds_count", pipeline="gate", stage="infer") == 5
    assert value(families, "edge_agent_pipeline_latency_seconds_sum", pipeline="gate", stage="infer") == pytest.approx(
        20.1634
    )
    assert value(families, "edge_agent_pipeline_latency_seconds_bucket", stage="pre", le="0.0025") == 1
    # A stage without a duration yet has no series at all (not a histogram of zeros); nor has a quantile label.
    assert samples(families, "edge_agent_pipeline_latency_seconds_count", stage="total") == []
    assert not any("quantile" in s.labels for family in families.values() for s in family.samples)


def test_counters_without_rates_and_the_process_start_time(server: StatusServer) -> None:
    families = parse_exposition(get(server, "/metrics").text)
    assert "edge_agent_pipeline_fps" not in families and "edge_agent_uptime_seconds" not in families
    assert families["process_start_time_seconds"].type == "gauge"
    started = value(families, "process_start_time_seconds")
    assert time.time() - 3600 < started <= time.time()
    assert value(families, "edge_agent_pipeline_frames_total", pipeline="door-mic") == 10


def test_metric_label_values_are_escaped() -> None:
    text = render_metrics(
        snapshot_of(pipeline_stats(pipeline="x\ny", model='vad "silero"\\v5', model_version="1"), device='a"b')
    )
    assert 'model="vad \\"silero\\"\\\\v5"' in text and 'pipeline="x\\ny"' in text and 'device="a\\"b"' in text
    families = parse_exposition(text)
    assert value(families, "edge_agent_model_info", pipeline="x\ny") == 1
    assert families["edge_agent_model_info"].samples[0].labels["model"] == 'vad "silero"\\v5'
    assert value(families, "edge_agent_info", device='a"b') == 1


def test_metrics_without_a_broker_or_outbox() -> None:
    families = parse_exposition(render_metrics(snapshot_of()))
    assert "edge_agent_mqtt_state" not in families and "edge_agent_outbox_messages" not in families
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


def test_clients_that_trickle_their_request_give_their_slots_back(
    agent: FakeAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A per-read timeout alone lets a byte a second hold a slot for ever; the request has a deadline from accept."""
    deadline = 2.5
    monkeypatch.setattr(server_module._Handler, "request_timeout", deadline)
    stop = threading.Event()

    def trickle(sock: socket.socket) -> None:
        while not stop.wait(1.0):
            try:
                sock.sendall(b"X")  # one more header byte, well within the per-read timeout
            except OSError:
                return

    with StatusServer("127.0.0.1:0", agent.snapshot, agent.frame, agent.alive) as srv:
        slow = [socket.create_connection((srv.host, srv.port), timeout=5) for _ in range(MAX_CLIENTS)]
        threads = [threading.Thread(target=trickle, args=(sock,), daemon=True) for sock in slow]
        try:
            for sock in slow:
                sock.sendall(b"GET /healthz HTTP/1.0\r\n")
            started = time.monotonic()
            for thread in threads:
                thread.start()
            time.sleep(0.3)
            assert get(srv, "/healthz").status_code == 503  # every slot is taken
            while get(srv, "/healthz").status_code != 200:
                assert time.monotonic() - started < deadline + 2.5, "trickling clients kept their slots"
                time.sleep(0.1)
        finally:
            stop.set()
            for sock in slow:
                sock.close()
            for thread in threads:
                thread.join()


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
        assert value(families, "edge_agent_pipeline_state", pipeline="cam", edge_agent_pipeline_state="running") == 1
        assert value(families, "edge_agent_info", device="page-dev") == 1
        assert "edge_agent_mqtt_state" not in families
        assert value(families, "edge_agent_pipeline_latency_seconds_count", pipeline="cam", stage="infer") > 0
        assert (
            value(families, "edge_agent_pipeline_latency_seconds_bucket", pipeline="cam", stage="infer", le="+Inf") > 0
        )
        frame = requests.get(url + "frame/cam.jpg", timeout=5)
        image = cv2.imdecode(np.frombuffer(frame.content, np.uint8), cv2.IMREAD_COLOR)
        assert frame.status_code == 200 and image.shape == (240, 320, 3)
    finally:
        daemon.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
