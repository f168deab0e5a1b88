"""ed25519 signatures over the exact bytes of registry documents (manifests and channel pointers).

A signature file (`manifest.json.sig`) is one JSON object: {"alg": "ed25519", "key": KEYID, "sig":
BASE64}. The key id is the first 16 hex digits of the sha256 of the raw public key, so a device can say
"signed by an unknown key" apart from "bad signature", and a registry can rotate keys: a public key file
may hold several PEM keys, all trusted.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

MAX_SIG_BYTES = 4096


class SignatureError(Exception):
    """A signature that does not verify; the message is the reason a device publishes."""


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


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


def sign(private: Ed25519PrivateKey, data: bytes) -> bytes:
    """The signature file's bytes for `data`."""
    doc = {"alg": "ed25519", "key": key_id(private.public_key()), "sig": base64.b64encode(private.sign(data)).decode()}
    return (json.dumps(doc, sort_keys=True) + "\n").encode()


def verify(keys: dict[str, Ed25519PublicKey], data: bytes, signature: bytes, what: str) -> str:
    """Check `signature` (a signature file's bytes) over `data`; return the key id, or raise SignatureError."""
    if len(signature) > MAX_SIG_BYTES:
        raise SignatureError(f"signature of {what} is {len(signature)} bytes; not a signature file")
    try:
        doc = json.loads(signature)
        alg, kid, sig = doc["alg"], doc["key"], base64.b64decode(doc["sig"], validate=True)
    except (ValueError, KeyError, TypeError):
        raise SignatureError(f"signature of {what} is malformed") from None
    if alg != "ed25519":
        raise SignatureError(f"signature of {what} uses {alg!r}; only ed25519 is accepted")
    if not isinstance(kid, str) or kid not in keys:
        raise SignatureError(f"{what} is signed by unknown key {kid}; trusted: {', '.join(sorted(keys))}")
    try:
        keys[kid].verify(sig, data)
    except InvalidSignature:
        raise SignatureError(f"bad signature on {what} (key {kid})") from None
    return kid
