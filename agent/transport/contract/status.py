"""The retained status on `<prefix>/<device>/status`: online on every connect, offline as the Last Will.

The group is in every status, the Will included, so that the fleet side finds a group's devices.
"""

from __future__ import annotations

from typing import Literal

from agent.transport.contract.base import Text, Timestamp, Wire


class StatusMessage(Wire):
    device: Text
    group: Text
    state: Literal["online", "offline"]
    ts: Timestamp | None = None  # absent from the Last Will: the broker sends it, later, as it was set
    protocol: Literal["5", "3.1.1"] | None = None  # online only
    client_id: str | None = None  # online only
    version: str | None = None  # the agent's version; online only
    reason: str | None = None  # offline only: "connection lost" (the Will) or "stopped"
