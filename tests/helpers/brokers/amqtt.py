"""amqtt (Python, MQTT 3.1.1; the demo's embedded broker, from the cloud extra) in a child process."""

from __future__ import annotations

import sys
from importlib import metadata

from agent.cloud.demo.broker import amqtt_available
from tests.helpers.brokers.base import BrokerProcess


class Amqtt(BrokerProcess):
    name = "amqtt"
    mqtt5 = False

    @classmethod
    def missing(cls) -> str | None:
        return None if amqtt_available() else "amqtt is not installed (pip install 'edge-agent[cloud]')"

    @classmethod
    def version(cls) -> str:
        return metadata.version("amqtt")

    def command(self) -> list[str]:
        return [sys.executable, "-c", f"from agent.cloud.demo.broker import run_amqtt; run_amqtt({self.port})"]
