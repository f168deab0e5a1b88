"""Home Assistant MQTT discovery: this device and its entities, announced on Home Assistant's discovery
topics and read from the agent's own topics with Home Assistant's templates.

Nothing new is published for Home Assistant to read: every entity points at a topic the agent already
has (the retained status, the retained health, each pipeline's results) and a `value_template` that
picks its value out of the JSON there, the way Home Assistant renders it (Jinja, `value_json`). The
configs are retained, so Home Assistant finds them whenever it starts; each one is

    <discovery_prefix>/<component>/<device>/<object>/config     (HA's "single component discovery")

One device per agent, with:
- `connection` (binary sensor, connectivity) from the status; every other entity is available while
  the status says `online`, so the Last Will makes them unavailable;
- `outbox` (sensor): messages waiting for the broker, from the health report;
- per pipeline, from the health report: its model version, its execution provider, results per second
  and its latency (p50 of the whole pipeline, ms);
- per pipeline, from its results, an entity that fits its post-processor (POST_ENTITIES): a threshold
  pipeline is a binary sensor that opens and closes with its events, a classification the top label,
  a detector the number of detections in the newest frame, an anomaly detector a problem sensor.

A pipeline that goes (a reload without it, a restart with another profile) has its configs replaced by
an empty retained message, which is how Home Assistant removes an entity: configs left by an earlier run
are found by subscribing to this device's discovery topics, and emptied unless they are current.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from agent.config.homeassistant import HomeAssistantConfig
    from agent.config.profile import PipelineConfig
    from agent.transport.connection import Connection
    from agent.transport.subscriptions import Incoming
    from agent.transport.topics import Topics

log = logging.getLogger(__name__)

ORIGIN_NAME = "edge-agent"
SUPPORT_URL = "https://edge-agent.dev/"
# Topic levels Home Assistant accepts for <node_id> and <object_id>.
_NOT_ID = re.compile(r"[^a-zA-Z0-9_-]")
# The newest result of a results message: one result, or a batch (`results`, oldest first).
LATEST = "{% set r = value_json.results[-1] if value_json.results is defined else value_json %}"

Component = Literal["sensor", "binary_sensor"]


@dataclass(frozen=True)
class Entity:
    """One entity of this device: its component, an id unique within the device, and its own keys."""

    component: Component
    object_id: str
    config: dict[str, Any]
    available_when_online: bool = True


PipelineEntity = Callable[[str, str], Entity]  # (pipeline name, its results topic) -> entity


def _threshold(name: str, topic: str) -> Entity:
    # Only changes are published: "open", then "close"; each result's fields become its attributes.
    return Entity(
        "binary_sensor",
        f"{name}_event",
        {
            "name": name,
            "state_topic": topic,
            "value_template": LATEST + "{{ r.output.event | default('') }}",
            "payload_on": "open",
            "payload_off": "close",
            "json_attributes_topic": topic,
            "json_attributes_template": LATEST + "{{ r.output | default({}) | tojson }}",
        },
    )


def _anomaly(name: str, topic: str) -> Entity:
    return Entity(
        "binary_sensor",
        f"{name}_anomaly",
        {
            "name": name,
            "device_class": "problem",
            "state_topic": topic,
            "value_template": LATEST + "{{ 'ON' if r.output.anomaly else 'OFF' }}",
        },
    )


def _classification(name: str, topic: str) -> Entity:
    # The top class's label (its index when the pipeline has no labels file); "none" under the threshold.
    top = "{% set c = r.output.classes | default([]) %}{{ (c[0].label | default(c[0]['class'])) if c else 'none' }}"
    return Entity("sensor", f"{name}_class", {"name": name, "state_topic": topic, "value_template": LATEST + top})


def _count(key: str, unit: str) -> PipelineEntity:
    def entity(name: str, topic: str) -> Entity:
        return Entity(
            "sensor",
            f"{name}_count",
            {
                "name": name,
                "state_topic": topic,
                "value_template": LATEST + f"{{{{ r.output.{key} | default([]) | length }}}}",
                "state_class": "measurement",
                "unit_of_measurement": unit,
            },
        )

    return entity


# The entity for each post-processor type (`postprocess.type`); `raw` has none: its outputs are the
# model's own, nothing Home Assistant could show as one state.
POST_ENTITIES: dict[str, PipelineEntity] = {
    "threshold": _threshold,
    "anomaly": _anomaly,
    "classification": _classification,
    "detection": _count("detections", "objects"),
    "text-detection": _count("boxes", "text regions"),
}


def _from_health(name: str, expr: str) -> str:
    """A template over one pipeline's entry in the health report; empty (ignored by HA) while it has none."""
    pick = "{% set p = (value_json.pipelines | default({}, true)).get(" + json.dumps(name) + ") %}"
    return pick + "{{ " + expr + " if p else '' }}"


def _pipeline_health(name: str, health: str) -> list[Entity]:
    def sensor(kind: str, label: str, expr: str, **extra: Any) -> Entity:
        keys = {"name": f"{name} {label}", "state_topic": health, "value_template": _from_health(name, expr)}
        return Entity("sensor", f"{name}_{kind}", {**keys, **extra})

    total_p50 = "p.latency_ms.total.p50 if p.latency_ms.total is defined and p.latency_ms.total.p50 is not none else ''"
    return [
        sensor("model_version", "model version", "p.model_version", entity_category="diagnostic", icon="mdi:tag"),
        sensor("provider", "provider", "p.provider", entity_category="diagnostic", icon="mdi:chip"),
        sensor("fps", "results per second", "p.results_per_s", state_class="measurement", unit_of_measurement="/s"),
        sensor(
            "latency",
            "latency",
            f"({total_p50})",
            device_class="duration",
            state_class="measurement",
            unit_of_measurement="ms",
        ),
    ]


def entities(topics: Topics, pipelines: Iterable[PipelineConfig]) -> list[Entity]:
    """Every entity of this device, for the profile's enabled pipelines."""
    out = [
        Entity(
            "binary_sensor",
            "connection",
            {
                "name": "connection",
                "device_class": "connectivity",
                "entity_category": "diagnostic",
                "state_topic": topics.status,
                "value_template": "{{ 'ON' if value_json.state == 'online' else 'OFF' }}",
            },
            available_when_online=False,  # it shows the state that makes the others unavailable
        ),
        Entity(
            "sensor",
            "outbox",
            {
                "name": "outbox",
                "state_topic": topics.health,
                "value_template": "{{ (value_json.outbox | default({}, true)).depth | default('') }}",
                "state_class": "measurement",
                "unit_of_measurement": "messages",
                "entity_category": "diagnostic",
                "icon": "mdi:tray-full",
            },
        ),
    ]
    for pipeline in pipelines:
        if not pipeline.enabled:
            continue
        out += _pipeline_health(pipeline.name, topics.health)
        post = POST_ENTITIES.get(pipeline.postprocess.type)
        if post is not None:
            out.append(post(pipeline.name, topics.results(pipeline.name)))
    return out


def node_id(device: str) -> str:
    return _NOT_ID.sub("_", device)


def config_topic(prefix: str, device: str, entity: Entity) -> str:
    return f"{prefix}/{entity.component}/{node_id(device)}/{_NOT_ID.sub('_', entity.object_id)}/config"


def config_payload(entity: Entity, topics: Topics, agent_version: str) -> dict[str, Any]:
    """The discovery config of one entity: its keys, the device it belongs to, availability and origin."""
    node = node_id(topics.device)
    payload: dict[str, Any] = {
        **entity.config,
        "unique_id": f"edge_agent_{node}_{_NOT_ID.sub('_', entity.object_id)}",
        "device": {
            "identifiers": [f"edge_agent_{node}"],
            "name": topics.device,
            "manufacturer": ORIGIN_NAME,
            "model": "edge inference agent",
            "sw_version": agent_version,
        },
        "origin": {"name": ORIGIN_NAME, "sw_version": agent_version, "support_url": SUPPORT_URL},
        "qos": 1,
    }
    if entity.available_when_online:
        payload["availability"] = [{"topic": topics.status, "value_template": "{{ value_json.state }}"}]
    return payload


class HomeAssistantDiscovery:
    """Publishes this device's discovery configs over the daemon's connection and removes stale ones."""

    def __init__(
        self, config: HomeAssistantConfig, connection: Connection, agent_version: str, topics: Topics | None = None
    ) -> None:
        self.prefix = config.discovery_prefix
        self.connection = connection
        self.topics = topics or connection.topics
        self.agent_version = agent_version
        self._current: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    @property
    def subscription(self) -> str:
        """Every discovery config of this device, whichever component and entity."""
        return f"{self.prefix}/+/{node_id(self.topics.device)}/+/config"

    def start(self, pipelines: Iterable[PipelineConfig]) -> HomeAssistantDiscovery:
        # The configs first: what arrives on the subscription is then stale unless it is current.
        self.publish(pipelines)
        self.connection.subscribe(self.subscription, self._on_config, qos=1)
        return self

    def publish(self, pipelines: Iterable[PipelineConfig]) -> None:
        """Announce the entities of these pipelines, and remove those of the pipelines gone since the last call."""
        configs = {
            config_topic(self.prefix, self.topics.device, e): config_payload(e, self.topics, self.agent_version)
            for e in entities(self.topics, pipelines)
        }
        with self._lock:
            # Current before published: our own configs coming back on the subscription must not look stale.
            gone, self._current = self._current - configs.keys(), frozenset(configs)
        for topic, payload in configs.items():
            self.connection.publish_latest(topic, json.dumps(payload, separators=(",", ":")))
        for topic in sorted(gone):
            self._remove(topic)
        log.info("home assistant: %d entities announced, %d removed", len(configs), len(gone))

    def _on_config(self, message: Incoming) -> None:
        # On the network thread: one look and at most one publish (what the pump does there too).
        if message.payload and message.topic not in self._current:
            self._remove(message.topic)
            log.info("home assistant: removed %s, left by an earlier run", message.topic)

    def _remove(self, topic: str) -> None:
        # Empty and retained: Home Assistant removes the entity and the broker forgets the config.
        self.connection.publish_latest(topic, b"")
        log.debug("home assistant: removed %s", topic)
