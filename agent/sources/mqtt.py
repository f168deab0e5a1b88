"""Sensor values arriving on an MQTT topic of the agent's own broker."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from agent.configbase import Strict

KEY = "mqtt"


class Config(Strict):
    type: Literal["mqtt"]
    topic: str = Field(min_length=1, description="the topic filter to subscribe to")
    fields: tuple[str, ...] = Field(min_length=1, description="numeric fields of each JSON payload, in model input order")
