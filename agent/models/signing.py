"""ed25519 signatures that bind what they sign: DSSE's pre-authentication encoding of a payload type.

A signature never covers the bare bytes of a document but PAE(type, data), the encoding of the DSSE
protocol (github.com/secure-systems-lab/dsse, protocol.md):

    PAE(type, data) = b"DSSEv1 " + LEN(type) + b" " + type + b" " + LEN(data) + b" " + data

LEN being the byte length in ASCII decimal. The lengths make the encoding injective, so a signature made
for a channel pointer never verifies as a manifest or a deployment order, whatever the bytes say: the
verifier always encodes the type it expects, never the one a document claims.

A signature file (`manifest.json.sig`, an order's `sig`, a report's `sig`) is one JSON object:

    {"type": TYPE, "signatures": [{"alg": "ed25519", "key": KEYID, "sig": BASE64}, ...]}

`type` names what was signed, for a readable refusal; several signatures serve a threshold (k of n
root keys, agent.models.trust). The key id is the first 16 hex digits of the sha256 of the raw public
key, so a device can say "signed by an unknown key" apart from "bad signature".
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.util import jsonlimits

MAX_SIG_BYTES = 16 * 1024  # room for a threshold of root signatures; anything larger is not a signature file

# Every signed kind, in one place: a signature binds one of these.
PayloadType = Literal[
    "application/vnd.edge-agent.channel+json",
    "application/vnd.edge-agent.manifest+json",
    "application/vnd.edge-agent.root+json",
    "application/vnd.edge-agent.order+json",
    "application/vnd.edge-agent.device-report+json",
]
CHANNEL: Final = "application/vnd.edge-agent.channel+json"
MANIFEST: Final = "application/vnd.edge-agent.manifest+json"
ROOT: Final = "application/vnd.edge-agent.root+json"  # the keys document: root keys and the online keys per role
ORDER: Final = "application/vnd.edge-agent.order+json"
DEVICE_REPORT: Final = "application/vnd.edge-agent.device-report+json"
KINDS: Final[dict[str, str]] = {
    CHANNEL: "channel pointer",
    MANIFEST: "manifest",
    ROOT: "root keys document",
    ORDER: "deployment order",
    DEVICE_REPORT: "device report",
}


class SignatureError(Exception):
    """A signature that does not verify; the message is the reason a device publishes."""


class Keyring(dict[str, Ed25519PublicKey]):
    """The keys trusted for one purpose, by key id; `retired` says why keys once trusted are no longer
    (revoked, expired), so that a refusal names the reason rather than "unknown key"."""

    def __init__(self, keys: Mapping[str, Ed25519PublicKey] | None = None, retired: Mapping[str, str] | None = None):
        super().__init__(keys or {})
        self.retired = dict(retired or {})


def pae(payload_type: str, data: bytes) -> bytes:
    """DSSE's pre-authentication encoding: the exact bytes a signature covers."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(data), data)


def key_id(public: Ed25519PublicKey) -> str:
    return hashlib.sha256(raw_public(public)).hexdigest()[:16]


def raw_public(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_from_raw(raw: bytes) -> Ed25519PublicKey:
    """ValueError unless `raw` is 32 bytes of an ed25519 public key."""
    return Ed25519PublicKey.from_public_bytes(raw)


def generate_keypair(out_dir: Path, name: str = "registry") -> tuple[Path, Path]:
    """Write NAME.key (private, mode 0600) and NAME.pub (PEM) into out_dir; refuse to overwrite."""
    out_dir.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise FileExistsError(f"{path} exists; keys are never overwritten")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path.write_bytes(public_pem(private.public_key()))
    return private_path, public_path


def public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except ValueError as exc:
        raise ValueError(f"{path}: not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an ed25519 private key")
    return key


def load_public_keys(path: Path) -> dict[str, Ed25519PublicKey]:
    """Every ed25519 public key in a PEM file, by key id."""
    text = Path(path).read_bytes()
    keys: dict[str, Ed25519PublicKey] = {}
    marker = b"-----END PUBLIC KEY-----"
    for block in text.split(marker)[:-1]:
        start = block.find(b"-----BEGIN PUBLIC KEY-----")
        if start < 0:
            continue
        try:
            key = serialization.load_pem_public_key(block[start:] + marker + b"\n")
        except ValueError as exc:
            raise ValueError(f"{path}: a PEM block is not a public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"{path}: holds a public key that is not ed25519")
        keys[key_id(key)] = key
    if not keys:
        raise ValueError(f"{path}: no PEM public key found")
    return keys


# ---- making signatures ------------------------------------------------------------------------------


def _one(private: Ed25519PrivateKey, data: bytes, payload_type: PayloadType) -> dict[str, str]:
    sig = private.sign(pae(payload_type, data))
    return {"alg": "ed25519", "key": key_id(private.public_key()), "sig": base64.b64encode(sig).decode()}


def _file(payload_type: str, signatures: Iterable[dict[str, str]]) -> bytes:
    return (json.dumps({"type": payload_type, "signatures": list(signatures)}, sort_keys=True) + "\n").encode()


def sign(private: Ed25519PrivateKey, data: bytes, payload_type: PayloadType) -> bytes:
    """The signature file's bytes for `data` of kind `payload_type`."""
    return _file(payload_type, [_one(private, data, payload_type)])


def add_signature(signature: bytes, private: Ed25519PrivateKey, data: bytes, payload_type: PayloadType) -> bytes:
    """`signature` (a signature file, possibly empty) with one more signature, by `private`, over the same
    data: how k root key holders sign one document, each on their own machine. A key that signed already
    signs again in place."""
    kept = _entries(signature, "the signature file", payload_type) if signature.strip() else []
    mine = _one(private, data, payload_type)
    return _file(payload_type, [s for s in kept if s["key"] != mine["key"]] + [mine])


# ---- checking them ----------------------------------------------------------------------------------


def _entries(signature: bytes, what: str, payload_type: PayloadType) -> list[dict[str, str]]:
    """The signatures of a signature file, shape-checked; SignatureError (one line) for anything else."""
    if len(signature) > MAX_SIG_BYTES:
        raise SignatureError(f"signature of {what} is {len(signature)} bytes; not a signature file")
    try:
        doc = jsonlimits.loads(signature, max_bytes=MAX_SIG_BYTES)
    except ValueError:
        raise SignatureError(f"signature of {what} is malformed") from None
    if isinstance(doc, dict) and "signatures" not in doc and {"alg", "key", "sig"} <= doc.keys():
        raise SignatureError(
            f"signature of {what} binds no payload type (made by an edge-agent before signed payload types); "
            "sign it again with this version (docs/trust.md)"
        )
    if not isinstance(doc, dict) or not isinstance(doc.get("signatures"), list) or not isinstance(doc.get("type"), str):
        raise SignatureError(f"signature of {what} is malformed")
    if doc["type"] != payload_type:
        claimed = KINDS.get(doc["type"], repr(doc["type"]))
        raise SignatureError(f"{what} is signed as a {claimed}, not as a {KINDS[payload_type]}")
    out: list[dict[str, str]] = []
    for entry in doc["signatures"]:
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("alg", "key", "sig")):
            raise SignatureError(f"signature of {what} is malformed")
        if entry["alg"] != "ed25519":
            raise SignatureError(f"signature of {what} uses {entry['alg']!r}; only ed25519 is accepted")
        out.append(entry)
    if not out:
        raise SignatureError(f"signature of {what} holds no signature")
    return out


def _valid(public: Ed25519PublicKey, entry: dict[str, str], data: bytes, payload_type: PayloadType) -> bool:
    try:
        public.verify(base64.b64decode(entry["sig"], validate=True), pae(payload_type, data))
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def _untrusted(keys: Mapping[str, Ed25519PublicKey], kid: str, what: str) -> SignatureError:
    trusted = ", ".join(sorted(keys)) or "none"
    reason = keys.retired.get(kid) if isinstance(keys, Keyring) else None
    if reason:
        return SignatureError(f"{what} is signed by key {kid}, {reason}; trusted: {trusted}")
    return SignatureError(f"{what} is signed by unknown key {kid}; trusted: {trusted}")


def verify(
    keys: Mapping[str, Ed25519PublicKey], data: bytes, signature: bytes, what: str, payload_type: PayloadType
) -> str:
    """Check `signature` (a signature file's bytes) over `data` of kind `payload_type`: one valid
    signature by a key in `keys`. Returns its key id, or raises SignatureError (one line)."""
    entries = _entries(signature, what, payload_type)
    mine = [e for e in entries if e["key"] in keys]
    if not mine:
        raise _untrusted(keys, entries[0]["key"], what)
    for entry in mine:
        if _valid(keys[entry["key"]], entry, data, payload_type):
            return entry["key"]
    raise SignatureError(f"bad signature on {what} (key {mine[0]['key']})")


def verify_threshold(
    keys: Mapping[str, Ed25519PublicKey],
    threshold: int,
    data: bytes,
    signature: bytes,
    what: str,
    payload_type: PayloadType,
    by: str = "",
) -> set[str]:
    """At least `threshold` valid signatures by distinct keys of `keys` (`by` names them in the refusal:
    "root version 3's keys"). Returns the key ids that signed validly."""
    entries = _entries(signature, what, payload_type)
    good = {e["key"] for e in entries if e["key"] in keys and _valid(keys[e["key"]], e, data, payload_type)}
    if len(good) < threshold:
        whose = by or "the trusted keys"
        raise SignatureError(
            f"{what} has {len(good)} valid signature(s) by {whose} ({', '.join(sorted(keys))}); {threshold} needed"
        )
    return good
