"""The fleet inventory: which devices are enrolled, and the public identity key of each.

A YAML file an operator keeps in git, one entry per device (`edge-agent fleet enroll` on the device
prints its entry; scripts/install.sh shows it at install):

    devices:
      "cam-01": {key: "ed25519:3q2+7w...=", group: "north"}
      "cam-02": {key: "ed25519:...", group: "north"}

`key` is the device's ed25519 public key (`agent.service.identity`); `group` is informational (the
group a device serves in is what it says in its status). The controller reads the file at start and
again when it changes, and counts a device's report only when it verifies against the key enrolled
for that device (`agent.cloud.fleet.reports`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.models.signing import key_id
from agent.service.identity import parse_public_text
from agent.util.names import NAME_PATTERN

_NAME = re.compile(NAME_PATTERN)
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader reads 10,000 entries in a blink


class EnrollmentError(ValueError):
    """An inventory file that cannot be used; the message names the file and the entry."""


@dataclass(frozen=True)
class Enrolled:
    device: str
    key: Ed25519PublicKey
    key_id: str
    group: str | None


def load_enrollment(path: Path) -> dict[str, Enrolled]:
    """Every enrolled device by id; EnrollmentError (one line) for a file that is not an inventory."""
    try:
        doc = yaml.load(path.read_bytes(), Loader=_SafeLoader)  # a safe loader, C or Python
    except OSError as exc:
        raise EnrollmentError(f"{path}: cannot read the inventory: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise EnrollmentError(f"{path}: not YAML: {str(exc).splitlines()[0]}") from None
    devices = doc.get("devices") if isinstance(doc, dict) else None
    if devices is None:
        devices = {}
    if not isinstance(devices, dict) or (isinstance(doc, dict) and set(doc) - {"devices"}):
        raise EnrollmentError(f"{path}: expected a mapping `devices: {{ID: {{key: ed25519:..., group: NAME}}}}`")
    out: dict[str, Enrolled] = {}
    for device, entry in devices.items():
        if not isinstance(device, str) or not _NAME.fullmatch(device):
            raise EnrollmentError(f"{path}: device {device!r} is not a device id")
        if not isinstance(entry, dict) or "key" not in entry or set(entry) - {"key", "group"}:
            raise EnrollmentError(f"{path}: devices.{device}: expected {{key: ed25519:..., group: NAME}}")
        try:
            key = parse_public_text(entry["key"])
        except ValueError as exc:
            raise EnrollmentError(f"{path}: devices.{device}.key: {exc}") from None
        group = entry.get("group")
        out[device] = Enrolled(device, key, key_id(key), group if isinstance(group, str) else None)
    return out
