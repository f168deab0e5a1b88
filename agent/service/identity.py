"""The device's own ed25519 identity key, and the signed deployment reports it makes.

The key is made once, at install (scripts/install.sh runs `edge-agent fleet enroll`) or at the first
start, in `<state_dir>/identity.key` (mode 0600), and never leaves the device: the fleet's inventory
holds its public half (`enrollment_entry`), and the rollout controller counts a device's report only
when it verifies against that key. A report names the order it answers (its nonce), so an old report
published again cannot pass for an answer to a new order.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.models.signing import DEVICE_REPORT, load_private_key, sign
from agent.transport.contract.report import DeviceReport, report_text, signed_payload

log = logging.getLogger(__name__)

KEY_FILE = "identity.key"
KEY_PREFIX = "ed25519:"  # how the inventory spells a public key: the prefix, then the raw 32 bytes in base64


def key_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / KEY_FILE


def load_or_create(state_dir: str | Path) -> Ed25519PrivateKey:
    """The device's identity key; made (0600, never overwritten) when there is none yet."""
    path = key_path(state_dir)
    if path.exists():
        return load_private_key(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # made by another process a moment ago (install.sh and a first start)
        return load_private_key(path)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    log.info("identity key made path=%s (enrol its public key: `edge-agent fleet enroll`)", path)
    return private


def public_text(public: Ed25519PublicKey) -> str:
    """`ed25519:<base64 of the raw key>`: one short line for the inventory."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KEY_PREFIX + base64.b64encode(raw).decode()


def parse_public_text(text: str) -> Ed25519PublicKey:
    """The key `public_text` wrote; ValueError (one line) for anything else."""
    if not isinstance(text, str) or not text.startswith(KEY_PREFIX):
        raise ValueError(f"expected {KEY_PREFIX}<base64 of 32 bytes>, got {str(text)[:40]!r}")
    try:
        raw = base64.b64decode(text[len(KEY_PREFIX) :], validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise ValueError(f"{text[:40]!r} is not an ed25519 public key (32 bytes in base64)") from None


def enrollment_entry(device: str, group: str, private: Ed25519PrivateKey) -> str:
    """The inventory lines that enrol this device (YAML, under `devices:`)."""
    key = public_text(private.public_key())
    return f"  {json.dumps(device)}: {{key: {json.dumps(key)}, group: {json.dumps(group)}}}\n"


def sign_report(private: Ed25519PrivateKey, report: DeviceReport) -> bytes:
    """The retained payload of a report: its exact text and the device's signature over it."""
    text = report_text(report)
    return signed_payload(text, sign(private, text, DEVICE_REPORT))
