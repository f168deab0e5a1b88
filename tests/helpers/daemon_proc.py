"""Real `edge-agent run` processes for end-to-end tests: a profile written for them, stderr kept in a file.

While an agent runs, a subscriber of its own (`tests.helpers.mqtt_client`) reads everything it
publishes on its events, health, status and reply topics and checks it against the wire contract, so
that every test with a real agent also tests what the agent sends (see `fail_on_contract_violations`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from paho.mqtt.client import MQTTv5, MQTTv311

from tests.helpers.mqtt_client import Subscriber

REPO = Path(__file__).resolve().parents[2]


def sensor_csv(path: Path, rows: int = 200_000) -> Path:
    """Rows a, b, c cycling through small integers: a sensor stream that outlasts any test."""
    lines = ["a,b,c"] + [f"{i % 7},{i % 5},{i % 3}" for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def heavy_linear(path: Path, weight: float, size: int, layers: int) -> Path:
    """y = weight * sum(x), like `linear_model`, plus `layers` size x size MatMuls whose result is
    multiplied by 0: the same outputs, much more work per inference (a slow new version)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.full((3, 1), weight, np.float32), "W"),
        numpy_helper.from_array(np.zeros(1, np.float32), "B"),
        numpy_helper.from_array((rng.standard_normal((3, size * size)) / size).astype(np.float32), "Wbig"),
        numpy_helper.from_array(np.array([size, size], np.int64), "square"),
        numpy_helper.from_array(np.zeros((1, 1), np.float32), "zero"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "B"], ["lin"]),
        helper.make_node("MatMul", ["x", "Wbig"], ["wide"]),
        helper.make_node("Reshape", ["wide", "square"], ["a0"]),
    ]
    for i in range(layers):
        nodes += [
            helper.make_node("MatMul", [f"a{i}", f"a{i}"], [f"m{i}"]),
            helper.make_node("Tanh", [f"m{i}"], [f"a{i + 1}"]),
        ]
    nodes += [
        helper.make_node("ReduceMean", [f"a{layers}"], ["mean"], keepdims=1),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
        helper.make_node("Add", ["lin", "nothing"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "heavy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
        initializer=inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    return path


class AgentProcess:
    """One device: its own folder, profile and state; started with `start()`, stopped as a test needs."""

    def __init__(
        self,
        root: Path,
        device: str,
        group: str,
        broker_url: str,
        registry_url: str,
        public_key: Path,
        model: str = "m",
        csv: Path | None = None,
        rate: float = 50,
        mqtt5: bool = True,
        **extra: Any,
    ) -> None:
        """`mqtt5`: whether the broker speaks MQTT 5 (the contract watcher then does; else 3.1.1). `extra`:
        sections merged into the profile."""
        self.dir = root / device
        self.dir.mkdir(parents=True, exist_ok=True)
        self.device = device
        self.state_dir = self.dir / "state"
        profile = {
            "device": {"id": device, "group": group, "state_dir": str(self.state_dir)},
            "registry": {
                "url": registry_url,
                "public_key": str(public_key),
                "poll_interval": "1h",
                "probation": {"duration": "20s", "min_inferences": 20},
            },
            "mqtt": {"url": broker_url, "keepalive": 5},
            "health": {"interval": "1s"},
            "pipelines": [{"name": "p", "model": model, "source": {"type": "csv", "path": str(csv), "rate": rate}}],
        }
        for key, value in extra.items():
            profile[key] = {**profile.get(key, {}), **value}
        self.profile = self.dir / "profile.json"
        self.profile.write_text(json.dumps(profile))
        self.log = self.dir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.mqtt: dict[str, Any] = profile["mqtt"]
        self.mqtt5 = mqtt5
        self._watch: Subscriber | None = None

    def watch_contract(self) -> None:
        """Read what this agent publishes, checked against the contract, until `stop()`: with the agent's
        own credentials, in the MQTT version the broker speaks. Left out for TLS (this subscriber has none)."""
        url = urlsplit(self.mqtt["url"])
        if self._watch is not None or url.scheme != "mqtt":
            return
        password = self.mqtt.get("password")
        if password is None and self.mqtt.get("password_file"):
            password = Path(self.mqtt["password_file"]).read_text().strip()
        base = f"{self.mqtt.get('topic_prefix', 'edge')}/{self.device}"
        topics = [f"{base}/{kind}" for kind in ("events", "health", "status", "report", "cmd/+/reply")]
        self._watch = Subscriber(
            url.port or 1883,
            *topics,
            username=self.mqtt.get("username"),
            password=password,
            protocol=MQTTv5 if self.mqtt5 else MQTTv311,
        )

    def start(self, env: dict[str, str] | None = None) -> AgentProcess:
        self.watch_contract()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "--profile", str(self.profile)],
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=REPO,
                env={**os.environ, **(env or {})},
            )
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self._watch is not None:
            self._watch.close()
            self._watch = None

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


def slow_on_data(path: Path, iterations_per_unit: int = 2000, size: int = 256) -> Path:
    """y = sum(x) through a Loop of sum(x) * `iterations_per_unit` MatMuls: instant on the all-zero
    warm-up input, seconds on real data. An inference that hangs, without hanging the model's load."""
    rng = np.random.default_rng(1)
    square = numpy_helper.from_array((rng.standard_normal((size, size)) / size).astype(np.float32), "square")
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["a_in", "square"], ["m"]),
            helper.make_node("Tanh", ["m"], ["a_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("a_in", TensorProto.FLOAT, [size, size]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("a_out", TensorProto.FLOAT, [size, size]),
        ],
    )
    inits = [
        square,
        numpy_helper.from_array(np.array(float(iterations_per_unit), np.float32), "per_unit"),
        numpy_helper.from_array(np.array(True), "true"),
        numpy_helper.from_array(np.eye(size, dtype=np.float32), "start"),
        numpy_helper.from_array(np.zeros((1, 1), np.float32), "zero"),
    ]
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=1),
        helper.make_node("Mul", ["total", "per_unit"], ["scaled"]),
        helper.make_node("Cast", ["scaled"], ["count2d"], to=TensorProto.INT64),
        helper.make_node("Squeeze", ["count2d"], ["count"]),
        helper.make_node("Loop", ["count", "true", "start"], ["final"], body=body),
        helper.make_node("ReduceMean", ["final"], ["mean"], keepdims=1),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
        helper.make_node("Add", ["total", "nothing"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "slow_on_data",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
        initializer=inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    return path
