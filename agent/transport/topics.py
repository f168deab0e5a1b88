"""The MQTT topic tree, in one place: nothing else in the agent spells a topic.

```
<prefix>/<device>/status                 retained, online | offline (offline is the Last Will)
<prefix>/<device>/health                 retained, every health.interval and on change
<prefix>/<device>/<pipeline>/results     results, QoS 1 by default
<prefix>/<device>/events                 events
<prefix>/<device>/cmd/<name>             commands in
<prefix>/<device>/cmd/<name>/reply       replies out (unless the request names an MQTT 5 response topic)
<prefix>/<device>/deploy                 retained deployment order for this device
<prefix>/<device>/report                 retained, the device's signed report on the order it follows
<prefix>/fleet/<group>/deploy            retained deployment order for a group
```
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A topic level we build from a name: no wildcards, no separators, no NUL (MQTT 3.1.1 section 4.7).
_LEVEL = re.compile(r"^[^/#+\x00]+$")

# Levels under <prefix>/<device>/ that are not pipelines; a pipeline with one of these names would make
# `<prefix>/<device>/<name>/results` ambiguous with nothing today, but reserving them keeps the tree
# readable and leaves room.
RESERVED = frozenset({"status", "health", "events", "cmd", "deploy", "fleet"})


def check_level(value: str, what: str) -> str:
    if not value or not _LEVEL.match(value):
        raise ValueError(f"{what} {value!r} cannot be a topic level (empty, or contains '/', '+', '#' or NUL)")
    return value


@dataclass(frozen=True)
class Topics:
    """Every topic of one device. `prefix` may hold several levels (`site/edge`)."""

    prefix: str
    device: str
    group: str = "default"

    def __post_init__(self) -> None:
        for level in self.prefix.split("/"):
            check_level(level, "topic prefix level")
        check_level(self.device, "device id")
        check_level(self.group, "device group")

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.device}"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def health(self) -> str:
        return f"{self.base}/health"

    @property
    def events(self) -> str:
        return f"{self.base}/events"

    def results(self, pipeline: str) -> str:
        return f"{self.base}/{check_level(pipeline, 'pipeline name')}/results"

    def command(self, name: str) -> str:
        return f"{self.base}/cmd/{check_level(name, 'command name')}"

    def reply(self, name: str) -> str:
        return f"{self.command(name)}/reply"

    @property
    def commands(self) -> str:
        """The filter the agent subscribes to: one level under cmd/, so replies never loop back."""
        return f"{self.base}/cmd/+"

    def command_name(self, topic: str) -> str | None:
        """`name` from `<base>/cmd/<name>`, or None for any other topic."""
        head = f"{self.base}/cmd/"
        if not topic.startswith(head):
            return None
        rest = topic[len(head) :]
        return rest if rest and "/" not in rest else None

    @property
    def deploy(self) -> str:
        return f"{self.base}/deploy"

    @property
    def report(self) -> str:
        return f"{self.base}/report"

    @property
    def fleet_deploy(self) -> str:
        return f"{self.prefix}/fleet/{self.group}/deploy"
