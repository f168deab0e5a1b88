"""The profile's `homeassistant` section: Home Assistant MQTT discovery, off by default."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.config.base import Field, Strict

if TYPE_CHECKING:
    from agent.config.checks import Problem

# A topic without wildcards or spaces; may hold several levels (HA's own option allows that too).
DISCOVERY_PREFIX_PATTERN = r"^[^#+\s]+$"


@dataclass(frozen=True, kw_only=True)
class HomeAssistantConfig(Strict):
    enabled: bool = Field(
        False,
        description="publish Home Assistant MQTT discovery configs (retained): this device, its state, "
        "models and outbox, and an entity per pipeline",
    )
    discovery_prefix: str = Field(
        "homeassistant",
        pattern=DISCOVERY_PREFIX_PATTERN,
        description="the discovery prefix set in Home Assistant's MQTT options",
    )


def homeassistant_problems(data: dict[str, Any]) -> list[Problem]:
    """Discovery goes over the agent's own broker connection."""
    section = data.get("homeassistant")
    if isinstance(section, dict) and section.get("enabled") is True and not data.get("mqtt"):
        return [
            (
                ("homeassistant", "enabled"),
                "Home Assistant discovery is published over MQTT: add the mqtt section (the broker Home "
                "Assistant reads)",
            )
        ]
    return []
