"""`edge-agent models list|pull|rollback|inspect`: the local model store."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.cli.errors import FAILURE, USAGE, CliError
from agent.util.progress import ProgressBar

if TYPE_CHECKING:  # the CLI imports every verb at start: the profile and the store load only when used
    from agent.config.profile import Profile
    from agent.models.store import Store


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", type=Path, metavar="FILE", help="take state_dir (and the registry) from this profile")
    p.add_argument("--state-dir", type=Path, metavar="DIR", help="the agent's state folder (models live in DIR/models)")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "models",
        help="the local model store",
        description="List, pull, roll back and inspect models in the local store.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    ls = actions.add_parser("list", help="models in the store, their active and previous versions")
    _store_args(ls)
    ls.add_argument(
        "--verify",
        action="store_true",
        help="re-hash active files (models and their custom-op libraries) and report damage (exit 1)",
    )
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(handler=list_models)

    pull = actions.add_parser(
        "pull",
        help="fetch, verify, test and activate a model version from the registry",
        description="One update step, as the daemon does it: signed channel and manifest, a variant this "
        "runtime can load, a resumable verified download, test vectors on this device's provider, "
        "then an atomic switch. Exit 1 when the version is refused (the reason is printed).",
    )
    pull.add_argument("model", metavar="MODEL", help="registry model name")
    which = pull.add_mutually_exclusive_group()
    which.add_argument("--channel", default=None, metavar="NAME", help="follow this channel (default: stable)")
    which.add_argument("--version", metavar="VER", help="this exact version")
    pull.add_argument(
        "--allow-older",
        action="store_true",
        help="a rollback order: accept a version older than the active one, or one this device holds",
    )
    _store_args(pull)
    pull.add_argument("--registry", metavar="URL", help="registry base URL (default: the profile's)")
    pull.add_argument(
        "--public-key", type=Path, metavar="FILE", help="the registry's public key (default: the profile's)"
    )
    pull.add_argument("--keep", type=int, metavar="N", help="versions kept on disk (default: the profile's, or 3)")
    pull.add_argument(
        "--target-ort", metavar="VERSION", help="choose variants as a device with this onnxruntime release would"
    )
    pull.add_argument("--timeout", type=float, default=30.0, help="network timeout per request in seconds (default 30)")
    pull.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    pull.add_argument("--json", action="store_true", help="print the result as JSON")
    pull.set_defaults(handler=pull_model)

    rb = actions.add_parser(
        "rollback",
        help="go back to the version before the active one (again: the one before that), or to --version",
        description="Activate the newest earlier version on disk that is not held (each rollback walks one "
        "step further back), or the version named. The version left is held: no channel, order or pin "
        "installs it again until an operator overrides the hold. A running agent serves the change after "
        "its restart; use the rollback command to change a running agent.",
    )
    rb.add_argument("model", metavar="MODEL")
    rb.add_argument("--version", metavar="VER", help="this version (on disk) instead of the one before")
    _store_args(rb)
    rb.set_defaults(handler=rollback)

    ins = actions.add_parser(
        "inspect",
        help="opsets, IR version, inputs/outputs and op histogram of a model",
        description="Read a model file (or the active version of a model in the store) without the onnx "
        "package: IR version, opsets per domain, inputs and outputs, and which operators it uses.",
    )
    ins.add_argument("target", metavar="MODEL_OR_FILE", help="an .onnx file, or a model name in the store")
    _store_args(ins)
    ins.add_argument(
        "--top", type=int, default=25, metavar="N", help="operators shown in the histogram (default 25; 0: all)"
    )
    ins.add_argument("--json", action="store_true", help="print JSON")
    ins.add_argument(
        "--view",
        action="store_true",
        help="then show the graph in Netron (the cloud extra) on a loopback port until Ctrl-C",
    )
    ins.add_argument("--port", type=int, default=0, metavar="N", help="Netron's port with --view (default: a free one)")
    ins.add_argument("--no-browser", action="store_true", help="with --view, print the URL without opening a browser")
    ins.set_defaults(handler=inspect)


def _profile(args: argparse.Namespace) -> Profile | None:
    if not getattr(args, "profile", None):
        return None
    from agent.config.errors import ProfileError
    from agent.config.profile import load_profile

    try:
        return load_profile(args.profile)
    except ProfileError as exc:
        raise CliError(str(exc).splitlines()[0], USAGE) from None


def _state_dir(args: argparse.Namespace, profile: Profile | None) -> Path:
    if args.state_dir is not None:
        return Path(args.state_dir)
    if profile is not None:
        return Path(profile.device.state_dir)
    raise CliError("give --state-dir DIR or --profile FILE", USAGE)


def _store(args: argparse.Namespace, profile: Profile | None = None, keep: int | None = None) -> Store:
    from agent.models.store import Store

    keep = keep or (profile.registry.keep_versions if profile is not None and profile.registry else 3)
    return Store(_state_dir(args, profile), keep_versions=keep)


def list_models(args: argparse.Namespace) -> int:
    from agent.models.store import StoreError

    store = _store(args, _profile(args))
    rows: list[dict[str, Any]] = []  # JSON rows, printed as they are with --json
    damaged = False
    for model in store.models():
        try:
            pointer = store.pointer(model)
            active = store.active(model)
        except StoreError as exc:
            rows.append({"model": model, "error": str(exc)})
            damaged = True
            continue
        row: dict[str, Any] = {
            "model": model,
            "active": pointer["active"],
            "previous": pointer["previous"],
            "versions": store.versions(model),
            "held": pointer["held"],
        }
        if active is not None:
            row.update(
                variant=active.variant.id,
                digest=active.digest,
                provider=active.provider,
                path=str(active.path),
                expires=active.manifest.expires.isoformat(),
            )
        if args.verify:
            row["problems"] = store.check(model, deep=True)
            damaged |= bool(row["problems"])
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no models in {store.root}")
    else:
        for row in rows:
            if "error" in row:
                print(f"{row['model']}: {row['error']}")
                continue
            line = f"{row['model']}: active {row['active'] or '-'}"
            if row.get("variant"):
                line += f" ({row['variant']}, {row['digest'][:19]}, tested on {row['provider'] or '?'})"
            line += f", previous {row['previous'] or '-'}, on disk: {', '.join(row['versions']) or '-'}"
            print(line)
            for held in row["held"]:
                print(f"  held: {held['version']} since {held['since'] or '?'}: {held['reason']}")
            for problem in row.get("problems", []):
                print(f"  damaged: {problem}")
    return FAILURE if damaged else 0


def pull_model(args: argparse.Namespace) -> int:
    from agent.device import compat
    from agent.models.registry import RegistryClient
    from agent.transport.events import Event

    profile = _profile(args)
    url = args.registry or (profile.registry.url if profile is not None and profile.registry else None)
    key = args.public_key or (profile.registry.public_key if profile is not None and profile.registry else None)
    if not url or not key:
        raise CliError("give --registry URL and --public-key FILE, or a --profile with a registry section", USAGE)
    if args.keep is not None and args.keep < 2:
        raise CliError("--keep must be at least 2", USAGE)
    key = Path(key)
    if not key.is_file():
        raise CliError(f"{key}: no such public key file", USAGE)
    caps = None
    if args.target_ort:
        if not compat.parse_version(args.target_ort):
            raise CliError(f"--target-ort {args.target_ort!r} is not a version like 1.16", USAGE)
        caps = compat.caps_for(args.target_ort)

    def emit(event: Event) -> None:
        if event.type in ("model.refused", "model.error"):
            return  # the outcome line says it
        if not args.quiet and event.type != "model.activated":
            print(
                f"{event.type.removeprefix('model.')}: {event.fields.get('model')} {event.fields.get('version')} "
                f"variant {event.fields.get('variant')}",
                file=sys.stderr,
            )

    store = _store(args, profile, args.keep)
    try:
        client = RegistryClient(
            url,
            key,
            store,
            runtime=profile.runtime if profile else None,
            caps=caps,
            emit=emit,
            timeout=args.timeout,
            progress=None if args.quiet else ProgressBar(args.model, unit="MB"),
        )
    except ValueError as exc:
        raise CliError(str(exc), USAGE) from None
    result = client.check_and_pull(
        args.model, channel=args.channel or "stable", version=args.version, allow_older=args.allow_older
    )
    if args.json:
        print(json.dumps(dataclasses.asdict(result), indent=2))
    if result.status in ("refused", "failed"):
        what = f"{args.model} {result.version}" if result.version else args.model
        raise CliError(f"{result.status}: {what}: {result.reason}", FAILURE)
    if not args.json:
        if result.status == "current":
            print(f"{args.model} {result.version} is already active (variant {result.variant})")
        elif result.status == "held":
            print(f"{args.model}: {result.reason}")
        else:
            print(
                f"{args.model} {result.version} activated (variant {result.variant}, tested on {result.provider}; "
                f"previous {result.previous or '-'})"
            )
    return 0


def rollback(args: argparse.Namespace) -> int:
    from agent.models.store import StoreError

    store = _store(args, _profile(args))
    try:
        with store.lock():
            before = store.pointer(args.model)["active"]
            entry = store.rollback(args.model, args.version, reason="rolled back with edge-agent models rollback")
    except StoreError as exc:
        raise CliError(str(exc), FAILURE) from None
    print(f"{args.model}: {before} -> {entry.version} (variant {entry.variant.id}); {before} is held")
    return 0


def _shape(shape: tuple[int | str | None, ...] | None) -> str:
    if shape is None:
        return "?"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def inspect(args: argparse.Namespace) -> int:
    from agent.device import compat, customops
    from agent.models.customops import describe
    from agent.models.manifest import file_digest
    from agent.models.store import StoreError

    path, entry = Path(args.target), None
    if not path.is_file():
        if args.state_dir is None and not args.profile:
            raise CliError(
                f"{args.target}: no such file (for a model in the store, give --state-dir or --profile)", USAGE
            )
        try:
            entry = _store(args, _profile(args)).active(args.target)
        except StoreError as exc:
            raise CliError(str(exc), FAILURE) from None
        if entry is None:
            raise CliError(f"{args.target}: no such file, and no such model in the store", USAGE)
        path = entry.path
    try:
        summary = compat.summarize(path)
    except compat.ModelFormatError as exc:
        raise CliError(f"{path}: {exc}", USAGE) from None
    h = summary.header
    libraries = profile.runtime.custom_ops if (profile := _profile(args)) is not None else ()
    caps = customops.loadable_caps(compat.installed_caps(), path, libraries)
    reason = compat.refusal(caps, path.name, h.ir_version, h.opsets)
    custom = describe(h.opsets, caps, path, libraries, entry.variant if entry else None)
    size = path.stat().st_size
    digest = entry.digest if entry else file_digest(path)
    min_runtime = compat.min_runtime(h.ir_version, h.opsets)
    doc: dict[str, object] = {
        "file": str(path),
        "bytes": size,
        "digest": digest,
        "ir_version": h.ir_version,
        "opsets": h.opsets,
        "producer": h.producer,
        "metadata": h.metadata,
        "min_runtime": min_runtime,
        "loads_here": reason is None,
        "refusal": reason,
        "inputs": [i.to_json() for i in summary.inputs],
        "outputs": [o.to_json() for o in summary.outputs],
        "ops": dict(summary.ops.most_common()),
        "custom_domains": custom,
    }
    if entry:
        doc.update(
            model=entry.model, version=entry.version, variant=entry.variant.id, precision=entry.variant.precision
        )
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    title = (
        f"{entry.model} {entry.version} (variant {entry.variant.id}, {entry.variant.precision})" if entry else path.name
    )
    print(f"{title}: {size / 1e6:.2f} MB, {digest}")
    print(
        f"IR version {h.ir_version}; opsets: {', '.join(f'{d} {v}' for d, v in sorted(h.opsets.items()))}"
        + (f"; producer {h.producer}" if h.producer else "")
    )
    print(
        f"loads on onnxruntime >= {min_runtime or '? (newer than any release known here)'}; "
        + (f"this runtime ({caps.ort_version}) loads it" if reason is None else f"not here: {reason}")
    )
    for domain, info in custom.items():
        found = info["libraries"] or ["none here (publish it with --custom-ops, or set runtime.custom_ops)"]
        print(f"custom domain {domain} opset {info['opset']}: library {'; '.join(found)}")
        if info["published_for"]:
            print(f"  published libraries: {'; '.join(info['published_for'])}")
    for k, v in h.metadata.items():
        print(f"metadata {k}: {v[:100]}")
    for kind, items in (("inputs", summary.inputs), ("outputs", summary.outputs)):
        print(f"{kind}:")
        width = max((len(i.name) for i in items), default=0)
        for i in items:
            print(f"  {i.name:<{width}}  {i.type:<8} {_shape(i.shape)}")
    total = sum(summary.ops.values())
    print(f"operators: {total} nodes, {len(summary.ops)} kinds")
    shown = summary.ops.most_common(args.top or None)
    width = max((len(op) for op, _ in shown), default=0)
    for op, n in shown:
        print(f"  {op:<{width}}  {n:>5}  {'#' * max(1, round(40 * n / max(shown[0][1], 1)))}")
    if len(shown) < len(summary.ops):
        print(f"  ... {len(summary.ops) - len(shown)} more kinds (--top 0 shows all)")
    if args.view:
        from agent.cli.models_view import view

        return view(path, args.port, browser=not args.no_browser)
    return 0
