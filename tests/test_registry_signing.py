"""ed25519 signatures over PAE(type, bytes): good ones verify, and every failure says which kind it is."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path
from typing import get_args

import pytest

from agent.models.signing import (
    CHANNEL,
    KINDS,
    MANIFEST,
    ORDER,
    ROOT,
    Keyring,
    PayloadType,
    SignatureError,
    add_signature,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_keys,
    pae,
    sign,
    verify,
    verify_threshold,
)

pytestmark = pytest.mark.arm64


def test_pae_is_the_dsse_encoding() -> None:
    # The test vector of DSSE's protocol.md.
    assert (
        pae("http://example.com/HelloWorld", b"hello world")
        == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )
    assert pae("t", b"") == b"DSSEv1 1 t 0 "
    assert pae("é", b"x") == "DSSEv1 2 é 1 x".encode()  # LEN counts bytes, not characters


def test_every_payload_type_has_a_kind_name() -> None:
    assert tuple(KINDS) == get_args(PayloadType)


def test_keygen_sign_verify(tmp_path: Path) -> None:
    private_path, public_path = generate_keypair(tmp_path)
    assert stat.S_IMODE(os.stat(private_path).st_mode) == 0o600
    private, keys = load_private_key(private_path), load_public_keys(public_path)
    data = b'{"model": "vad"}\n'
    sig = sign(private, data, MANIFEST)
    doc = json.loads(sig)
    assert doc["type"] == MANIFEST and [s["alg"] for s in doc["signatures"]] == ["ed25519"]
    # The signature covers PAE(type, data), not the bare bytes.
    raw = base64.b64decode(doc["signatures"][0]["sig"])
    keys[key_id(private.public_key())].verify(raw, pae(MANIFEST, data))
    kid = verify(keys, data, sig, "manifest.json", MANIFEST)
    assert kid in keys and len(kid) == 16


def test_keygen_never_overwrites(tmp_path: Path) -> None:
    generate_keypair(tmp_path)
    with pytest.raises(FileExistsError, match="never overwritten"):
        generate_keypair(tmp_path)


def test_one_changed_byte_is_a_bad_signature(tmp_path: Path) -> None:
    private, public = generate_keypair(tmp_path)
    sig = sign(load_private_key(private), b"version 1.0.0", MANIFEST)
    with pytest.raises(SignatureError, match=r"^bad signature on manifest.json \(key [0-9a-f]{16}\)$"):
        verify(load_public_keys(public), b"version 1.0.1", sig, "manifest.json", MANIFEST)


def test_another_key_is_an_unknown_key(tmp_path: Path) -> None:
    _, public = generate_keypair(tmp_path / "a")
    other, _ = generate_keypair(tmp_path / "b")
    with pytest.raises(SignatureError, match=r"manifest.json is signed by unknown key [0-9a-f]{16}; trusted: "):
        verify(
            load_public_keys(public),
            b"data",
            sign(load_private_key(other), b"data", MANIFEST),
            "manifest.json",
            MANIFEST,
        )


def test_a_retired_key_is_refused_with_its_reason(tmp_path: Path) -> None:
    private, public = generate_keypair(tmp_path)
    (kid,) = load_public_keys(public)
    ring = Keyring({}, {kid: "revoked by root version 2"})
    with pytest.raises(
        SignatureError, match=rf"^doc is signed by key {kid}, revoked by root version 2; trusted: none$"
    ):
        verify(ring, b"x", sign(load_private_key(private), b"x", ORDER), "doc", ORDER)


def test_a_signature_of_one_kind_never_verifies_as_another(tmp_path: Path) -> None:
    private, public = generate_keypair(tmp_path)
    keys, key = load_public_keys(public), load_private_key(private)
    pointer = b'{"model": "m", "version": "1.0.0"}'
    sig = sign(key, pointer, CHANNEL)
    with pytest.raises(SignatureError, match=r"^m.json is signed as a channel pointer, not as a manifest$"):
        verify(keys, pointer, sig, "m.json", MANIFEST)
    # Relabelled, it still fails: the signature covers the type it was made for.
    relabelled = json.dumps({**json.loads(sig), "type": MANIFEST}).encode()
    with pytest.raises(SignatureError, match=r"^bad signature on m.json \(key "):
        verify(keys, pointer, relabelled, "m.json", MANIFEST)


def test_rotation_trusts_every_key_in_the_file(tmp_path: Path) -> None:
    old_priv, old_pub = generate_keypair(tmp_path / "old")
    new_priv, new_pub = generate_keypair(tmp_path / "new")
    both = tmp_path / "trusted.pub"
    both.write_bytes(old_pub.read_bytes() + new_pub.read_bytes())
    keys = load_public_keys(both)
    assert len(keys) == 2
    for private in (old_priv, new_priv):
        verify(keys, b"x", sign(load_private_key(private), b"x", MANIFEST), "doc", MANIFEST)


def test_a_threshold_counts_distinct_valid_signatures(tmp_path: Path) -> None:
    pairs = [generate_keypair(tmp_path / str(i)) for i in range(3)]
    privates = [load_private_key(p) for p, _ in pairs]
    keys = {k: v for _, pub in pairs for k, v in load_public_keys(pub).items()}
    data = b'{"version": 2}'
    sig = b""
    for private in privates[:2]:
        sig = add_signature(sig, private, data, ROOT)
    sig = add_signature(sig, privates[0], data, ROOT)  # signing twice counts once
    assert len(json.loads(sig)["signatures"]) == 2
    assert len(verify_threshold(keys, 2, data, sig, "keys/2.root.json", ROOT)) == 2
    with pytest.raises(
        SignatureError, match=r"^keys/2.root.json has 2 valid signature\(s\) by root v1 \(.*\); 3 needed$"
    ):
        verify_threshold(keys, 3, data, sig, "keys/2.root.json", ROOT, by="root v1")


@pytest.mark.parametrize(
    "sig,message",
    [
        (b"not json", "malformed"),
        (
            json.dumps({"type": MANIFEST, "signatures": [{"alg": "rsa", "key": "k", "sig": ""}]}).encode(),
            "uses 'rsa'; only ed25519",
        ),
        (json.dumps({"type": MANIFEST, "signatures": [{"alg": "ed25519", "key": "k"}]}).encode(), "malformed"),
        (json.dumps({"type": MANIFEST, "signatures": []}).encode(), "holds no signature"),
        (json.dumps({"alg": "ed25519", "key": "k", "sig": "AAAA"}).encode(), "binds no payload type"),
        (b"x" * 20000, "not a signature file"),
    ],
)
def test_malformed_signature_files(tmp_path: Path, sig: bytes, message: str) -> None:
    _, public = generate_keypair(tmp_path)
    with pytest.raises(SignatureError, match=message):
        verify(load_public_keys(public), b"x", sig, "doc", MANIFEST)


def test_a_file_without_keys_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty.pub").write_text("nothing here\n")
    with pytest.raises(ValueError, match="no PEM public key"):
        load_public_keys(tmp_path / "empty.pub")
