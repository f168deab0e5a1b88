"""Writing into a registry folder: every file replaced by rename, documents with their signature first.

A reader (a device, a CDN pulling from the folder) sees the old or the new bytes of a file, never a mix.
Each rewritten file also gets a later whole second than the one it replaces: nginx's ETag is the mtime
in seconds and the size, so a document rewritten within the second it was written, at the same size
(1.0.0 -> 1.1.0), would keep its ETag, and a device that polled in between would be told 304 until the
next change.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.models.signing import PayloadType, sign


def write_signed(path: Path, data: bytes, key: Ed25519PrivateKey, payload_type: PayloadType) -> None:
    """Document and signature (binding `payload_type`); the signature lands first so that a reader never sees
    new bytes with an old one for long (a device that catches the instant between the renames refuses, and
    retries at its next poll)."""
    sig = sign(key, data, payload_type)
    replace_file(path.with_name(path.name + ".sig"), sig)
    replace_file(path, data)


def replace_file(target: Path, content: bytes) -> None:
    """Write `target` by rename (a reader sees the old or the new bytes), in a later second than before."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(content)
    _later_second(tmp, target)
    os.replace(tmp, target)


def _later_second(new: Path, old: Path) -> None:
    """Give `new` an mtime in a later whole second than `old`'s (nginx's ETags, above)."""
    try:
        before = int(old.stat().st_mtime)
    except FileNotFoundError:
        return
    if int(new.stat().st_mtime) <= before:
        os.utime(new, (before + 1, before + 1))
