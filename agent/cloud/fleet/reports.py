"""Which device reports count: those that verify against the key the inventory enrolled for the device.

Anything else is ignored and reported as a fleet event, with its kind:
- `report.unenrolled`: the device is not in the inventory, or the report is signed by a key that no
  enrolled device has (a new device not yet enrolled, or a key made by someone else);
- `report.forged`: the report is signed by another enrolled device's key, its signature does not verify
  over its text (altered), or it names another device than the topic it came on;
- `report.replayed`: (decided by the controller, which knows the orders) a report that answers an
  older order than the one the device was sent, arriving live (a retained report from before is just
  the device's last word on that order, not a replay), or one on the order it was sent stamped no later
  than the last one counted (agent.cloud.fleet.rollout);
- `report.unhandled`: (the controller) a report whose counting failed: that device's event, not an outage.

A reason goes to the log and the state file, and from there to `fleet rollout status`: what the report
chose in it (the device it names, the key id its signature claims) is quoted `printable`. A key id of
newlines and escape sequences once wrote lines of its own into the controller's log.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from agent.cloud.fleet.enrollment import Enrolled
from agent.cloud.fleet.inventory import SignedReport
from agent.models.signing import DEVICE_REPORT, SignatureError, verify
from agent.util.printable import printable

Problem = Literal["report.forged", "report.unenrolled", "report.replayed"]


@dataclass(frozen=True)
class Rejected:
    """A report that does not count, and why (the fleet event's type and one line)."""

    type: Problem
    device: str
    reason: str


class ReportChecker:
    """Checks reports against the inventory; built once per inventory version (key ids indexed)."""

    def __init__(self, enrolled: Mapping[str, Enrolled]) -> None:
        self.enrolled = enrolled
        self.owner = {e.key_id: e.device for e in enrolled.values()}

    def check(self, device: str, signed: SignedReport) -> Rejected | None:
        """None when the report counts; else why not."""
        claimed = signed.report.device
        if claimed != device:
            return Rejected("report.forged", device, f"a report on {device}'s topic names device '{_said(claimed)}'")
        entry = self.enrolled.get(device)
        if entry is None:
            return Rejected("report.unenrolled", device, f"device {device!r} is not enrolled in the inventory")
        kid = _key_id(signed.sig)
        if kid != entry.key_id:
            other = self.owner.get(kid or "")
            if other is not None:
                return Rejected("report.forged", device, f"report of {device} is signed by {other}'s key ({kid})")
            return Rejected(
                "report.unenrolled",
                device,
                f"report of {device} is signed by key {_said(kid)}, which no device enrolled",
            )
        try:
            verify({entry.key_id: entry.key}, signed.text, signed.sig, f"report of {device}", DEVICE_REPORT)
        except SignatureError as exc:
            return Rejected("report.forged", device, printable(str(exc)))
        return None


def _said(value: str | None) -> str:
    """A string the report chose, short (a key id is 16 hex digits, a device id a name) and `printable`."""
    return "none" if value is None else printable(value, 80)


def _key_id(signature: bytes) -> str | None:
    """The key that made a signature file's first signature (a device signs with one key)."""
    try:
        kid = json.loads(signature)["signatures"][0]["key"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return kid if isinstance(kid, str) else None
