"""The demo's broker: Mosquitto when installed, else amqtt (the cloud extra) in a child process.

This module imports nothing heavy at the top: the amqtt child runs `run_amqtt` through `python -c`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Literal

from agent.cloud.demo import DemoError
from agent.cloud.demo.processes import LOCALHOST, spawn

BrokerChoice = Literal["auto", "mosquitto", "embedded"]
BROKER_CHOICES: tuple[BrokerChoice, ...] = ("auto", "mosquitto", "embedded")


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    for path in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto"):
        if os.access(path, os.X_OK):
            return path
    return None


def amqtt_available() -> bool:
    try:
        import amqtt.broker  # noqa: F401 (imported to see whether it can be)
    except Exception:  # noqa: BLE001 (missing, or broken by a dependency)
        return False
    return True


def start_broker(choice: BrokerChoice, port: int, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """The broker's process (listening soon on 127.0.0.1:port, logging to workdir/broker.log) and what it is."""
    binary = mosquitto_binary() if choice in ("auto", "mosquitto") else None
    if choice == "mosquitto" and binary is None:
        raise DemoError("--broker mosquitto: mosquitto is not installed (apt-get install mosquitto)")
    log = workdir / "broker.log"
    if binary is not None:
        conf = workdir / "mosquitto.conf"
        # As root Mosquitto switches to its own user, which clears the parent-death signal (and could not
        # write here): keep the user we are.
        user = "user root\n" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""
        conf.write_text(
            f"listener {port} {LOCALHOST}\nallow_anonymous true\npersistence false\n{user}"
            "log_dest stderr\nlog_type error\nlog_type warning\n"
        )
        return spawn([binary, "-c", str(conf)], log), f"Mosquitto ({binary})"
    if not amqtt_available():
        raise DemoError(
            "no MQTT broker: install Mosquitto (apt-get install mosquitto) or the embedded one "
            "(pip install 'edge-agent[cloud]', which brings amqtt)"
        )
    code = f"from {__name__} import run_amqtt; run_amqtt({port})"
    kind = "embedded amqtt (Mosquitto not found)" if choice == "auto" else "embedded amqtt"
    return spawn([sys.executable, "-c", code], log), kind


def run_amqtt(port: int) -> None:
    """The embedded broker (amqtt), for machines without Mosquitto: `python -c` runs this in a child."""
    import asyncio
    import logging

    from amqtt.broker import Broker

    logging.basicConfig(level=logging.WARNING)
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{LOCALHOST}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        broker = Broker(config)
        await broker.start()
        await stop.wait()
        await broker.shutdown()

    asyncio.run(main())
