"""The KServe v2 endpoint: a real agent process queried with tritonclient as a user would, every bad request
refused with a 4xx and a JSON message while the pipeline keeps publishing, mTLS, and a hot swap seen at
the next request."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from agent.config.errors import ProfileError
from agent.config.profile import load_profile
from agent.service.daemon import Daemon
from tests.helpers.broker import free_port
from tests.helpers.daemon_proc import REPO, sensor_csv
from tests.helpers.models import linear_model, save
from tests.helpers.tls import TestCA
from tests.helpers.waiting import wait_for

TOKEN = "t0ken-for-tests"
WEIGHTS = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], np.float32)
BIAS = np.array([0.5, -0.5], np.float32)
MAX_BODY = 64 * 1024
MAX_ELEMENTS = 3000
RATE = 40  # the pipeline's results per second


class Agent:
    """`edge-agent run` with a linear sensor model, the endpoint (token) and the status page; stdout's
    results read on a thread of their own."""

    def __init__(self, root: Path) -> None:
        model = save(linear_model(WEIGHTS, BIAS), root / "lin.onnx")
        csv = sensor_csv(root / "sensor.csv")
        self.port, self.page = free_port(), free_port()
        profile = {
            "device": {"id": "ep-dev", "state_dir": str(root / "state")},
            "runtime": {"http": f"127.0.0.1:{self.page}"},
            "endpoint": {
                "enabled": True,
                "address": f"127.0.0.1:{self.port}",
                "token_env": "EDGE_TEST_TOKEN",
                "max_body": MAX_BODY,
                "max_elements": MAX_ELEMENTS,
                "deadline": "5s",
            },
            "pipelines": [
                {"name": "p", "model": str(model), "source": {"type": "csv", "path": str(csv), "rate": RATE}}
            ],
        }
        (root / "profile.json").write_text(json.dumps(profile))
        self.log = root / "agent.log"
        self.results: list[tuple[float, int]] = []  # (arrival, seq)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--profile", str(root / "profile.json")],
            stdout=subprocess.PIPE,
            stderr=self.log.open("wb"),
            cwd=REPO,
            env={**os.environ, "EDGE_TEST_TOKEN": TOKEN},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.results.append((time.monotonic(), json.loads(line)["seq"]))

    def results_between(self, start: float, end: float) -> int:
        return sum(1 for t, _ in list(self.results) if start <= t < end)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    running = Agent(tmp_path_factory.mktemp("endpoint"))
    client = triton.InferenceServerClient(f"127.0.0.1:{running.port}")
    try:
        wait_for(lambda: _ready(client), timeout=60)
        yield running
    finally:
        client.close()
        running.stop()


def _ready(client: triton.InferenceServerClient) -> bool:
    try:
        return bool(client.is_server_ready())
    except Exception:  # noqa: BLE001 (not listening yet)
        return False


def auth() -> dict[str, str]:
    # A fresh dict per call: tritonclient writes Inference-Header-Content-Length into the one it is given.
    return {"Authorization": f"Bearer {TOKEN}"}


def raw(
    agent: Agent, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """One request as curl would send it; the answer's status and JSON body."""
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={**auth(), **(headers or {})})
        response = conn.getresponse()
        data = response.read()
        assert response.getheader("Content-Type") == "application/json", data[:200]
        return response.status, json.loads(data)
    finally:
        conn.close()


def infer_body(x: Any, shape: list[int], datatype: str = "FP32", name: str = "x") -> bytes:
    return json.dumps({"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": x}]}).encode()


# ---- as a user would, with tritonclient -------------------------------------------------------------


def test_tritonclient_reads_metadata_and_infers_in_binary_and_json(agent: Agent) -> None:
    client = triton.InferenceServerClient(f"127.0.0.1:{agent.port}")
    try:
        assert client.is_server_live() and client.is_model_ready("lin", headers=auth())
        meta = client.get_model_metadata("lin", headers=auth())
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
        assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]
        assert meta["versions"][0].startswith("sha256:")
        x = np.arange(12, dtype=np.float32).reshape(4, 3)
        expected = x @ WEIGHTS + BIAS

        binary = triton.InferInput("x", [4, 3], "FP32")
        binary.set_data_from_numpy(x)  # binary-data extension both ways (Inference-Header-Content-Length)
        result = client.infer("lin", [binary], headers=auth())
        np.testing.assert_allclose(result.as_numpy("y"), expected, rtol=1e-6)

        as_json = triton.InferInput("x", [4, 3], "FP32")
        as_json.set_data_from_numpy(x, binary_data=False)
        wanted = [triton.InferRequestedOutput("y", binary_data=False)]
        result = client.infer("lin", [as_json], outputs=wanted, headers=auth(), request_id="r-1")
        answer = result.get_response()
        assert (answer["id"], answer["model_name"], answer["outputs"][0]["shape"]) == ("r-1", "lin", [4, 2])
        np.testing.assert_allclose(result.as_numpy("y"), expected, rtol=1e-6)

        with pytest.raises(InferenceServerException, match="missing or wrong bearer token") as err:
            client.infer("lin", [binary])
        assert err.value.status() == "401"
    finally:
        client.close()


def test_server_metadata_and_health(agent: Agent) -> None:
    status, doc = raw(agent, "GET", "/v2")
    assert status == 200 and doc["name"] == "edge-agent" and "binary_tensor_data" in doc["extensions"]
    assert raw(agent, "GET", "/v2/health/live", headers={"Authorization": ""}) == (200, {"live": True})
    assert raw(agent, "GET", "/v2/health/ready", headers={"Authorization": ""}) == (200, {"ready": True})
    status, doc = raw(agent, "GET", "/v2/models/lin/ready")
    assert status == 200 and doc["ready"] is True


# ---- bad requests: a 4xx with a message each, the agent unharmed ------------------------------------

BINARY_HEAD = b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","parameters":{"binary_data_size":8}}]}'
DEEP = b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}"
BAD = [
    (
        "wrong shape",
        "POST",
        "/v2/models/lin/infer",
        infer_body([1.0] * 8, [2, 4]),
        {},
        400,
        "shape [2, 4] given, the model takes [-1, 3]",
    ),
    (
        "wrong dtype",
        "POST",
        "/v2/models/lin/infer",
        infer_body([1] * 6, [2, 3], "INT64"),
        {},
        400,
        "datatype 'INT64' given, the model takes FP32",
    ),
    (
        "data not numbers",
        "POST",
        "/v2/models/lin/infer",
        infer_body(["a"] * 3, [1, 3]),
        {},
        400,
        "input 'x': data is not a list of float32",
    ),
    (
        "data count",
        "POST",
        "/v2/models/lin/infer",
        infer_body([1.0] * 5, [2, 3]),
        {},
        400,
        "data holds 5 values, shape [2, 3] needs 6",
    ),
    (
        "unknown model",
        "POST",
        "/v2/models/nope/infer",
        infer_body([1.0] * 3, [1, 3]),
        {},
        404,
        "unknown model 'nope' (served here: lin)",
    ),
    (
        "unknown input",
        "POST",
        "/v2/models/lin/infer",
        infer_body([1.0] * 3, [1, 3], name="z"),
        {},
        400,
        "the model has no input 'z'",
    ),
    (
        "unknown output",
        "POST",
        "/v2/models/lin/infer",
        json.dumps(
            {
                "inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}],
                "outputs": [{"name": "q"}],
            }
        ).encode(),
        {},
        400,
        "the model has no output 'q'",
    ),
    ("no inputs", "POST", "/v2/models/lin/infer", b'{"inputs": []}', {}, 400, "needs an `inputs` list"),
    ("bad JSON", "POST", "/v2/models/lin/infer", b'{"inputs": [', {}, 400, "the request is not valid JSON"),
    ("deep JSON", "POST", "/v2/models/lin/infer", DEEP, {}, 400, "nested deeper than 40 levels"),
    (
        "oversized body",
        "POST",
        "/v2/models/lin/infer",
        b"x" * (MAX_BODY + 1),
        {},
        413,
        "over the endpoint's limit of 65536 (endpoint.max_body)",
    ),
    (
        "too many elements",
        "POST",
        "/v2/models/lin/infer",
        infer_body([], [2000, 3]),
        {},
        413,
        "more than 3000 tensor elements",
    ),
    (
        "binary size",
        "POST",
        "/v2/models/lin/infer",
        BINARY_HEAD + bytes(8),
        {"Inference-Header-Content-Length": str(len(BINARY_HEAD))},
        400,
        "binary_data_size 8 does not match the 12 bytes",
    ),
    (
        "header length",
        "POST",
        "/v2/models/lin/infer",
        infer_body([1.0] * 3, [1, 3]),
        {"Inference-Header-Content-Length": "99999"},
        400,
        "is not a length within the body",
    ),
    (
        "missing token",
        "POST",
        "/v2/models/lin/infer",
        infer_body([1.0] * 3, [1, 3]),
        {"Authorization": ""},
        401,
        "missing or wrong bearer token",
    ),
    (
        "wrong token",
        "GET",
        "/v2/models/lin",
        b"",
        {"Authorization": "Bearer guess"},
        401,
        "missing or wrong bearer token",
    ),
    ("GET infer", "GET", "/v2/models/lin/infer", b"", {}, 405, "inference is a POST"),
    ("wrong version", "GET", "/v2/models/lin/versions/9/ready", b"", {}, 404, "not '9'"),
    ("not v2", "GET", "/v1/models", b"", {}, 404, "not a KServe v2 route"),
    ("unknown model route", "POST", "/v2/models/lin/train", b"{}", {}, 404, "no such route for model 'lin': 'train'"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "message"), [c[1:] for c in BAD], ids=[c[0] for c in BAD]
)
def test_a_bad_request_is_a_4xx_with_a_json_message(
    agent: Agent, method: str, path: str, body: bytes, headers: dict[str, str], status: int, message: str
) -> None:
    got, doc = raw(agent, method, path, body, headers)
    assert got == status and message in doc["error"], doc
    assert raw(agent, "POST", "/v2/models/lin/infer", infer_body([1.0, 1.0, 1.0], [1, 3]))[0] == 200
    assert agent.proc.poll() is None


def test_chunked_body_is_refused_with_411(agent: Agent) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    try:
        conn.request(
            "POST", "/v2/models/lin/infer", body=iter([b"{}"]), headers={**auth(), "Transfer-Encoding": "chunked"}
        )
        response = conn.getresponse()
        assert response.status == 411 and "Content-Length" in json.loads(response.read())["error"]
    finally:
        conn.close()


def test_requests_are_counted_and_timed_in_metrics(agent: Agent) -> None:
    raw(agent, "POST", "/v2/models/lin/infer", infer_body([1.0] * 3, [1, 3]))
    raw(agent, "POST", "/v2/models/lin/infer", infer_body([1.0] * 2, [1, 2]))
    raw(agent, "POST", "/v2/models/made-up/infer", infer_body([1.0] * 3, [1, 3]))
    text = requests.get(f"http://127.0.0.1:{agent.page}/metrics", timeout=5).text
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("edge_agent_endpoint")
    }
    assert samples['edge_agent_endpoint_requests_total{code="200",model="lin"}'] >= 1
    assert samples['edge_agent_endpoint_requests_total{code="400",model="lin"}'] >= 1
    assert samples['edge_agent_endpoint_requests_total{code="404",model=""}'] >= 1  # made-up names share one label
    assert samples['edge_agent_endpoint_request_seconds_count{model="lin"}'] >= 1
    assert not any("made-up" in key for key in samples)


def test_results_keep_flowing_while_the_endpoint_is_loaded(agent: Agent) -> None:
    wait_for(lambda: len(agent.results) > RATE, timeout=30)
    stop = threading.Event()
    served = [0]
    body = infer_body(np.ones((64, 3)).ravel().tolist(), [64, 3])

    def load() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
        while not stop.is_set():
            conn.request("POST", "/v2/models/lin/infer", body=body, headers=auth())
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            served[0] += 1
        conn.close()

    quiet_start = time.monotonic()
    time.sleep(2.0)
    loaded_start = time.monotonic()
    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(3.0)
    stop.set()
    for t in threads:
        t.join(10)
    loaded_end = time.monotonic()
    time.sleep(0.3)  # the last results in flight reach stdout
    quiet_rate = agent.results_between(quiet_start, loaded_start) / (loaded_start - quiet_start)
    loaded_rate = agent.results_between(loaded_start, loaded_end) / (loaded_end - loaded_start)
    assert served[0] > 100, f"the endpoint answered only {served[0]} requests in 3 s"
    assert loaded_rate >= 0.8 * min(quiet_rate, RATE), (quiet_rate, loaded_rate)
    seqs = [s for _, s in agent.results]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a result was lost or repeated"
    log = agent.log.read_text()
    assert "Traceback" not in log and TOKEN not in log


# ---- profile, mTLS, hot swap (in process) -----------------------------------------------------------


def test_an_endpoint_beyond_loopback_needs_a_token_or_mtls(tmp_path: Path) -> None:
    path = tmp_path / "profile.yaml"
    path.write_text("device: {id: d}\nendpoint: {enabled: true, address: '0.0.0.0:8000'}\n")
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    assert "profile.yaml:2: endpoint: " in str(err.value) and "set token_env or token_file" in str(err.value)
    path.write_text("device: {id: d}\nendpoint: {enabled: true, address: '0.0.0.0:8000', token_env: T}\n")
    assert load_profile(path).endpoint.token_env == "T"
    assert load_profile(tmp_path / "profile.yaml").endpoint.max_body == 64 * 1024**2


def test_a_missing_token_stops_the_start_with_one_line(tmp_path: Path) -> None:
    save(linear_model(WEIGHTS, BIAS), tmp_path / "lin.onnx")
    profile = {
        "device": {"id": "d", "state_dir": str(tmp_path / "state")},
        "endpoint": {"enabled": True, "address": f"127.0.0.1:{free_port()}", "token_env": "EDGE_NOT_SET_ANYWHERE"},
        "pipelines": [
            {
                "name": "p",
                "model": str(tmp_path / "lin.onnx"),
                "source": {"type": "csv", "path": str(sensor_csv(tmp_path / "s.csv", 10))},
            }
        ],
    }
    (tmp_path / "p.json").write_text(json.dumps(profile))
    env = {k: v for k, v in os.environ.items() if k != "EDGE_NOT_SET_ANYWHERE"}
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--profile", str(tmp_path / "p.json")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "endpoint.token_env: environment variable EDGE_NOT_SET_ANYWHERE is not set or empty" in proc.stderr
    assert "Traceback" not in proc.stderr


def _daemon(tmp_path: Path, endpoint: dict[str, Any]) -> tuple[Daemon, int]:
    save(linear_model(WEIGHTS, BIAS), tmp_path / "lin.onnx")
    port = free_port()
    profile = {
        "device": {"id": "d", "state_dir": str(tmp_path / "state")},
        "endpoint": {"enabled": True, "address": f"127.0.0.1:{port}", **endpoint},
        "pipelines": [
            {
                "name": "p",
                "model": str(tmp_path / "lin.onnx"),
                "source": {"type": "csv", "path": str(sensor_csv(tmp_path / "s.csv")), "rate": 20},
            }
        ],
    }
    (tmp_path / "p.json").write_text(json.dumps(profile))
    daemon = Daemon(load_profile(tmp_path / "p.json"), tmp_path / "p.json")
    daemon.start()
    return daemon, port


def test_mutual_tls_admits_a_client_certificate_and_refuses_none(tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "ca")
    server, client = ca.issue("server", "127.0.0.1", server=True), ca.issue("client", "tester")
    tls = {"cert": str(server.cert), "key": str(server.key), "client_ca": str(ca.pem)}
    daemon, port = _daemon(tmp_path, {"tls": tls})
    try:
        context = ssl.create_default_context(cafile=str(ca.pem))
        context.load_cert_chain(client.cert, client.key)
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
        conn.request("POST", "/v2/models/lin/infer", body=infer_body([1.0, 0.0, 0.0], [1, 3]))
        response = conn.getresponse()
        assert response.status == 200
        assert json.loads(response.read())["outputs"][0]["data"] == [1.5, 1.5]
        conn.close()
        anonymous = http.client.HTTPSConnection(
            "127.0.0.1", port, context=ssl.create_default_context(cafile=str(ca.pem)), timeout=10
        )
        with pytest.raises((ssl.SSLError, ConnectionError)):
            anonymous.request("GET", "/v2")
            anonymous.getresponse()
        anonymous.close()
    finally:
        daemon.stop()


def test_a_hot_swap_is_served_from_the_next_request(tmp_path: Path) -> None:
    daemon, port = _daemon(tmp_path, {})
    try:
        assert daemon.parts is not None
        pipeline = daemon.parts.pipelines["p"]
        url = f"http://127.0.0.1:{port}/v2/models/lin"
        before = requests.get(url, timeout=5).json()["versions"]
        new = save(linear_model(WEIGHTS * 10, BIAS), tmp_path / "v2.onnx")
        pipeline.swap(new, version="2.0.0", name="lin")
        assert requests.get(url, timeout=5).json()["versions"] == ["2.0.0"] != before
        answer = requests.post(url + "/infer", data=infer_body([1.0, 0.0, 0.0], [1, 3]), timeout=5).json()
        assert answer["model_version"] == "2.0.0" and answer["outputs"][0]["data"] == [10.5, 19.5]
        # The endpoint holds no session of its own: the pipeline's model is the one it ran.
        assert daemon.parts.endpoint is not None
        assert daemon.parts.endpoint.routes.models()["lin"] is pipeline.model
    finally:
        daemon.stop()


def test_a_token_from_a_file_is_required_and_never_echoed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "token").write_text("  file-token-123\n")
    daemon, port = _daemon(tmp_path, {"token_file": str(tmp_path / "token")})
    try:
        url = f"http://127.0.0.1:{port}/v2/models/lin"
        caplog.set_level("DEBUG", logger="agent")
        assert requests.get(url, timeout=5, headers={"Authorization": "Bearer file-token-12"}).status_code == 401
        assert requests.get(url, timeout=5, headers={"Authorization": "Basic file-token-123"}).status_code == 401
        assert requests.get(url, timeout=5, headers={"Authorization": "Bearer file-token-123"}).status_code == 200
        assert "refused status=401" in caplog.text and "file-token-123" not in caplog.text
    finally:
        daemon.stop()


def test_clients_that_trickle_their_request_give_their_threads_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request (the wait for it included) must arrive whole within IDLE_TIMEOUT_S: the timeout was per read,
    so max_clients clients sending a header byte every second kept every thread and the endpoint answered 503
    for as long as they liked."""
    from agent.config.endpoint import EndpointConfig
    from agent.service.endpoint import server

    deadline = 4.0
    monkeypatch.setattr(server._Handler, "request_timeout", deadline)
    config = EndpointConfig(enabled=True, address=f"127.0.0.1:{free_port()}", max_clients=2)
    endpoint = server.InferenceEndpoint(config, dict, lambda: None, {}).start()
    stop = threading.Event()
    # Connected here, before any check: each holds a thread from now on, whatever the threads below do.
    slow = [socket.create_connection(("127.0.0.1", endpoint.port), timeout=10) for _ in range(2)]

    def trickle(sock: socket.socket) -> None:
        with sock, contextlib.suppress(OSError):  # closed by the server: what the test waits for
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")
            while not stop.wait(1.0):
                sock.sendall(b"X")  # one more header byte, well within any per-read timeout

    def live() -> int:
        return requests.get(f"{endpoint.url}/v2/health/live", timeout=5).status_code

    try:
        for sock in slow:
            threading.Thread(target=trickle, args=(sock,), daemon=True).start()
        assert live() == 503, "the trickling clients do not hold both threads"
        started = time.monotonic()
        assert wait_for(lambda: live() == 200, 2 * deadline), "trickling clients kept their threads"
        assert time.monotonic() - started < deadline + 2.0
    finally:
        stop.set()
        endpoint.stop()
