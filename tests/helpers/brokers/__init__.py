"""Brokers for the compatibility suite (tests/test_brokers.py), one module each, all with Mosquitto's
interface (tests/helpers/broker.py): `url`, `start()`, `stop()`, `kill()`, `restart()`; plus `name`,
`version()`, `missing()` (why it cannot run here) and the credentials clients must present."""

from __future__ import annotations

from tests.helpers.brokers.amqtt import Amqtt
from tests.helpers.brokers.ejabberd import Ejabberd
from tests.helpers.brokers.mosquitto import Mosquitto
from tests.helpers.brokers.rabbitmq import RabbitMQ

BROKERS = {b.name: b for b in (Mosquitto, RabbitMQ, Ejabberd, Amqtt)}

__all__ = ["BROKERS", "Amqtt", "Ejabberd", "Mosquitto", "RabbitMQ"]
