"""`edge-agent registry keys/rotate/revoke/resign`: the registry's root of trust, with the root key offline.

Drafts are made on the publishing machine, signed where the root key(s) live (`keys sign` reads only
the draft and the key), and installed back on the publishing machine: only the draft and its signature
file travel (docs/trust.md).
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from agent.cli.errors import USAGE, CliError
from agent.config.units import parse_duration

if TYPE_CHECKING:  # the commands import what they use when they run: `edge-agent --help` stays quick
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    from agent.cloud.roots import Change
    from agent.models.trust import Root

ROLE_CHOICES = ("root", "manifests", "channels", "orders")


def add_parsers(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    k = actions.add_parser(
        "keys",
        help="the root of trust: draft root version 1, sign a draft offline, install it, show it",
        description="Signing roles: offline root key(s) sign keys/<N>.root.json, which names the online keys "
        "of each role (manifests, channels, orders). See docs/trust.md.",
    )
    steps = k.add_subparsers(dest="keys_action", metavar="STEP")
    steps.required = True

    init = steps.add_parser("init", help="draft root version 1", description="Draft root version 1 (unsigned).")
    init.add_argument(
        "--root-pub",
        action="append",
        required=True,
        type=Path,
        metavar="PUB",
        help="a root public key (repeat for k of n)",
    )
    init.add_argument("--threshold", type=int, default=1, metavar="K", help="root signatures needed (default 1)")
    init.add_argument("--online", type=Path, metavar="PUB", help="one online public key for every role")
    for role in ("manifests", "channels", "orders"):
        init.add_argument(f"--{role}", type=Path, metavar="PUB", help=f"the {role} key (default: --online)")
    _draft_options(init)
    init.set_defaults(handler=keys_init)

    sign = steps.add_parser(
        "sign",
        help="add a root key's signature to a draft (on the offline machine)",
        description="Add this root key's signature to DRAFT.sig. Reads only the draft and the key.",
    )
    sign.add_argument("draft", type=Path, metavar="DRAFT")
    sign.add_argument("--root-key", required=True, type=Path, metavar="KEY", help="a root private key")
    sign.set_defaults(handler=keys_sign)

    inst = steps.add_parser(
        "install",
        help="check a signed draft as devices will and make it the registry's root",
        description="Check DRAFT and DRAFT.sig against the registry's current root, then write "
        "keys/<N>.root.json and keys/root.json.",
    )
    inst.add_argument("draft", type=Path, metavar="DRAFT")
    inst.add_argument("--root", required=True, type=Path, metavar="DIR", help="the registry folder")
    inst.set_defaults(handler=keys_install)

    show = steps.add_parser(
        "show", help="the registry's current root (or a draft)", description="Print a root version."
    )
    where = show.add_mutually_exclusive_group(required=True)
    where.add_argument("--root", type=Path, metavar="DIR", help="the registry folder")
    where.add_argument("--file", type=Path, metavar="FILE", help="a draft or a root file")
    show.set_defaults(handler=keys_show)

    rot = actions.add_parser(
        "rotate",
        help="draft the next root version: new keys for a role or for the root, or renewed expiries",
        description="Draft root version N+1 from the registry's current one. With --role and --new: that role's "
        "new key(s) (--keep adds them beside the current ones). Without --role: every expiry renewed.",
    )
    rot.add_argument("--root", required=True, type=Path, metavar="DIR", help="the registry folder")
    rot.add_argument("--role", choices=ROLE_CHOICES, help="the role whose keys change")
    rot.add_argument("--new", action="append", default=[], type=Path, metavar="PUB", help="its new public key")
    rot.add_argument("--keep", action="store_true", help="keep the role's current keys beside the new ones")
    rot.add_argument("--threshold", type=int, metavar="K", help="root signatures needed from now on")
    _draft_options(rot)
    rot.set_defaults(handler=rotate)

    rev = actions.add_parser(
        "revoke",
        help="draft the next root version without a key (a leaked one)",
        description="Draft root version N+1 without KEY-ID in any role; devices refuse what it signed from their "
        "next poll. --replace gives its roles a new key.",
    )
    rev.add_argument("--root", required=True, type=Path, metavar="DIR", help="the registry folder")
    rev.add_argument("--key-id", action="append", required=True, metavar="KID", help="the key id to revoke")
    rev.add_argument("--replace", action="append", default=[], type=Path, metavar="PUB", help="its replacement")
    _draft_options(rev)
    rev.set_defaults(handler=revoke)

    res = actions.add_parser(
        "resign",
        help="sign every manifest and channel pointer again (after a rotation, or to migrate)",
        description="Sign every manifest and channel pointer of the registry again, as they are, with the "
        "online keys. After a leak, check first that the folder holds only what you published.",
    )
    res.add_argument("--root", required=True, type=Path, metavar="DIR", help="the registry folder")
    res.add_argument("--key", required=True, type=Path, metavar="KEY", help="the manifests key")
    res.add_argument("--channel-key", type=Path, metavar="KEY", help="the channels key (default: --key)")
    res.set_defaults(handler=resign)


def _draft_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--expires", default="365d", metavar="DURATION", help="the root version's validity (default 365d)")
    p.add_argument("--key-expires", default="365d", metavar="DURATION", help="new online keys' validity (default 365d)")
    p.add_argument("--out", type=Path, default=Path("."), metavar="PATH", help="the draft (default: ./<N>.root.json)")


def _duration(text: str, option: str) -> timedelta:
    try:
        return timedelta(seconds=parse_duration(text))
    except ValueError as exc:
        raise CliError(f"{option}: {exc}", USAGE) from None


def _publics(paths: list[Path]) -> dict[str, Ed25519PublicKey]:
    from agent.models.signing import load_public_keys

    keys: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        if not path.is_file():
            raise CliError(f"{path}: no such file", USAGE)
        try:
            keys.update(load_public_keys(path))
        except ValueError as exc:
            raise CliError(str(exc), USAGE) from None
    return keys


def _private(path: Path) -> Ed25519PrivateKey:
    from agent.models.signing import load_private_key

    if not path.is_file():
        raise CliError(f"{path}: no such file", USAGE)
    try:
        return load_private_key(path)
    except ValueError as exc:
        raise CliError(str(exc), USAGE) from None


def _registry_root(folder: Path) -> Root:
    from agent.cloud.roots import KeysError, current

    try:
        root = current(folder)
    except KeysError as exc:
        raise CliError(str(exc), USAGE) from None
    if root is None:
        raise CliError(f"{folder}/keys/root.json: no root yet; start with `edge-agent registry keys init`", USAGE)
    return root


def _draft(root: Root, args: argparse.Namespace, signers: str) -> int:
    from agent.cloud.roots import describe, write_draft

    draft = write_draft(root, args.out)
    print(f"draft: {draft} (unsigned)")
    for line in describe(root):
        print(line)
    print(
        f"next: on the offline machine, `edge-agent registry keys sign {draft.name} --root-key ROOT.key` "
        f"({signers}), then here `edge-agent registry keys install {draft.name} --root REGISTRY`"
    )
    return 0


def keys_init(args: argparse.Namespace) -> int:
    from agent.cloud.roots import KeysError, first
    from agent.models.trust import ROLES

    online = {}
    for role in ROLES:
        path = getattr(args, role) or args.online
        if path is None:
            raise CliError(f"no key for {role}: give --online PUB (one key for every role) or --{role} PUB", USAGE)
        online[role] = _publics([path])
    try:
        root = first(
            _publics(args.root_pub),
            args.threshold,
            online,
            expires=_duration(args.expires, "--expires"),
            key_expires=_duration(args.key_expires, "--key-expires"),
        )
    except KeysError as exc:
        raise CliError(str(exc), USAGE) from None
    return _draft(root, args, f"{root.roles.root.threshold} of its root keys")


def _next(args: argparse.Namespace, change: Change) -> int:
    from agent.cloud.roots import KeysError, following

    cur = _registry_root(args.root)
    try:
        root = following(cur, change)
    except KeysError as exc:
        raise CliError(str(exc), USAGE) from None
    signers = f"{cur.roles.root.threshold} of root version {cur.version}'s keys"
    if set(root.roles.root.keys) != set(cur.roles.root.keys):
        signers += f" and {root.roles.root.threshold} of the new root keys"
    return _draft(root, args, signers)


def rotate(args: argparse.Namespace) -> int:
    from agent.cloud.roots import Change

    if args.new and args.role is None:
        raise CliError("--new needs --role (the role whose keys change)", USAGE)
    if args.role is not None and not args.new:
        raise CliError(f"--role {args.role} needs --new PUB (its new key)", USAGE)
    change = Change(
        role=args.role if args.role not in (None, "root") else None,
        root=args.role == "root",
        keys=_publics(args.new),
        keep=args.keep,
        threshold=args.threshold,
        expires=_duration(args.expires, "--expires"),
        key_expires=_duration(args.key_expires, "--key-expires"),
    )
    return _next(args, change)


def revoke(args: argparse.Namespace) -> int:
    from agent.cloud.roots import Change

    change = Change(
        keys=_publics(args.replace),
        revoke=frozenset(args.key_id),
        expires=_duration(args.expires, "--expires"),
        key_expires=_duration(args.key_expires, "--key-expires"),
    )
    return _next(args, change)


def keys_sign(args: argparse.Namespace) -> int:
    import json

    from agent.cloud.roots import KeysError, describe, sign_draft

    if not args.draft.is_file():
        raise CliError(f"{args.draft}: no such file", USAGE)
    try:
        root, kid = sign_draft(args.draft, _private(args.root_key))
    except KeysError as exc:
        raise CliError(str(exc), USAGE) from None
    signed = [s["key"] for s in json.loads(args.draft.with_name(args.draft.name + ".sig").read_bytes())["signatures"]]
    print(f"signed {args.draft} with root key {kid}; signatures: {', '.join(signed)}")
    for line in describe(root):
        print(line)
    return 0


def keys_install(args: argparse.Namespace) -> int:
    from agent.cloud.roots import KeysError, describe, install

    if not args.draft.is_file():
        raise CliError(f"{args.draft}: no such file", USAGE)
    try:
        root = install(args.root, args.draft)
    except KeysError as exc:
        raise CliError(str(exc), USAGE) from None
    print(f"installed root version {root.version} in {args.root / 'keys'}; devices follow it at their next poll")
    for line in describe(root):
        print(line)
    return 0


def keys_show(args: argparse.Namespace) -> int:
    from agent.cloud.roots import describe
    from agent.models.trust import TrustError, parse_root

    if args.root is not None:
        root = _registry_root(args.root)
    else:
        try:
            root = parse_root(args.file.read_bytes(), str(args.file))
        except (OSError, TrustError) as exc:
            raise CliError(f"{args.file}: {exc}", USAGE) from None
    for line in describe(root):
        print(line)
    return 0


def resign(args: argparse.Namespace) -> int:
    from agent.cloud.roots import KeysError
    from agent.cloud.roots import resign as do_resign

    key = _private(args.key)
    channel_key = _private(args.channel_key) if args.channel_key is not None else key
    try:
        done = do_resign(args.root, key, channel_key)
    except KeysError as exc:
        raise CliError(str(exc), USAGE) from None
    for path in done:
        print(f"signed {path}")
    print(f"{len(done)} document(s) signed again")
    return 0
