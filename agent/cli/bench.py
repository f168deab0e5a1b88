"""`edge-agent bench --model FILE`: time a model on every usable provider and thread count here.

Each row names the provider the session was verified to run on, so a CUDA row that quietly ran on the
CPU shows as such. Timing is warm and interleaved (see agent.device.autotune.measure).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from agent import __version__
from agent.cli.errors import FAILURE, USAGE, CliError
from agent.util.progress import ProgressBar

if TYPE_CHECKING:  # the CLI imports every verb at start: onnxruntime and numpy load only when bench runs
    import numpy as np

    from agent.config.profile import RuntimeConfig
    from agent.device import hardware
    from agent.device.autotune import Trial

CPU = "CPUExecutionProvider"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bench",
        help="time a model on each usable provider",
        description="Time a model on each usable execution provider and thread count.",
    )
    p.add_argument("--model", required=True, metavar="FILE", help="an .onnx or .ort file")
    p.add_argument(
        "--providers",
        nargs="+",
        metavar="NAME",
        help="providers to time, e.g. cpu openvino openvino:GPU cuda (default: all usable here)",
    )
    p.add_argument(
        "--threads", nargs="+", type=int, metavar="N", help="thread counts (default: 1, half and all physical cores)"
    )
    p.add_argument(
        "--runs", type=int, default=30, metavar="N", help="timed runs per provider and thread count (default 30)"
    )
    p.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed runs first (default 3)")
    p.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="INPUT=DIMS",
        help="input shape, e.g. x=1x3x480x640 (default: from the model, symbolic dims 1 for batch, else 224)",
    )
    p.add_argument("--json", dest="json_out", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--state-dir", metavar="DIR", help="where provider caches go (default: a temporary dir)")
    p.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="also register this profile's runtime.custom_ops libraries (those installed beside a registry "
        "model always are)",
    )
    p.set_defaults(handler=run)


def parse_shapes(items: list[str]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for item in items:
        name, _, dims = item.partition("=")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
            if not name or any(d < 1 for d in shape):
                raise ValueError
        except ValueError:
            raise CliError(f"--shape {item!r}: expected INPUT=DIMS like x=1x3x480x640", USAGE) from None
        shapes[name] = shape
    return shapes


def parse_providers(names: list[str]) -> RuntimeConfig:
    from agent.config.runtime import ProviderChoice, RuntimeConfig
    from agent.device.providers import canonical_provider

    choices = []
    for raw in names:
        name, _, device = raw.partition(":")
        try:
            full = canonical_provider(name)
        except ValueError as exc:
            raise CliError(str(exc), USAGE) from None
        choices.append(ProviderChoice(name=full, options={"device_type": device.upper()} if device else {}))
    return RuntimeConfig(providers=tuple(choices))


def _libraries(model: Path, profile: Path | None) -> tuple[Path, ...]:
    """The custom-op libraries a session for `model` registers (agent.device.customops), proven here: those
    installed with a registry model, and the profile's `runtime.custom_ops`; a model whose custom domains
    none of them provides is refused with the reason the agent gives."""
    from agent.config.errors import ProfileError
    from agent.config.profile import load_profile
    from agent.device import compat, customops

    try:
        listed = load_profile(profile).runtime.custom_ops if profile is not None else ()
    except ProfileError as exc:
        raise CliError(str(exc).splitlines()[0], USAGE) from None
    try:
        libraries = customops.session_libraries(model, listed)
        header = compat.read_header(model)
    except customops.CustomOpsError as exc:
        raise CliError(f"--model {model}: {exc}", USAGE) from None
    except compat.ModelFormatError:  # not an ONNX protobuf (an .ort file): the preflight load judges
        return libraries
    caps = customops.loadable_caps(compat.installed_caps(), model, listed)
    reason = compat.refusal(caps, model.name, header.ir_version, header.opsets)
    if reason:
        raise CliError(f"--model {model}: {reason}", USAGE)
    return libraries


def _inputs(model: Path, shapes: dict[str, tuple[int, ...]], libraries: tuple[Path, ...]) -> dict[str, np.ndarray]:
    """Preflight: the model must load on the CPU provider, or it is bad input rather than a provider problem."""
    import numpy as np
    import onnxruntime as ort

    from agent.device.autotune import synth_inputs
    from agent.device.build import one_line
    from agent.device.customops import register

    options = ort.SessionOptions()
    register(options, libraries)
    try:
        session = ort.InferenceSession(str(model), options, providers=[CPU])
    except Exception as exc:  # noqa: BLE001 (onnxruntime's load errors derive from Exception only)
        raise CliError(f"{model}: not a model this onnxruntime can load ({one_line(exc)})", USAGE) from None
    names = {i.name for i in session.get_inputs()}
    unknown = sorted(set(shapes) - names)
    if unknown:
        raise CliError(f"--shape: the model has no input {unknown[0]!r} (inputs: {', '.join(sorted(names))})", USAGE)
    inputs = synth_inputs(session)
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        dtype = inputs[name].dtype
        inputs[name] = (
            rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating) else np.zeros(shape, dtype)
        )
    return inputs


def run(args: argparse.Namespace) -> int:
    from agent.config.profile import RuntimeConfig
    from agent.device import hardware
    from agent.device.autotune import cpu_bound, measure, thread_options
    from agent.device.providers import rank

    model = Path(args.model)
    if not model.is_file():
        raise CliError(f"--model {model}: no such file", USAGE)
    if args.runs < 1 or args.warmup < 0 or any(t < 1 for t in args.threads or []):
        raise CliError("--runs and --threads take numbers > 0, --warmup a number >= 0", USAGE)
    runtime = parse_providers(args.providers) if args.providers else RuntimeConfig()
    shapes = parse_shapes(args.shape)
    found = hardware.probe("/")
    ranking = rank(runtime, found)
    usable = [c for c in ranking.kept if not (args.providers and c.provider == CPU and not c.requested)]
    skipped = [c for c in ranking.dropped if c.requested or not args.providers]
    if args.providers:
        for c in skipped:
            print(f"bench: {c.label}: not usable: {c.reason}", file=sys.stderr)
    if not usable:
        raise CliError("none of the providers asked for is usable here", FAILURE)
    threads = args.threads or thread_options(found)
    libraries = _libraries(model, args.profile)
    inputs = _inputs(model, shapes, libraries)
    shapes_text = ", ".join(f"{k} {'x'.join(map(str, v.shape))}" for k, v in inputs.items())
    print(
        f"bench: {model.name} ({shapes_text}) on onnxruntime {found.runtime.version}, {found.cpu.model} "
        f"({found.cpu.physical_cores} cores), {args.warmup} warm-up + {args.runs} timed runs each, in turns",
        file=sys.stderr,
    )
    for library in libraries:
        print(f"bench: custom-op library {library}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="edge-agent-bench-") as tmp:
        state_dir = Path(args.state_dir) if args.state_dir else Path(tmp)
        # Thread counts matter to CPU-bound providers only; a GPU provider is timed once.
        configs = [(c, t) for c in usable for t in (threads if cpu_bound(c) else [max(threads)])]
        started = time.monotonic()
        bar = ProgressBar("bench")
        trials = measure(
            model, configs, state_dir, inputs, runs=args.runs, warmup=args.warmup, progress=bar, libraries=libraries
        )
    print_table(trials)
    doc = results(model, found, inputs, trials, args, time.monotonic() - started)
    doc["custom_ops"] = [str(library) for library in libraries]
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if any(t.ok for t in trials) else FAILURE


def print_table(trials: list[Trial], out: TextIO = sys.stdout) -> None:
    rows = [("provider", "threads", "verified on", "p50 ms", "p95 ms", "inf/s")]
    for t in trials:
        if t.ok:
            rows.append(
                (
                    t.label,
                    str(t.threads),
                    t.verified or "?",
                    f"{t.p50_ms:.2f}",
                    f"{t.p95_ms:.2f}",
                    f"{t.throughput:.1f}",
                )
            )
        else:
            rows.append((t.label, str(t.threads), f"not usable: {t.error}", "-", "-", "-"))
    widths = [max(len(r[i]) for r in rows if not r[2].startswith("not usable") or i != 2) for i in range(6)]
    for r in rows:
        if r[2].startswith("not usable"):
            print(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]}", file=out)
        else:
            print(
                f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:>{widths[3]}}  {r[4]:>{widths[4]}}  {r[5]:>{widths[5]}}",
                file=out,
            )
    good = [t for t in trials if t.ok]
    if good:
        best = min(good, key=lambda t: t.p50_ms)
        cpu = [t for t in good if t.provider == CPU]
        ratio = ""
        if cpu and best.provider != CPU:
            ratio = f", {min(c.p50_ms for c in cpu) / best.p50_ms:.2f}x the CPU provider's best p50"
        print(
            f"fastest: {best.label} with {best.threads} thread{'s' if best.threads > 1 else ''}, p50 {best.p50_ms:.2f} ms{ratio}",
            file=out,
        )


def results(
    model: Path,
    found: hardware.Probe,
    inputs: dict[str, np.ndarray],
    trials: list[Trial],
    args: argparse.Namespace,
    seconds: float,
) -> dict[str, Any]:
    return {
        "edge_agent": __version__,
        "model": str(model),
        "onnxruntime": found.runtime.version,
        "fingerprint": found.fingerprint(),
        "cpu": found.cpu.model,
        "inputs": {k: list(v.shape) for k, v in inputs.items()},
        "runs": args.runs,
        "warmup": args.warmup,
        "seconds": round(seconds, 2),
        "trials": [_clean(t.summary()) for t in trials],
    }


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}
