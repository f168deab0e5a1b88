"""Home Assistant MQTT discovery: the configs against a JSON Schema written from Home Assistant's
documentation, their templates rendered the way Home Assistant renders them (Jinja in a sandbox, with
`value` and `value_json`), and a real agent on a real broker whose entities change state with its
results, lose a pipeline's entities on a reload without it, and clear configs an earlier run left.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from agent.config.base import adapter
from agent.config.profile import Profile
from agent.service.homeassistant import POST_ENTITIES, config_payload, config_topic, entities, node_id
from agent.transport.topics import Topics
from tests.helpers.broker import Mosquitto
from tests.helpers.models import linear_model, save
from tests.helpers.mqtt_client import Subscriber
from tests.helpers.waiting import wait_for

REPO = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((REPO / "tests/fixtures/homeassistant/mqtt-discovery.schema.json").read_text())
TOPIC = re.compile(
    r"^(?P<prefix>.+)/(?P<component>sensor|binary_sensor)/(?P<node>[a-zA-Z0-9_-]+)/[a-zA-Z0-9_-]+/config$"
)
# What Home Assistant renders MQTT templates in: a sandbox that allows no mutation (its TemplateEnvironment
# derives from this one), with `value` (the payload as text) and `value_json` (the payload parsed).
JINJA = ImmutableSandboxedEnvironment()


def validator(component: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({"$ref": f"#/$defs/{component}", "$defs": SCHEMA["$defs"]})


def render(template: str, payload: bytes | str) -> str:
    """A value template as Home Assistant renders it for an MQTT entity (the result stripped, as HA does)."""
    value = payload.decode() if isinstance(payload, bytes) else payload
    variables: dict[str, Any] = {"value": value}
    try:
        variables["value_json"] = json.loads(value)
    except ValueError:
        pass
    return JINJA.from_string(template).render(**variables).strip()


def binary_state(config: dict[str, Any], payload: bytes) -> str | None:
    """A binary sensor's state after this message: on, off, or None (HA ignores the message)."""
    got = render(config["value_template"], payload) if "value_template" in config else payload.decode()
    return {config.get("payload_on", "ON"): "on", config.get("payload_off", "OFF"): "off"}.get(got)


def every_kind_of_pipeline(tmp_path: Path) -> Profile:
    pipelines = [
        {"name": name, "model": "m.onnx", "source": {"type": "synthetic"}, "postprocess": post}
        for name, post in [
            ("door", {"type": "threshold"}),
            ("sound.type", {"type": "classification"}),
            ("pallets", {"type": "detection"}),
            ("gate", {"type": "text-detection"}),
            ("pump", {"type": "anomaly", "threshold": 2.0}),
            ("raw-out", {"type": "raw"}),
        ]
    ]
    doc = {
        "device": {"id": "gate-cam.01"},
        "mqtt": {"url": "mqtt://broker"},
        "homeassistant": {"enabled": True},
        "pipelines": [*pipelines, {**pipelines[0], "name": "off", "enabled": False}],
    }
    return adapter(Profile).validate_python(doc, context={"base_dir": tmp_path})


def discovery(profile: Profile) -> dict[str, dict[str, Any]]:
    topics = Topics("edge", profile.device.id)
    return {
        config_topic(profile.homeassistant.discovery_prefix, profile.device.id, e): config_payload(e, topics, "0.1.0")
        for e in entities(topics, profile.pipelines)
    }


# -- the configs, against Home Assistant's documented keys ------------------------------------------


def test_every_config_follows_home_assistants_documented_keys(tmp_path: Path) -> None:
    configs = discovery(every_kind_of_pipeline(tmp_path))
    for topic, config in configs.items():
        match = TOPIC.match(topic)
        assert match and match["prefix"] == "homeassistant" and match["node"] == "gate-cam_01", topic
        errors = sorted(validator(match["component"]).iter_errors(config), key=str)
        assert not errors, f"{topic}: " + "; ".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)
        for key, text in config.items():
            if key.endswith("_template"):
                JINJA.parse(text)  # every template compiles
        for check in config.get("availability", []):
            JINJA.parse(check["value_template"])
    unique = [c["unique_id"] for c in configs.values()]
    assert len(unique) == len(set(unique))
    assert all(c["device"]["identifiers"] == ["edge_agent_gate-cam_01"] for c in configs.values())
    assert all(c["origin"]["name"] == "edge-agent" for c in configs.values())


def test_an_entity_per_pipeline_that_fits_its_post_processor(tmp_path: Path) -> None:
    configs = discovery(every_kind_of_pipeline(tmp_path))
    kinds = {topic.split("/")[-2]: topic.split("/")[1] for topic in configs}
    assert {k: v for k, v in kinds.items() if not k.endswith(("_model_version", "_provider", "_fps", "_latency"))} == {
        "connection": "binary_sensor",
        "outbox": "sensor",
        "door_event": "binary_sensor",
        "sound_type_class": "sensor",
        "pallets_count": "sensor",
        "gate_count": "sensor",
        "pump_anomaly": "binary_sensor",
    }
    for pipeline in ("door", "sound_type", "pallets", "gate", "pump", "raw-out"):
        assert {f"{pipeline}_{k}" for k in ("model_version", "provider", "fps", "latency")} <= set(kinds)
    assert not any(k.startswith("off_") for k in kinds)  # a disabled pipeline has no entities
    assert set(POST_ENTITIES) == {"threshold", "anomaly", "classification", "detection", "text-detection"}


def test_the_schema_refuses_what_home_assistant_would_ignore_or_refuse() -> None:
    sensor, binary = validator("sensor"), validator("binary_sensor")
    good = {"state_topic": "edge/d/health", "unique_id": "u", "device": {"identifiers": ["d"]}}
    assert sensor.is_valid(good) and binary.is_valid(good)
    assert not sensor.is_valid({**good, "value_templat": "{{ value }}"})  # a misspelt key: ignored by HA
    assert not sensor.is_valid({"state_topic": "t", "device": {"identifiers": ["d"]}})  # device without unique_id
    assert not sensor.is_valid({**good, "device_class": "duration", "unit_of_measurement": "fortnights"})
    assert not binary.is_valid({**good, "device_class": "temperature"})
    assert not sensor.is_valid({**good, "availability": [{"topic": "a"}], "availability_topic": "a"})
    assert not sensor.is_valid({**good, "state_topic": "edge/+/health"})


# -- the templates, rendered as Home Assistant renders them ------------------------------------------


def test_templates_read_single_results_batches_and_health(tmp_path: Path) -> None:
    configs = discovery(every_kind_of_pipeline(tmp_path))

    def config(object_id: str) -> dict[str, Any]:
        (found,) = [c for t, c in configs.items() if t.split("/")[-2] == object_id]
        return found

    door = config("door_event")
    assert binary_state(door, json.dumps({"seq": 3, "output": {"event": "open", "t": 1.5}}).encode()) == "on"
    batch = {"seq": 4, "count": 2, "results": [{"output": {"event": "open"}}, {"output": {"event": "close"}}]}
    assert binary_state(door, json.dumps(batch).encode()) == "off"  # the newest result of a batch
    assert json.loads(render(door["json_attributes_template"], json.dumps({"output": {"event": "close", "t": 2}}))) == {
        "event": "close",
        "t": 2,
    }
    label = config("sound_type_class")["value_template"]
    assert render(label, json.dumps({"output": {"classes": [{"class": 3, "score": 0.9, "label": "bark"}]}})) == "bark"
    assert render(label, json.dumps({"output": {"classes": [{"class": 3, "score": 0.9}]}})) == "3"
    assert render(label, json.dumps({"output": {"classes": []}})) == "none"
    boxes = {"output": {"boxes": [{"box": [1, 2, 3, 4], "score": 0.9}] * 3}}
    assert render(config("gate_count")["value_template"], json.dumps(boxes)) == "3"
    assert render(config("pallets_count")["value_template"], json.dumps({"output": {"detections": []}})) == "0"
    assert (
        binary_state(config("pump_anomaly"), json.dumps({"output": {"score": 3.1, "anomaly": True}}).encode()) == "on"
    )

    health = {
        "outbox": {"depth": 12},
        "pipelines": {
            "door": {
                "model_version": "1.4.0",
                "provider": "CPUExecutionProvider",
                "results_per_s": 9.5,
                "latency_ms": {"total": {"p50": 12.5, "p95": 20.0, "n": 9}},
            }
        },
    }
    text = json.dumps(health)
    assert render(config("outbox")["value_template"], text) == "12"
    assert render(config("door_model_version")["value_template"], text) == "1.4.0"
    assert render(config("door_provider")["value_template"], text) == "CPUExecutionProvider"
    assert render(config("door_fps")["value_template"], text) == "9.5"
    assert render(config("door_latency")["value_template"], text) == "12.5"
    # A pipeline not (or not yet) in the report, a latency not measured yet, a section whose source failed:
    # an empty value, which Home Assistant ignores, never a template error.
    assert render(config("gate_fps")["value_template"], text) == ""
    unmeasured = {"pipelines": {"door": {"latency_ms": {"total": {"p50": None, "p95": None, "n": 0}}}}}
    assert render(config("door_latency")["value_template"], json.dumps(unmeasured)) == ""
    failed = json.dumps({"pipelines": {"error": "boom"}, "outbox": {"error": "closed"}})
    assert render(config("door_fps")["value_template"], failed) == ""
    assert render(config("outbox")["value_template"], failed) == ""


def test_availability_and_connection_follow_the_retained_status(tmp_path: Path) -> None:
    configs = discovery(every_kind_of_pipeline(tmp_path))
    online = json.dumps({"device": "gate-cam.01", "group": "default", "state": "online"})
    will = json.dumps({"device": "gate-cam.01", "group": "default", "state": "offline", "reason": "connection lost"})
    connection = next(c for t, c in configs.items() if t.endswith("/connection/config"))
    assert "availability" not in connection and connection["state_topic"] == "edge/gate-cam.01/status"
    assert (binary_state(connection, online.encode()), binary_state(connection, will.encode())) == ("on", "off")
    for topic, config in configs.items():
        if config is connection:
            continue
        (check,) = config["availability"]
        assert check["topic"] == "edge/gate-cam.01/status", topic
        assert (render(check["value_template"], online), render(check["value_template"], will)) == ("online", "offline")


# -- a real agent on a real broker --------------------------------------------------------------------

ROWS = [0] * 10 + [1] * 10 + [0] * 20  # quiet, loud for half a second, quiet


@pytest.fixture
def agent_dir(tmp_path: Path) -> Path:
    save(linear_model(np.ones((1, 1))), tmp_path / "score.onnx")
    save(linear_model(np.array([[-1.0, 1.0]]), np.array([0.5, -0.5])), tmp_path / "sound.onnx")
    (tmp_path / "labels.txt").write_text("quiet\nloud\n")
    (tmp_path / "level.csv").write_text("s\n" + "\n".join(str(v) for v in ROWS) + "\n")
    return tmp_path


def agent_profile(folder: Path, device: str, broker: Mosquitto, prefix: str, *, spare: bool = True) -> dict[str, Any]:
    source = {"type": "csv", "path": "level.csv", "rate": 20}
    pipelines: list[dict[str, Any]] = [
        {"name": "door", "model": "score.onnx", "source": source, "postprocess": {"type": "threshold"}},
    ]
    if spare:
        pipelines.append(
            {
                "name": "sound",
                "model": "sound.onnx",
                "source": source,
                "postprocess": {"type": "classification", "labels": "labels.txt"},
            }
        )
    return {
        "device": {"id": device, "state_dir": str(folder / "state")},
        "mqtt": {"url": broker.url, "keepalive": 5},
        "health": {"interval": "1s"},
        "homeassistant": {"enabled": True, "discovery_prefix": prefix},
        "pipelines": pipelines,
    }


@pytest.fixture
def names() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    return f"ha-{tag}", f"ha{tag}/discovery"  # a device and a discovery prefix of this test's own


@pytest.fixture
def running(agent_dir: Path, broker: Mosquitto, names: tuple[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    device, prefix = names
    profile = agent_dir / "profile.json"
    profile.write_text(json.dumps(agent_profile(agent_dir, device, broker, prefix)))
    # What an earlier run left: the config of a pipeline this profile no longer has.
    leftover = Subscriber(broker.port)
    leftover.client.publish(
        f"{prefix}/sensor/{node_id(device)}/old_count/config", json.dumps({"state_topic": "x"}), qos=1, retain=True
    ).wait_for_publish(5)
    leftover.close()
    with (agent_dir / "agent.log").open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--profile", str(profile)], stderr=log, cwd=REPO)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def announced(folder: Path, device: str, broker: Mosquitto, prefix: str, *, spare: bool = True) -> set[str]:
    """The config topics the agent announces for this profile: waited for all together, since they travel
    as separate messages and the entities read below need not be the last ones to arrive."""
    profile = adapter(Profile).validate_python(
        agent_profile(folder, device, broker, prefix, spare=spare), context={"base_dir": folder}
    )
    return {config_topic(prefix, device, e) for e in entities(Topics("edge", device), profile.pipelines)}


def configs_of(sub: Subscriber, prefix: str) -> dict[str, bytes]:
    """The newest payload seen on each discovery topic (b"" for a removed config)."""
    latest: dict[str, bytes] = {}
    for message in list(sub.messages):
        if message.topic.startswith(prefix + "/"):
            latest[message.topic] = bytes(message.payload)
    return latest


def test_a_real_agents_entities_change_state_with_its_results_and_go_with_their_pipeline(
    running: subprocess.Popen[bytes], agent_dir: Path, broker: Mosquitto, names: tuple[str, str]
) -> None:
    device, prefix = names
    node = node_id(device)
    door_topic = f"{prefix}/binary_sensor/{node}/door_event/config"
    sound_topic = f"{prefix}/sensor/{node}/sound_class/config"
    old_topic = f"{prefix}/sensor/{node}/old_count/config"
    sub = Subscriber(broker.port, f"{prefix}/#", f"edge/{device}/#")
    try:
        # Every config is valid, and the one an earlier run left is emptied.
        expected = announced(agent_dir, device, broker, prefix)
        assert {door_topic, sound_topic} <= expected
        configs = wait_for(lambda: (c := configs_of(sub, prefix)) and all(c.get(t) for t in expected) and c, timeout=30)
        assert configs, f"configs missing: {sorted(t for t in expected if not configs_of(sub, prefix).get(t))}"
        assert wait_for(lambda: configs_of(sub, prefix).get(old_topic) == b"", timeout=20), (
            f"the earlier run's config is not emptied: {configs_of(sub, prefix).get(old_topic)!r}"
        )
        for topic, payload in configs_of(sub, prefix).items():
            if payload:
                assert validator(topic.split("/")[-4]).is_valid(json.loads(payload)), topic

        # The threshold pipeline's binary sensor opens and closes with the results, as HA would read them.
        door = json.loads(configs[door_topic])
        results = door["state_topic"]
        assert results == f"edge/{device}/door/results"

        def door_states() -> list[str]:
            return [s for m in sub.on(results) if (s := binary_state(door, bytes(m.payload))) is not None]

        assert wait_for(lambda: door_states() == ["on", "off"] and door_states(), timeout=30), door_states()

        # The classification sensor shows the top label of the newest result.
        sound = json.loads(configs[sound_topic])
        assert wait_for(lambda: len(sub.on(sound["state_topic"])) >= len(ROWS), timeout=30), (
            f"{len(sub.on(sound['state_topic']))} of {len(ROWS)} classification results"
        )
        labels = [render(sound["value_template"], bytes(m.payload)) for m in sub.on(sound["state_topic"])]
        assert labels[:10] == ["quiet"] * 10 and "loud" in labels and labels[-1] == "quiet"

        # Health-based entities read the real health report; availability reads the real status.
        health = wait_for(
            lambda: (
                (h := sub.on(f"edge/{device}/health"))
                and "door" in json.loads(h[-1].payload).get("pipelines", {})
                and h[-1]
            ),
            timeout=15,
        )
        assert health, f"no health report with the door pipeline: {sub.payloads(f'edge/{device}/health')[-1:]}"
        version = json.loads(configs[f"{prefix}/sensor/{node}/door_model_version/config"])
        provider = json.loads(configs[f"{prefix}/sensor/{node}/door_provider/config"])
        assert render(version["value_template"], bytes(health.payload)).startswith("sha256:")
        assert render(provider["value_template"], bytes(health.payload)) == "CPUExecutionProvider"
        outbox = json.loads(configs[f"{prefix}/sensor/{node}/outbox/config"])
        assert render(outbox["value_template"], bytes(health.payload)).isdigit()

        def availability() -> str | None:
            status = sub.on(f"edge/{device}/status")
            return render(door["availability"][0]["value_template"], bytes(status[-1].payload)) if status else None

        assert wait_for(lambda: availability() == "online", timeout=15), sub.payloads(f"edge/{device}/status")

        # A reload without the classification pipeline removes its entities (empty retained configs).
        spare = [t for t in configs_of(sub, prefix) if f"/{node}/sound_" in t]
        assert len(spare) == 5  # its class, model version, provider, results per second, latency
        (agent_dir / "profile.json").write_text(
            json.dumps(agent_profile(agent_dir, device, broker, prefix, spare=False))
        )
        running.send_signal(signal.SIGHUP)
        assert wait_for(lambda: all(configs_of(sub, prefix).get(t) == b"" for t in spare), timeout=30), {
            t: configs_of(sub, prefix).get(t) for t in spare
        }
        assert configs_of(sub, prefix)[door_topic]  # the others stay

        # What Home Assistant reads when it starts now: the retained configs, without the removed ones.
        later = Subscriber(broker.port, f"{prefix}/#")
        try:
            later.sync()  # every retained config is in
            retained = configs_of(later, prefix)
            assert retained.get(door_topic), sorted(retained)
            assert not [t for t in retained if "/sound_" in t or "old_count" in t]
        finally:
            later.close()

        # Stopped: the status says offline, and every entity but the connection is unavailable.
        running.send_signal(signal.SIGTERM)
        assert running.wait(30) == 0
        final = sub.wait_for(
            lambda: (
                (s := sub.on(f"edge/{device}/status")) and json.loads(s[-1].payload)["state"] == "offline" and s[-1]
            ),
            timeout=30,
        )
        assert final, sub.payloads(f"edge/{device}/status")
        assert render(door["availability"][0]["value_template"], bytes(final.payload)) == "offline"
    finally:
        sub.close()
        cleaner = Subscriber(broker.port)  # leave the session's broker without this test's retained configs
        for topic in configs_of(sub, prefix):
            cleaner.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        cleaner.close()
