"""RabbitMQ with its MQTT plugin (MQTT 3.1.1 in 3.10): a private node in a temporary folder.

The node has its own name, data, logs, config and ports, and its own epmd on a free port
(`ERL_EPMD_PORT`), so it neither meets a RabbitMQ already running on this machine (5672, 25672, epmd on
4369) nor leaves an epmd behind. The AMQP listener is off; only MQTT listens, on loopback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.helpers.broker import free_port, wait_port
from tests.helpers.brokers.base import STOP_TIMEOUT, BrokerProcess, debian_version

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
PLUGINS = "/usr/lib/rabbitmq/lib"


class RabbitMQ(BrokerProcess):
    name = "rabbitmq"
    mqtt5 = False
    slow_start = True  # ~10 s: its MQTT plugin waits for cluster peers before it listens
    # RabbitMQ's default user, allowed from loopback only: what a first install offers.
    username = "guest"
    password = "guest"

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        super().__init__(workdir, port)
        self.epmd_port = free_port()
        self.dist_port = free_port()
        self.node = f"edge{self.port}@localhost"
        self._epmd: subprocess.Popen[bytes] | None = None

    @classmethod
    def missing(cls) -> str | None:
        if not os.access(SERVER, os.X_OK) or shutil.which("epmd") is None:
            return "rabbitmq-server is not installed (scripts/test.sh installs it with apt-get)"
        if not any(p.name.startswith("rabbitmq_mqtt-") for p in Path(PLUGINS).glob("rabbitmq_server-*/plugins/*")):
            return "rabbitmq-server has no rabbitmq_mqtt plugin"
        return None

    @classmethod
    def version(cls) -> str:
        return debian_version("rabbitmq-server") or "unknown"

    def prepare(self) -> None:
        (self.workdir / "rabbitmq.conf").write_text(
            "listeners.tcp = none\n"
            f"mqtt.listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            "mqtt.allow_anonymous = false\n"
            "log.console = false\n"
            "log.file.level = warning\n"
        )
        (self.workdir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        if self._epmd is None or self._epmd.poll() is not None:
            self._epmd = subprocess.Popen(
                ["epmd", "-port", str(self.epmd_port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            wait_port(self.epmd_port)

    def command(self) -> list[str]:
        return [SERVER]

    def environment(self) -> dict[str, str]:
        d = str(self.workdir)
        return {
            "HOME": d,  # the Erlang cookie
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": f"{d}/mnesia",
            "RABBITMQ_LOG_BASE": f"{d}/log",
            "RABBITMQ_CONFIG_FILE": f"{d}/rabbitmq.conf",
            "RABBITMQ_ENABLED_PLUGINS_FILE": f"{d}/enabled_plugins",
            "RABBITMQ_CONF_ENV_FILE": f"{d}/rabbitmq-env.conf",  # absent: not the system's
            "RABBITMQ_ADVANCED_CONFIG_FILE": f"{d}/advanced.config",  # absent
            "RABBITMQ_PID_FILE": f"{d}/rabbitmq.pid",
        }

    def stop(self) -> None:
        super().stop()
        epmd, self._epmd = self._epmd, None
        if epmd is not None and epmd.poll() is None:
            epmd.kill()
            epmd.wait(STOP_TIMEOUT)
