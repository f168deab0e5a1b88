"""Mosquitto (the broker every other test uses), under the same interface as the other brokers."""

from __future__ import annotations

import shutil
import subprocess

from tests.helpers.broker import Mosquitto as _Mosquitto
from tests.helpers.broker import mosquitto_binary
from tests.helpers.brokers.base import debian_version


class Mosquitto(_Mosquitto):
    name = "mosquitto"
    username: str | None = None
    password: str | None = None
    mqtt5 = True
    slow_start = False

    @classmethod
    def missing(cls) -> str | None:
        try:
            mosquitto_binary()
        except RuntimeError as exc:
            return str(exc)
        return None

    @classmethod
    def version(cls) -> str:
        found = debian_version("mosquitto")
        if found or shutil.which("mosquitto") is None:
            return found or "unknown"
        out = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True)
        return (out.stdout.splitlines() or ["unknown"])[0]
