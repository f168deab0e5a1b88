"""The manifest and channel pointer are parsed strictly: every bad field is refused with its name."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.models.manifest import ManifestError, parse_channel, parse_manifest, version_key

pytestmark = pytest.mark.arm64

DIGEST = "sha256:" + "ab" * 32


def manifest(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema": 1,
        "model": "text-detector",
        "version": "1.4.0",
        "created": "2026-11-25T10:00:00Z",
        "expires": "2027-11-25T10:00:00Z",
        "variants": [
            {
                "id": "fp32",
                "blob": {"digest": DIGEST, "size": 4745517},
                "format": "onnx",
                "ir_version": 8,
                "opsets": {"ai.onnx": 12},
                "inputs": [{"name": "x", "type": "float32", "shape": ["N", 3, None, None]}],
                "outputs": [{"name": "y", "type": "float32", "shape": ["N", 1, None, None]}],
                "precision": "fp32",
                "providers": [],
                "architectures": [],
                "min_runtime": "1.10",
            }
        ],
        "tests": [
            {
                "name": "fp32-0",
                "variant": "fp32",
                "inputs": {"digest": DIGEST, "size": 10},
                "expected": {"digest": DIGEST, "size": 10},
                "rtol": 0.001,
                "atol": 0.001,
            }
        ],
        "metadata": {},
    }
    doc.update(changes)
    return doc


def variant(**changes: Any) -> dict[str, Any]:
    v = dict(manifest()["variants"][0])
    v.update(changes)
    return v


def parse(doc: dict[str, Any]) -> Any:
    return parse_manifest(json.dumps(doc).encode(), "manifest.json")


def test_a_good_manifest_round_trips() -> None:
    m = parse(manifest())
    assert m.model == "text-detector" and m.variants[0].opsets == {"ai.onnx": 12}
    assert m.variants[0].inputs[0].shape == ("N", 3, None, None) and m.tests_for("fp32")[0].atol == 0.001
    assert parse_manifest(m.to_bytes()) == m
    assert m.to_bytes() == parse_manifest(m.to_bytes()).to_bytes()


@pytest.mark.parametrize(
    "doc,message",
    [
        (manifest(extra=1), "manifest.json: extra: Extra inputs are not permitted"),
        (manifest(version="../../etc"), "manifest.json: version: '../../etc' is not a safe name"),
        (manifest(model="a/b"), "manifest.json: model: 'a/b' is not a safe name"),
        (manifest(model=".hidden"), "is not a safe name"),
        (manifest(version="pointer.json"), "reserved name"),
        (manifest(variants=[]), "variants: Tuple should have at least 1 item"),
        (manifest(variants=[variant(ir_version="8")]), "variants[0].ir_version: Input should be a valid integer"),
        (
            manifest(variants=[variant(blob={"digest": "md5:abc", "size": 1})]),
            "variants[0].blob.digest: 'md5:abc' is not a sha256",
        ),
        (manifest(variants=[variant(blob={"digest": DIGEST, "size": -1})]), "variants[0].blob.size"),
        (manifest(variants=[variant(id="../x")]), "variants[0].id: '../x' is not a safe name"),
        (manifest(variants=[variant(format="tflite")]), "variants[0].format"),
        (manifest(variants=[variant(precision="fp8")]), "variants[0].precision"),
        (manifest(variants=[variant(), variant()]), "variant id 'fp32' appears twice"),
        (
            manifest(
                tests=[
                    {
                        "name": "t",
                        "variant": "int8",
                        "inputs": {"digest": DIGEST, "size": 1},
                        "expected": {"digest": DIGEST, "size": 1},
                        "rtol": 0,
                        "atol": 0,
                    }
                ]
            ),
            "for variant 'int8', which the manifest does not have",
        ),
        (manifest(expires="2026-01-01T00:00:00Z"), "expires is not after created"),
        (manifest(created="2026-11-25T10:00:00"), "created: Input should have timezone info"),
        (manifest(schema=2), "schema: Input should be 1"),
    ],
)
def test_bad_manifests_are_refused_with_the_field_named(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ManifestError, match=None) as info:
        parse(doc)
    assert message in str(info.value)


def test_not_json_and_oversized_documents() -> None:
    with pytest.raises(ManifestError, match="Invalid JSON"):
        parse_manifest(b"{not json")
    with pytest.raises(ManifestError, match="larger than"):
        parse_manifest(b" " * (2 << 20))


def test_channel_pointer() -> None:
    good = {
        "model": "vad",
        "channel": "stable",
        "version": "6.2.3",
        "updated": "2026-11-25T10:00:00Z",
        "expires": "2027-11-25T10:00:00Z",
    }
    assert parse_channel(json.dumps(good).encode()).version == "6.2.3"
    with pytest.raises(ManifestError, match="version: '../../../etc/passwd' is not a safe name"):
        parse_channel(json.dumps({**good, "version": "../../../etc/passwd"}).encode(), "channel")


@pytest.mark.parametrize(
    "older,newer",
    [
        ("1.9.2", "1.10.0"),
        ("1.0.0-rc1", "1.0.0"),
        ("1.0.0-rc1", "1.0.0-rc2"),
        ("2026.2.1", "2026.11.25"),
        ("1.0", "1.0.1"),
        ("1.0.0+build5", "1.0.1"),
    ],
)
def test_version_order(older: str, newer: str) -> None:
    assert version_key(older) < version_key(newer)
