"""The opset-compatibility manifest and the channel pointer: typed, parsed strictly, immutable.

A manifest is only parsed after its signature has been checked over the exact bytes, but it is still
parsed as hostile input: unknown keys, wrong types, names that could climb out of a folder
(`../`), digests that are not sha256 and sizes beyond reason are all refused with the field named.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.util.hashing import sha256_file
from agent.util.names import NAME_PATTERN, VERSION_PATTERN

SCHEMA: Final = 1  # Final: mypy reads it as Literal[1], the type of the field it fills
# Versions name folders on the device: no separators, no leading dot, so never `..` (agent.util.names).
DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"
MAX_BLOB_BYTES = 1 << 40
MAX_DOC_BYTES = 1 << 20  # manifests and channel pointers; anything larger is refused unread
RESERVED_VERSIONS = {"pointer.json", "lock"}


class ManifestError(ValueError):
    """A manifest or channel pointer that cannot be trusted; the message names the field."""


class StrictDoc(BaseModel):
    """A signed document's shape: unknown keys, wrong types and changes after parsing are all refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)


class Blob(StrictDoc):
    digest: str = Field(pattern=DIGEST_PATTERN, description="sha256:<hex> of the file")
    size: int = Field(ge=0, le=MAX_BLOB_BYTES, description="exact size in bytes")

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]


def file_digest(path: Path | str) -> str:
    """A file's digest as manifests and the store write it: `sha256:<hex>`."""
    return "sha256:" + sha256_file(path)


class TensorSpec(StrictDoc):
    name: str = Field(min_length=1, max_length=512)
    type: str = Field(min_length=1, max_length=32, description="float32, int64, ...")
    shape: tuple[int | str | None, ...] | None = Field(None, description="dims; a string or null is dynamic")


PLATFORM_PATTERN = r"^[a-z0-9]{1,16}-[a-z0-9_]{1,16}$"  # linux-x86_64, linux-aarch64


class CustomOpLibrary(StrictDoc):
    """A custom-op library a variant needs, for one platform: a blob like the model's, and what it provides."""

    blob: Blob
    platform: str = Field(pattern=PLATFORM_PATTERN, description="os-architecture it is built for: linux-x86_64")
    domains: dict[str, int] = Field(
        min_length=1, max_length=64, description="custom domain -> highest opset version it provides"
    )
    min_runtime: str | None = Field(None, pattern=r"^\d+(\.\d+)*$", description="oldest onnxruntime that loads it")

    @model_validator(mode="after")
    def _check(self) -> CustomOpLibrary:
        for domain, version in self.domains.items():
            if not 0 < len(domain) <= 128 or not 1 <= version <= 1000:
                raise ValueError(f"domain {domain[:128]!r} opset {version}: expected a name and a version 1 to 1000")
        return self


class Variant(StrictDoc):
    id: str = Field(pattern=NAME_PATTERN, description="fp32, fp16, int8, op15, ...")
    blob: Blob
    format: Literal["onnx", "ort"] = "onnx"
    ir_version: int = Field(ge=1, le=1000)
    opsets: dict[str, int] = Field(min_length=1, description="domain -> opset version; ai.onnx for the default domain")
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    accuracy_loss: float | None = Field(
        None,
        ge=0,
        le=1,
        description="accuracy this variant loses against the reference one, as a fraction, measured by the "
        "publisher; a device prefers an int8 variant only when this is within its registry.max_accuracy_loss",
    )
    providers: tuple[str, ...] = Field((), description="providers this variant suits; empty: any")
    architectures: tuple[str, ...] = Field((), description="machine architectures (x86_64, aarch64); empty: any")
    min_runtime: str | None = Field(None, pattern=r"^\d+(\.\d+)*$", description="oldest onnxruntime that loads it")
    # None rather than empty: manifests without libraries keep the bytes (and keys) older agents parse.
    custom_ops: tuple[CustomOpLibrary, ...] | None = Field(
        None, max_length=16, description="custom-op libraries it needs, one per platform"
    )

    @model_validator(mode="after")
    def _one_per_platform(self) -> Variant:
        platforms = [lib.platform for lib in self.custom_ops or ()]
        dup = {p for p in platforms if platforms.count(p) > 1}
        if dup:
            raise ValueError(f"variant {self.id}: two custom-op libraries for {sorted(dup)[0]}")
        return self


class TestVector(StrictDoc):
    name: str = Field(pattern=NAME_PATTERN)
    variant: str = Field(pattern=NAME_PATTERN)
    inputs: Blob = Field(description=".npz of named input tensors")
    expected: Blob = Field(description=".npz of named expected outputs")
    rtol: float = Field(ge=0)
    atol: float = Field(ge=0)


class Manifest(StrictDoc):
    schema_version: Literal[1] = Field(SCHEMA, alias="schema")
    model: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=VERSION_PATTERN)
    created: AwareDatetime
    expires: AwareDatetime
    variants: tuple[Variant, ...] = Field(min_length=1, description="best first")
    tests: tuple[TestVector, ...] = ()
    labels: Blob | None = None
    metadata: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> Manifest:
        ids = [v.id for v in self.variants]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise ValueError(f"variant id {sorted(dup)[0]!r} appears twice")
        for t in self.tests:
            if t.variant not in ids:
                raise ValueError(f"test {t.name!r} is for variant {t.variant!r}, which the manifest does not have")
        if self.expires <= self.created:
            raise ValueError("expires is not after created")
        if self.version in RESERVED_VERSIONS:
            raise ValueError(f"version {self.version!r} is a reserved name")
        return self

    def variant(self, variant_id: str) -> Variant:
        for v in self.variants:
            if v.id == variant_id:
                return v
        raise KeyError(variant_id)

    def tests_for(self, variant_id: str) -> tuple[TestVector, ...]:
        return tuple(t for t in self.tests if t.variant == variant_id)

    def to_bytes(self) -> bytes:
        return dumps(self.model_dump(mode="json", by_alias=True, exclude_none=True))


class ChannelPointer(StrictDoc):
    model: str = Field(pattern=NAME_PATTERN)
    channel: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=VERSION_PATTERN)
    updated: AwareDatetime
    expires: AwareDatetime

    def to_bytes(self) -> bytes:
        return dumps(self.model_dump(mode="json", exclude_none=True))


def dumps(doc: dict[str, Any]) -> bytes:
    """The one serialisation documents are signed in (the signature covers these exact bytes)."""
    return (json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def _one_line(exc: ValidationError, what: str) -> str:
    err = exc.errors(include_url=False)[0]
    where = ""
    for part in err["loc"]:
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "string_pattern_mismatch":
        msg = f"{err['input']!r} is not a safe name (letters, digits and _ . - + only, not starting with a dot)"
        if err["ctx"].get("pattern") == DIGEST_PATTERN:
            msg = f"{err['input']!r} is not a sha256:<64 hex digits> digest"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{what}: {where + ': ' if where else ''}{msg}{more}"


_DocT = TypeVar("_DocT", bound=StrictDoc)


def parse_manifest(data: bytes, what: str = "manifest") -> Manifest:
    return parse_doc(Manifest, data, what)


def parse_channel(data: bytes, what: str = "channel") -> ChannelPointer:
    return parse_doc(ChannelPointer, data, what)


def parse_doc(kind: type[_DocT], data: bytes, what: str) -> _DocT:
    """Strict parsing of a signed document, bounded in size, with a one-line error."""
    if len(data) > MAX_DOC_BYTES:
        raise ManifestError(f"{what} is {len(data)} bytes; larger than {MAX_DOC_BYTES}")
    try:
        return kind.model_validate_json(data)
    except ValidationError as exc:
        raise ManifestError(_one_line(exc, what)) from None


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# Each dot- or underscore-separated part: (0, number, "") or (1, 0, text); then the release rank.
VersionKey = tuple[tuple[tuple[int, int, str], ...], tuple[int] | tuple[int, str]]


def version_key(version: str) -> VersionKey:
    """Order versions the way people number them: 1.10.0 > 1.9.2, 1.0.0 > 1.0.0-rc1, 2026.11.25 > 2026.2.1."""
    import re

    main, _, pre = version.partition("-")
    main = main.split("+", 1)[0]
    # A number is ASCII digits of a sane length: str.isdigit() also holds for '²', which int() refuses, and
    # int() refuses more than 4300 digits (versions in device health are the device's word, not checked).
    parts = tuple(
        (0, int(p), "") if p.isascii() and p.isdigit() and len(p) <= 30 else (1, 0, p) for p in re.split(r"[._]", main)
    )
    # A release sorts after its pre-releases.
    return parts, (1,) if not pre else (0, pre)
