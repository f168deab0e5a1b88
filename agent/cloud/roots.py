"""The registry's root of trust on the publishing side: drafts of root versions, offline signatures, installs.

Every change to the keys devices trust is a new root version (agent.models.trust), made in three steps
that keep the root key(s) on an offline machine; only the draft and its signature file travel:

1. on the publishing machine, `registry keys init` (version 1), `registry rotate` or `registry revoke`
   write a draft `<N>.root.json`: the exact bytes that will be signed;
2. on the offline machine, each root key holder runs `registry keys sign <N>.root.json --root-key KEY`,
   which adds a signature to `<N>.root.json.sig` (k of them for a threshold of k);
3. back on the publishing machine, `registry keys install <N>.root.json --root DIR` checks the draft as
   a device will (the next version, signed by a threshold of the current root keys and by a threshold
   of its own) and writes keys/<N>.root.json, then keys/root.json.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.cloud.writes import replace_file, write_signed
from agent.models.manifest import ManifestError, parse_channel, parse_manifest
from agent.models.signing import (
    CHANNEL,
    MANIFEST,
    ROOT,
    PayloadType,
    SignatureError,
    add_signature,
    key_id,
    verify_threshold,
)
from agent.models.trust import (
    LATEST,
    ROLES,
    KeyEntry,
    OnlineRole,
    Role,
    Roles,
    Root,
    RootRole,
    TrustError,
    check_successor,
    key_entry,
    parse_root,
    root_path,
)

DEFAULT_EXPIRES = timedelta(days=365)


class KeysError(Exception):
    """A root version cannot be drafted, signed or installed; the message says what to fix."""


@dataclass(frozen=True)
class Change:
    """What a new root version changes: a role's keys (`root` for the root keys), its threshold, expiries."""

    role: Role | None = None
    root: bool = False
    keys: Mapping[str, Ed25519PublicKey] | None = None
    keep: bool = False  # add the new keys beside the role's current ones (a rotation without a gap)
    threshold: int | None = None
    revoke: frozenset[str] = frozenset()
    expires: timedelta = DEFAULT_EXPIRES
    key_expires: timedelta = DEFAULT_EXPIRES


def _now(now: datetime | None) -> datetime:
    return (now or datetime.now(timezone.utc)).replace(microsecond=0)


def current(registry: Path) -> Root | None:
    """The registry's newest root (keys/root.json), or None for a registry without signing roles."""
    path = registry / LATEST
    if not path.exists():
        return None
    try:
        return parse_root(path.read_bytes(), str(path))
    except TrustError as exc:
        raise KeysError(str(exc)) from None


def first(
    root_keys: Mapping[str, Ed25519PublicKey],
    threshold: int,
    online: Mapping[Role, Mapping[str, Ed25519PublicKey]],
    expires: timedelta = DEFAULT_EXPIRES,
    key_expires: timedelta = DEFAULT_EXPIRES,
    now: datetime | None = None,
) -> Root:
    """Root version 1: the root keys (threshold of them) and the online keys of every role."""
    now = _now(now)
    missing = [r for r in ROLES if not online.get(r)]
    if missing:
        raise KeysError(f"no key for the role(s) {', '.join(missing)}: give --online, or --{missing[0]}")
    keys = {kid: key_entry(pub) for kid, pub in root_keys.items()}
    for role_keys in online.values():
        keys.update({kid: key_entry(pub, now + key_expires) for kid, pub in role_keys.items()})
    return _build(
        1,
        now,
        now + expires,
        keys,
        RootRole(keys=tuple(root_keys), threshold=threshold),
        {r: tuple(online[r]) for r in ROLES},
        {},
    )


def _build(
    version: int,
    issued: datetime,
    expires: datetime,
    keys: dict[str, KeyEntry],
    root_role: RootRole,
    roles: Mapping[Role, tuple[str, ...]],
    revoked: dict[str, int],
) -> Root:
    try:
        return Root(
            version=version,
            issued=issued,
            expires=expires,
            keys=keys,
            roles=Roles(root=root_role, **{r: OnlineRole(keys=roles[r]) for r in ROLES}),
            revoked=revoked,
        )
    except ValueError as exc:
        raise KeysError(f"root version {version}: {str(exc).splitlines()[-1].strip()}") from None


def following(cur: Root, change: Change, now: datetime | None = None) -> Root:
    """The root version after `cur`, with `change` made: new keys for a role or for the root, revoked keys
    dropped everywhere (with `keys`, their replacement takes their place in each role they had), or, with
    neither, every expiry renewed."""
    now = _now(now)
    unknown = sorted(change.revoke - set(cur.keys))
    if unknown:
        raise KeysError(f"key {unknown[0]} is not in root version {cur.version}: nothing to revoke")
    keys = {kid: entry for kid, entry in cur.keys.items() if kid not in change.revoke}
    roles: dict[str, tuple[str, ...]] = {r: cur.role_keys(r) for r in ROLES}
    roles["root"] = cur.roles.root.keys
    new = dict(change.keys or {})
    if change.root:
        targets, keep = ["root"], change.keep
    elif change.role is not None:
        targets, keep = [change.role], change.keep
    else:  # a revocation (its replacement joins the roles the revoked keys leave), or a renewal
        targets, keep = [r for r in roles if set(roles[r]) & change.revoke] if new else [], True
    if not change.revoke and not targets:
        for kid in {k for r in ROLES for k in roles[r]}:
            keys[kid] = KeyEntry(public=keys[kid].public, expires=now + change.key_expires)
    roles = {r: tuple(k for k in held if k not in change.revoke) for r, held in roles.items()}
    for target in targets:
        for kid, pub in new.items():
            keys[kid] = key_entry(pub, None if target == "root" else now + change.key_expires)
        kept = roles[target] if keep else ()
        roles[target] = (*kept, *[k for k in new if k not in kept])
    empty = [r for r, held in roles.items() if not held]
    if empty:
        raise KeysError(f"the role {empty[0]} would have no key left; give its new key (--replace PUB)")
    used = {k for held in roles.values() for k in held}
    threshold = min(change.threshold or cur.roles.root.threshold, len(roles["root"]))
    return _build(
        cur.version + 1,
        now,
        now + change.expires,
        {kid: entry for kid, entry in keys.items() if kid in used},
        RootRole(keys=roles["root"], threshold=threshold),
        {r: roles[r] for r in ROLES},
        {**cur.revoked, **dict.fromkeys(sorted(change.revoke), cur.version + 1)},
    )


def write_draft(root: Root, out: Path) -> Path:
    """The draft's exact bytes (`out`: a file, or a folder for `<N>.root.json`); a signature file left
    beside it by an earlier draft is removed (a draft signed anew starts over)."""
    if out.suffix != ".json":
        out = out / root_path(root.version).split("/")[-1]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(root.to_bytes())
    out.with_name(out.name + ".sig").unlink(missing_ok=True)
    return out


def sign_draft(draft: Path, private: Ed25519PrivateKey) -> tuple[Root, str]:
    """Add this root key's signature to `draft`.sig (on the offline machine: nothing else is read).
    Returns the draft and the key's id."""
    data = draft.read_bytes()
    root = _parse(data, draft)
    kid = key_id(private.public_key())
    if kid in root.keys and kid not in root.roles.root.keys:
        raise KeysError(f"key {kid} is an online key of {draft.name}, not a root key; sign with a root key")
    sig_path = draft.with_name(draft.name + ".sig")
    before = sig_path.read_bytes() if sig_path.exists() else b""
    try:
        sig_path.write_bytes(add_signature(before, private, data, ROOT))
    except SignatureError as exc:
        raise KeysError(f"{sig_path}: {exc}") from None
    return root, kid


def _parse(data: bytes, path: Path) -> Root:
    try:
        return parse_root(data, str(path))
    except TrustError as exc:
        raise KeysError(str(exc)) from None


def install(registry: Path, draft: Path, now: datetime | None = None) -> Root:
    """Check the signed draft as a device will, then make it the registry's newest root."""
    data = draft.read_bytes()
    sig_path = draft.with_name(draft.name + ".sig")
    if not sig_path.exists():
        raise KeysError(f"{sig_path}: no signature; sign the draft with `registry keys sign` on the offline machine")
    sig = sig_path.read_bytes()
    new = _parse(data, draft)
    cur = current(registry)
    try:
        if cur is None:
            if new.version != 1:
                raise TrustError(f"{draft} is root version {new.version}; this registry has no root yet (version 1)")
            verify_threshold(new.root_keys, new.roles.root.threshold, data, sig, str(draft), ROOT, by="its root keys")
        else:
            check_successor(cur, data, sig, str(draft))
    except (TrustError, SignatureError) as exc:
        raise KeysError(str(exc)) from None
    if new.expires <= _now(now):
        raise KeysError(f"{draft} expired at {new.expires.isoformat()}; draft it again")
    # The numbered version first: a device that sees the new keys/root.json can always fetch it.
    replace_file(registry / (root_path(new.version) + ".sig"), sig)
    replace_file(registry / root_path(new.version), data)
    replace_file(registry / (LATEST + ".sig"), sig)
    replace_file(registry / LATEST, data)
    return new


def check_signing_key(registry: Path, private: Ed25519PrivateKey, role: Role, now: datetime | None = None) -> None:
    """Refuse to sign with a key the registry's root does not trust for `role` (devices would refuse it)."""
    root = current(registry)
    if root is None:
        return  # a single-key registry: devices trust the key they pinned
    kid = key_id(private.public_key())
    ring = root.keyring(role, _now(now))
    if kid not in ring:
        why = ring.retired.get(kid, "which it does not know")
        raise KeysError(
            f"key {kid} is not a {role} key of {registry / LATEST} (version {root.version}): {why}; "
            f"{role} keys: {', '.join(ring) or 'none'} (docs/trust.md)"
        )


def describe(root: Root, now: datetime | None = None) -> list[str]:
    """What a root version says, for people: its expiry, and the keys of each role with theirs."""
    now = _now(now)

    def when(ts: datetime | None) -> str:
        if ts is None:
            return ""
        days = (ts - now).total_seconds() / 86400
        state = f"in {days:.0f} days" if days >= 0 else "EXPIRED"
        return f" (expires {ts:%Y-%m-%d}, {state})"

    lines = [
        f"root version {root.version}{when(root.expires)}",
        f"  root ({root.roles.root.threshold} of {len(root.roles.root.keys)}): {', '.join(root.roles.root.keys)}",
    ]
    for role in ROLES:
        keys = "; ".join(f"{kid}{when(root.keys[kid].expires)}" for kid in root.role_keys(role))
        lines.append(f"  {role}: {keys}")
    for kid, version in sorted(root.revoked.items()):
        lines.append(f"  revoked: {kid} (by version {version})")
    return lines


def resign(
    registry: Path, manifests_key: Ed25519PrivateKey, channels_key: Ed25519PrivateKey, now: datetime | None = None
) -> list[Path]:
    """Sign every manifest and channel pointer again, as it is: after an online key was rotated or revoked,
    or to move a registry from untyped signatures. The documents do not change, their signatures do; so
    after a leak, check first that the folder holds only what you published (docs/trust.md)."""
    check_signing_key(registry, manifests_key, "manifests", now)
    check_signing_key(registry, channels_key, "channels", now)
    kinds: tuple[tuple[str, Callable[[bytes, str], object], Ed25519PrivateKey, PayloadType], ...] = (
        ("models/*/*/manifest.json", parse_manifest, manifests_key, MANIFEST),
        ("channels/*/*.json", parse_channel, channels_key, CHANNEL),
    )
    done: list[Path] = []
    for pattern, parse, key, payload_type in kinds:
        for path in sorted(registry.glob(pattern)):
            if any(part.startswith(".") for part in path.relative_to(registry).parts):
                continue  # a publish in progress
            data = path.read_bytes()
            try:
                parse(data, str(path))
            except ManifestError as exc:
                raise KeysError(f"not signing {exc}") from None
            write_signed(path, data, key, payload_type)
            done.append(path)
    return done
