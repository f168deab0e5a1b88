"""ed25519 signatures over exact bytes: good ones verify, and every failure says which kind it is."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from agent.models.signing import SignatureError, generate_keypair, load_private_key, load_public_keys, sign, verify

pytestmark = pytest.mark.arm64


def test_keygen_sign_verify(tmp_path: Path) -> None:
    private_path, public_path = generate_keypair(tmp_path)
    assert stat.S_IMODE(os.stat(private_path).st_mode) == 0o600
    private, keys = load_private_key(private_path), load_public_keys(public_path)
    data = b'{"model": "vad"}\n'
    kid = verify(keys, data, sign(private, data), "manifest.json")
    assert kid in keys and len(kid) == 16


def test_keygen_never_overwrites(tmp_path: Path) -> None:
    generate_keypair(tmp_path)
    with pytest.raises(FileExistsError, match="never overwritten"):
        generate_keypair(tmp_path)


def test_one_changed_byte_is_a_bad_signature(tmp_path: Path) -> None:
    private, public = generate_keypair(tmp_path)
    sig = sign(load_private_key(private), b"version 1.0.0")
    with pytest.raises(SignatureError, match=r"^bad signature on manifest.json \(key [0-9a-f]{16}\)$"):
        verify(load_public_keys(public), b"version 1.0.1", sig, "manifest.json")


def test_another_key_is_an_unknown_key(tmp_path: Path) -> None:
    _, public = generate_keypair(tmp_path / "a")
    other, _ = generate_keypair(tmp_path / "b")
    with pytest.raises(SignatureError, match=r"manifest.json is signed by unknown key [0-9a-f]{16}; trusted: "):
        verify(load_public_keys(public), b"data", sign(load_private_key(other), b"data"), "manifest.json")


def test_rotation_trusts_every_key_in_the_file(tmp_path: Path) -> None:
    old_priv, old_pub = generate_keypair(tmp_path / "old")
    new_priv, new_pub = generate_keypair(tmp_path / "new")
    both = tmp_path / "trusted.pub"
    both.write_bytes(old_pub.read_bytes() + new_pub.read_bytes())
    keys = load_public_keys(both)
    assert len(keys) == 2
    for private in (old_priv, new_priv):
        verify(keys, b"x", sign(load_private_key(private), b"x"), "doc")


@pytest.mark.parametrize(
    "sig,message",
    [
        (b"not json", "malformed"),
        (json.dumps({"alg": "rsa", "key": "k", "sig": ""}).encode(), "uses 'rsa'; only ed25519"),
        (json.dumps({"alg": "ed25519", "key": "k"}).encode(), "malformed"),
        (b"x" * 5000, "not a signature file"),
    ],
)
def test_malformed_signature_files(tmp_path: Path, sig: bytes, message: str) -> None:
    _, public = generate_keypair(tmp_path)
    with pytest.raises(SignatureError, match=message):
        verify(load_public_keys(public), b"x", sig, "doc")


def test_a_file_without_keys_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty.pub").write_text("nothing here\n")
    with pytest.raises(ValueError, match="no PEM public key"):
        load_public_keys(tmp_path / "empty.pub")
