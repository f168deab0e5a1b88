"""Signing roles under an offline root, TUF style: which keys a device trusts to sign each kind of document.

The registry's root keys (one, or k of n) stay offline. They sign the root document `keys/<N>.root.json`
(its newest version is also `keys/root.json`), which names the online keys of each role, each with an
expiry, and the keys revoked so far:

    manifests   models/<model>/<version>/manifest.json
    channels    channels/<model>/<channel>.json
    orders      deployment orders (MQTT, agent.models.deploy)

A device pins the root key(s) at install (`registry.public_key`). At every poll it reads keys/root.json
and walks the versions after the one it trusts: version N+1 is accepted only when it is signed by a
threshold of version N's root keys and by a threshold of its own (TUF's root rotation); a root never
goes back to a lower version, and an expired root is refused. An online key that leaks is revoked by the
next root version: devices stop trusting it at their next poll, and one that was offline walks the chain
when it returns, before it believes anything signed.

A registry without keys/ is the single-key registry of earlier releases: the pinned key(s) sign every
document directly. A device that has trusted a root once never falls back to that.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Final, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import AwareDatetime, Field, model_validator

from agent.models.manifest import SCHEMA, ManifestError, StrictDoc, dumps, parse_doc, utcnow
from agent.models.signing import (
    CHANNEL,
    MANIFEST,
    ORDER,
    ROOT,
    Keyring,
    PayloadType,
    SignatureError,
    key_id,
    public_from_raw,
    raw_public,
    verify_threshold,
)
from agent.util.files import write_atomic

log = logging.getLogger(__name__)

Role = Literal["manifests", "channels", "orders"]
ROLES: Final[tuple[Role, ...]] = ("manifests", "channels", "orders")
ROLE_OF: Final[dict[str, Role]] = {MANIFEST: "manifests", CHANNEL: "channels", ORDER: "orders"}
LATEST = "keys/root.json"
MAX_WALK = 128  # root versions read in one refresh; a longer chain goes on at the next poll
STATE_FILE = "trusted-root.json"
KEY_ID_PATTERN = r"^[0-9a-f]{16}$"
KeyId = Annotated[str, Field(pattern=KEY_ID_PATTERN)]
Getter = Callable[[str], bytes | None]  # a registry document, or None when the registry has none (404)


def root_path(version: int) -> str:
    return f"keys/{version}.root.json"


class TrustError(Exception):
    """The registry's keys cannot be trusted (or no longer): the one-line reason a device publishes."""


class KeyEntry(StrictDoc):
    public: str = Field(pattern=r"^[A-Za-z0-9+/]{43}=$", description="the raw ed25519 public key, base64")
    expires: AwareDatetime | None = Field(None, description="when an online key stops being trusted")


class RootRole(StrictDoc):
    keys: tuple[KeyId, ...] = Field(min_length=1)
    threshold: int = Field(1, ge=1, description="signatures needed on the next root version, and on this one")


class OnlineRole(StrictDoc):
    keys: tuple[KeyId, ...] = Field(min_length=1)


class Roles(StrictDoc):
    root: RootRole
    manifests: OnlineRole
    channels: OnlineRole
    orders: OnlineRole


class Root(StrictDoc):
    """One version of the root document: the keys of every role, signed by the root keys."""

    schema_version: Literal[1] = Field(SCHEMA, alias="schema")
    version: int = Field(ge=1)
    issued: AwareDatetime
    expires: AwareDatetime
    keys: dict[KeyId, KeyEntry]
    roles: Roles
    revoked: dict[KeyId, int] = Field(default_factory=dict, description="key id -> the root version revoking it")

    @model_validator(mode="after")
    def _check(self) -> Root:
        for kid, entry in self.keys.items():
            try:
                public = public_from_raw(base64.b64decode(entry.public))
            except ValueError:
                raise ValueError(f"keys.{kid}: not an ed25519 public key") from None
            if key_id(public) != kid:
                raise ValueError(f"keys.{kid}: the key's id is {key_id(public)}")
        for role in ("root", *ROLES):
            for kid in getattr(self.roles, role).keys:
                if kid not in self.keys:
                    raise ValueError(f"roles.{role}: key {kid} is not in keys")
        if self.roles.root.threshold > len(set(self.roles.root.keys)):
            raise ValueError(f"roles.root: threshold {self.roles.root.threshold} is more than its keys")
        for kid, version in self.revoked.items():
            if kid in self.keys:
                raise ValueError(f"revoked: key {kid} is still in keys")
            if version > self.version:
                raise ValueError(f"revoked: key {kid} is revoked by version {version}, after this one")
        if self.expires <= self.issued:
            raise ValueError("expires is not after issued")
        return self

    def public(self, kid: str) -> Ed25519PublicKey:
        return public_from_raw(base64.b64decode(self.keys[kid].public))

    @property
    def root_keys(self) -> dict[str, Ed25519PublicKey]:
        return {kid: self.public(kid) for kid in self.roles.root.keys}

    def role_keys(self, role: Role) -> tuple[str, ...]:
        role_doc: OnlineRole = getattr(self.roles, role)
        return role_doc.keys

    def keyring(self, role: Role, now: datetime) -> Keyring:
        """The keys this root trusts for `role` now, and why any other key it knows is not one of them."""
        trusted, retired = {}, {}
        for kid in self.role_keys(role):
            expires = self.keys[kid].expires
            if expires is not None and expires <= now:
                retired[kid] = f"which expired at {_iso(expires)} (root version {self.version})"
            else:
                trusted[kid] = self.public(kid)
        for kid, version in self.revoked.items():
            retired[kid] = f"revoked by root version {version}"
        for kid in self.keys:
            if kid not in trusted and kid not in retired:
                uses = [r for r in ("root", *ROLES) if kid in getattr(self.roles, r).keys]
                retired[kid] = f"which root version {self.version} trusts for {', '.join(uses)}, not for {role}"
        return Keyring(trusted, retired)

    def to_bytes(self) -> bytes:
        return dumps(self.model_dump(mode="json", by_alias=True, exclude_none=True))


def key_entry(public: Ed25519PublicKey, expires: datetime | None = None) -> KeyEntry:
    return KeyEntry(public=base64.b64encode(raw_public(public)).decode(), expires=expires)


def parse_root(data: bytes, what: str) -> Root:
    try:
        return parse_doc(Root, data, what)
    except ManifestError as exc:
        raise TrustError(str(exc)) from None


def _iso(ts: datetime) -> str:
    return ts.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_successor(trusted: Root, data: bytes, sig: bytes, what: str) -> Root:
    """`data` as the root version after `trusted`: the next version number, signed by a threshold of the
    trusted root keys and by a threshold of its own (a new root key proves it holds its key). TrustError."""
    new = parse_root(data, what)
    if new.version != trusted.version + 1:
        raise TrustError(f"{what} is root version {new.version}; version {trusted.version + 1} was expected")
    try:
        verify_threshold(
            trusted.root_keys,
            trusted.roles.root.threshold,
            data,
            sig,
            what,
            ROOT,
            by=f"the root keys of version {trusted.version}",
        )
        verify_threshold(new.root_keys, new.roles.root.threshold, data, sig, what, ROOT, by="its own root keys")
    except SignatureError as exc:
        raise TrustError(str(exc)) from None
    return new


def check_anchor(pinned: Mapping[str, Ed25519PublicKey], data: bytes, sig: bytes, what: str) -> Root:
    """`data` as the first root a device trusts: signed, at its own threshold, by its root keys that are
    among the keys pinned at install."""
    root = parse_root(data, what)
    mine = {kid: key for kid, key in root.root_keys.items() if kid in pinned}
    try:
        verify_threshold(mine, root.roles.root.threshold, data, sig, what, ROOT, by="the pinned root keys")
    except SignatureError as exc:
        raise TrustError(str(exc)) from None
    return root


class Trust:
    """What one device trusts for each role: the pinned key(s), then the root chain it has followed.

    The newest trusted root is kept in `state_dir/trusted-root.json` with the key ids it was anchored to;
    pinning other keys (a reinstall) starts over from them."""

    def __init__(
        self, pinned: Mapping[str, Ed25519PublicKey], state_dir: Path | None, now: Callable[[], datetime] = utcnow
    ) -> None:
        self.pinned = dict(pinned)
        self.path = state_dir / STATE_FILE if state_dir is not None else None
        self.now = now
        self.root: Root | None = None
        self._raw: tuple[bytes, bytes] | None = None
        # One refresh at a time: the updater and the order inbox share a Trust, and two walks from the same
        # version would each find the other's step taken ("version N+1 was expected"), a false TrustError.
        self._refreshing = threading.Lock()
        self._load()

    @property
    def version(self) -> int | None:
        return self.root.version if self.root is not None else None

    def keyring(self, payload_type: PayloadType) -> Keyring:
        """The keys to check a document of this kind with (TrustError when the root has expired)."""
        if self.root is None:
            return Keyring(self.pinned)  # a single-key registry: the pinned keys sign everything
        self._check_expiry(self.root)
        return self.root.keyring(ROLE_OF[payload_type], self.now())

    def refresh(self, get: Getter) -> None:
        """Follow the registry's root chain from the trusted version (or anchor it at the pinned keys).
        Raises TrustError for a root that must not be trusted; what `get` raises (network) passes through."""
        with self._refreshing:
            self._refresh(get)

    def _refresh(self, get: Getter) -> None:
        latest = get(LATEST)
        if latest is None:
            if self.root is not None:
                raise TrustError(
                    f"{LATEST} is not on the registry (404); this device trusts root version {self.root.version} "
                    "and never goes back to single-key trust"
                )
            return
        head = parse_root(latest, LATEST)  # not trusted yet: only its version is read
        if self.root is None:
            self._anchor(get, head.version)
        elif head.version < self.root.version:
            raise TrustError(
                f"{LATEST} is root version {head.version}, older than version {self.root.version} that this "
                "device trusts; a root never goes back (rollback refused)"
            )
        elif head.version == self.root.version:
            if self._raw is not None and latest != self._raw[0]:
                raise TrustError(f"{LATEST} differs from root version {head.version} that this device trusts")
        else:
            self._walk(get, head.version)
        if self.root is not None:
            self._check_expiry(self.root)

    # ---- the chain ---------------------------------------------------------------------------------

    def _fetch(self, get: Getter, version: int, head: int) -> tuple[bytes, bytes]:
        path = root_path(version)
        data, sig = get(path), get(path + ".sig")
        if data is None or sig is None:
            missing = path if data is None else path + ".sig"
            raise TrustError(f"{missing} is not on the registry (404); {LATEST} names version {head}")
        return data, sig

    def _walk(self, get: Getter, head: int) -> None:
        assert self.root is not None
        last = min(head, self.root.version + MAX_WALK)
        for version in range(self.root.version + 1, last + 1):
            data, sig = self._fetch(get, version, head)
            self._trust(check_successor(self.root, data, sig, root_path(version)), data, sig)
        if last < head:
            raise TrustError(f"root version {last} reached of {head}; the walk goes on at the next poll")

    def _anchor(self, get: Getter, head: int) -> None:
        """The first root: the newest, when the pinned keys sign it (the usual install), else the first
        version they sign, walking up from version 1; then on along the chain."""
        try:
            data, sig = self._fetch(get, head, head)
            self._trust(check_anchor(self.pinned, data, sig, root_path(head)), data, sig)
            return
        except TrustError:
            pass
        for version in range(1, min(head, MAX_WALK) + 1):
            data, sig = self._fetch(get, version, head)
            if self.root is None:
                try:
                    self._trust(check_anchor(self.pinned, data, sig, root_path(version)), data, sig)
                except TrustError:
                    continue  # signed by root keys this device was not installed with: not an anchor
            else:
                self._trust(check_successor(self.root, data, sig, root_path(version)), data, sig)
        if self.root is None:
            pinned = ", ".join(sorted(self.pinned))
            raise TrustError(
                f"no root of this registry (versions 1 to {head}) is signed by the pinned key(s) {pinned}: "
                "registry.public_key must hold the registry's root key(s) (docs/trust.md)"
            )
        if self.root.version < head:
            self._walk(get, head)

    def _check_expiry(self, root: Root) -> None:
        if root.expires <= self.now():
            raise TrustError(
                f"root version {root.version} expired at {_iso(root.expires)}; the registry's root key "
                "holders must sign a new version (docs/trust.md)"
            )

    # ---- state -------------------------------------------------------------------------------------

    def _trust(self, root: Root, data: bytes, sig: bytes) -> None:
        if self.root is not None:
            log.info("registry root version %d trusted (was %d)", root.version, self.root.version)
        self.root, self._raw = root, (data, sig)
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"pinned": sorted(self.pinned), "root": data.decode(), "sig": json.loads(sig)}
        write_atomic(self.path, json.dumps(doc, indent=1).encode())

    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            doc = json.loads(self.path.read_text())
            data, sig = doc["root"].encode(), json.dumps(doc["sig"]).encode()
            root = parse_root(data, str(self.path))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, TrustError) as exc:
            log.warning("cannot read %s (%s); trusting the pinned key(s) again", self.path, exc)
            return
        if doc.get("pinned") != sorted(self.pinned):
            log.warning("registry.public_key holds other keys than the trusted root was anchored to; anchoring again")
            return
        self.root, self._raw = root, (data, sig)
