"""The profile's named checks: across sections, URLs, topic words; several located problems at once.

A check across fields reports each problem with its key path, so that `edge-agent check` prints
`FILE:LINE: key.path: message` for every one of them in a single run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from agent.config.homeassistant import homeassistant_problems
from agent.config.presets import LONGEST_COMMAND, PRESETS, BrokerPreset
from agent.config.units import parse_duration
from agent.transport.topics import RESERVED, Topics

Problem = tuple[tuple[str | int, ...], str]  # (key path relative to the object checked, message)

# The same refusal in the JSON Schema, so that an editor flags what `edge-agent check` refuses.
NOT_RESERVED_SCHEMA: dict[str, Any] = {"not": {"enum": [*sorted(RESERVED)]}}


def not_reserved(value: str, what: str) -> str:
    """`value` unless it is a topic level the agent uses itself."""
    # A device named `fleet` would own `<prefix>/fleet/...`, the group deployment topics (and the ACL's
    # admin user); a pipeline named `cmd` would publish its results as a command to its own device.
    if value in RESERVED:
        words = ", ".join(sorted(RESERVED))
        raise ValueError(f"{value!r} is a topic level the agent itself uses ({words}); choose another {what}")
    return value


def check_url(value: str, schemes: tuple[str, ...], expected: str) -> str:
    """`value` if it is a URL with one of `schemes`, a host, and a port (when given) that is a number."""
    parts = urlsplit(value)
    if parts.scheme not in schemes or not parts.hostname:
        raise ValueError(f"expected {expected}, got {value!r}")
    try:
        _ = parts.port  # urlsplit checks the port only when it is read
    except ValueError:
        raise ValueError(f"the port in {value!r} is not a number from 1 to 65535") from None
    return value


def looks_like_path(model: str) -> bool:
    """A pipeline's model names a file (rather than a registry model)."""
    return model.endswith((".onnx", ".ort")) or os.sep in model or model.startswith(".")


def cross_field_problems(data: dict[str, Any]) -> list[Problem]:
    """Checks across sections, on the raw document so that they are reported beside field errors."""
    problems: list[Problem] = []
    pipelines = data.get("pipelines")
    seen: set[str] = set()
    for i, pipeline in enumerate(pipelines if isinstance(pipelines, list) else []):
        if not isinstance(pipeline, dict):
            continue
        name, model, source = pipeline.get("name"), pipeline.get("model"), pipeline.get("source")
        if isinstance(name, str):
            if name in seen:
                problems.append((("pipelines", i, "name"), f"two pipelines are named {name!r}; names must be unique"))
            seen.add(name)
        if isinstance(model, str) and model and not looks_like_path(model) and not data.get("registry"):
            problems.append(
                (
                    ("pipelines", i, "model"),
                    f"pipeline {name!r}: model {model!r} is a registry name, but the profile has no registry section "
                    "(give a path to an .onnx file, or add registry)",
                )
            )
        if isinstance(source, dict) and source.get("type") == "mqtt" and not data.get("mqtt"):
            problems.append((("pipelines", i, "source"), f"pipeline {name!r}: an mqtt source needs the mqtt section"))
    return problems + preset_problems(data) + homeassistant_problems(data)


# AWS IoT thing names (the client id there): https://docs.aws.amazon.com/iot/latest/apireference/API_CreateThing.html
_THING_NAME = re.compile(r"^[a-zA-Z0-9:_-]{1,128}$")


def preset_problems(data: dict[str, Any]) -> list[Problem]:
    """What a profile asks of a managed broker (`mqtt.preset`) that the broker does not allow."""
    mqtt, device = data.get("mqtt"), data.get("device")
    if not isinstance(mqtt, dict) or not isinstance(mqtt.get("preset"), str) or mqtt["preset"] not in PRESETS:
        return []  # no preset, or one that is not known (a field error)
    preset = PRESETS[mqtt["preset"]]
    device = device if isinstance(device, dict) else {}
    title = preset.title
    problems: list[Problem] = []
    url = mqtt.get("url")
    if preset.tls_only and isinstance(url, str) and not url.startswith("mqtts://"):
        problems.append((("mqtt", "url"), f"{title} takes TLS connections only: use mqtts://"))
    low, high = preset.keepalive
    try:
        keepalive = parse_duration(mqtt.get("keepalive", 60))
    except ValueError:
        keepalive = None  # reported as a field error
    if keepalive is not None and not low <= keepalive <= high:
        problems.append((("mqtt", "keepalive"), f"{title} takes a keepalive from {low:g}s to {high:g}s"))
    if preset.credentials and not mqtt.get("username"):
        problems.append((("mqtt", "username"), f"{title} allows no anonymous clients: set username and a password"))
    device_id, client_id = device.get("id"), mqtt.get("client_id")
    if preset.client_id_is_device_id and isinstance(device_id, str):
        if client_id is not None and client_id != device_id:
            problems.append(
                (
                    ("mqtt", "client_id"),
                    f"{title}: the client id must be the thing name, which is this device's id ({device_id!r}); "
                    "leave client_id unset",
                )
            )
        elif not _THING_NAME.match(device_id):
            problems.append(
                (("device", "id"), f"{title}: a thing name takes letters, digits, ':', '_' and '-' (no '.')")
            )
    return problems + _topic_problems(preset, data, mqtt, device)


def _topic_problems(
    preset: BrokerPreset, data: dict[str, Any], mqtt: dict[str, Any], device: dict[str, Any]
) -> list[Problem]:
    """Every topic the agent would use, against the preset's depth and length (each reported once, where
    the profile can shorten it)."""
    prefix, device_id, group = mqtt.get("topic_prefix", "edge"), device.get("id"), device.get("group", "default")
    if not (isinstance(prefix, str) and isinstance(device_id, str) and isinstance(group, str)):
        return []  # reported as field errors
    try:
        topics = Topics(prefix, device_id, group)
    except ValueError:
        return []  # reported as field errors
    candidates: list[tuple[tuple[str | int, ...], str]] = [
        (("mqtt", "topic_prefix"), topics.reply(LONGEST_COMMAND)),
        (("device", "group"), topics.fleet_deploy),
    ]
    pipelines = data.get("pipelines")
    for i, pipeline in enumerate(pipelines if isinstance(pipelines, list) else []):
        name = pipeline.get("name") if isinstance(pipeline, dict) else None
        if isinstance(name, str) and name:
            try:
                candidates.append((("pipelines", i, "name"), topics.results(name)))
            except ValueError:
                continue  # reported as a field error
    problems: list[Problem] = []
    slashes, size = preset.max_topic_slashes, preset.max_topic_bytes
    for where, topic in candidates:
        if slashes is not None and topic.count("/") > slashes:
            problems.append(
                (where, f"{preset.title} allows {slashes} '/' in a topic; {topic!r} has {topic.count('/')}")
            )
        elif size is not None and len(topic.encode()) > size:
            problems.append(
                (where, f"{preset.title} allows topics of {size} bytes; {topic!r} has {len(topic.encode())}")
            )
    return problems


class ProblemsError(ValueError):
    """Several located problems found by one check (paths relative to the object checked), raised as one
    error: `edge-agent check` reports each at its own key."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(message for _, message in self.problems))


def raise_problems(problems: Sequence[Problem]) -> None:
    """One validation error carrying several located problems (paths relative to the object checked)."""
    if problems:
        raise ProblemsError(problems)
