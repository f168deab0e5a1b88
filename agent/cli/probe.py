"""`edge-agent probe [--json]`: the hardware found, the onnxruntime build it wants, and the provider ranking.

The JSON output is a contract (docs/probe.md, checked by tests/test_cli_probe_bench.py). The choice of
onnxruntime build (`install_plan`) is also what scripts/install.sh and images/Dockerfile install: it needs
only the standard library, so it runs before the agent's dependencies are there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from agent import __version__
from agent.cli.errors import USAGE, CliError

if TYPE_CHECKING:  # the CLI imports every verb at start: onnxruntime loads only when probe runs
    from agent.config.profile import RuntimeConfig
    from agent.device import hardware
    from agent.device.providers import Ranking

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class RuntimeBuild:
    """An onnxruntime build: the pip distribution that provides the `onnxruntime` module."""

    name: str
    distribution: str
    requirement: str  # what install.sh installs; "" = the project's own onnxruntime requirement
    arch: str | None = None  # the one architecture it has wheels for
    index_url: str | None = None


# NVIDIA's pip index for JetPack 6 (L4T 36, CUDA 12.6): docs/getting-started-jetson.md.
JETSON_INDEX = {"36": "https://pypi.jetson-ai-lab.io/jp6/cu126"}
BUILDS = {
    b.name: b
    for b in (
        RuntimeBuild("cpu", "onnxruntime", ""),
        RuntimeBuild("openvino", "onnxruntime-openvino", "onnxruntime-openvino>=1.18,<2", "x86_64"),
        RuntimeBuild("cuda", "onnxruntime-gpu", "onnxruntime-gpu>=1.18,<2", "x86_64"),
        RuntimeBuild("jetson", "onnxruntime-gpu", "onnxruntime-gpu>=1.18,<2", "aarch64"),
    )
}
# Every distribution that ships the `onnxruntime` module: only one may be installed in an environment.
DISTRIBUTIONS = (
    "onnxruntime",
    "onnxruntime-openvino",
    "onnxruntime-gpu",
    "onnxruntime-directml",
    "onnxruntime-qnn",
    "onnxruntime-rocm",
    "onnxruntime-migraphx",
)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "probe",
        help="show hardware and execution providers",
        description="Probe the hardware and rank ONNX Runtime execution providers.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output (see docs/probe.md)")
    p.add_argument("--profile", metavar="FILE", help="rank with this profile's runtime settings")
    p.add_argument(
        "--verify",
        action="store_true",
        help="open a tiny model down the ranking and report the provider that really runs it",
    )
    p.add_argument(
        "--root",
        default="/",
        metavar="DIR",
        help="read /proc, /sys, /dev and /etc under DIR instead of / (captured device trees)",
    )
    p.add_argument(
        "--state-dir", metavar="DIR", help="state dir for the disk figure and caches (default: the profile's)"
    )
    p.set_defaults(handler=run)


def load_runtime(profile_path: str | None) -> tuple[RuntimeConfig, Path | None]:
    """The profile's runtime section and state dir; defaults without a profile. Bad profile: exit 2."""
    from agent.config.errors import ProfileError
    from agent.config.profile import RuntimeConfig, load_profile

    if not profile_path:
        return RuntimeConfig(), None
    try:
        profile = load_profile(profile_path)
    except ProfileError as exc:
        more = f" (and {len(exc.issues) - 1} more problems; see edge-agent check)" if len(exc.issues) > 1 else ""
        raise CliError(f"{exc.issues[0]}{more}", USAGE) from None
    return profile.runtime, profile.device.state_dir


def report(
    probe: hardware.Probe,
    runtime: RuntimeConfig,
    ranking: Ranking,
    state_dir: Path | None,
    verified: dict[str, Any] | None,
) -> dict[str, Any]:
    """The `probe --json` document (schema in docs/probe.md)."""
    from agent.device.providers import thread_count

    doc: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "edge_agent": __version__}
    doc.update(probe.to_dict())
    doc["runtime"].update(runtime_build_report(probe))
    doc["settings"] = {
        "providers": "auto"
        if runtime.providers == "auto"
        else [{"name": c.name, "options": dict(c.options)} for c in runtime.providers],
        "threads": thread_count(runtime, probe),
        "autotune": runtime.autotune,
        "require_accelerator": runtime.require_accelerator,
        "state_dir": str(state_dir) if state_dir else None,
    }
    doc["ranking"] = [c.to_dict() for c in ranking.candidates]
    doc["notes"] = list(ranking.notes)
    doc["verified"] = verified
    return doc


def verify_chain(runtime: RuntimeConfig, state_dir: Path, probe: hardware.Probe) -> dict[str, Any]:
    from agent.device.onnxproto import add_relu_model
    from agent.device.session import ProviderError, open_session
    from agent.transport.events import Event

    events: list[Event] = []
    # Autotune is for real models; the probe model would only time noise.
    plain = dataclasses.replace(runtime, autotune=False)
    try:
        opened = open_session(add_relu_model(), plain, state_dir, events.append, probe=probe)
    except ProviderError as exc:
        return {
            "provider": None,
            "providers": [],
            "assignment": None,
            "threads": None,
            "options": {},
            "fallbacks": [
                {"provider": e.fields["provider"], "reason": e.fields["reason"]}
                for e in events
                if e.type == "provider.fallback"
            ],
            "error": str(exc),
        }
    return {
        "provider": opened.provider,
        "providers": list(opened.providers),
        "assignment": opened.assignment,
        "threads": opened.threads,
        "options": opened.options,
        "fallbacks": [{"provider": p, "reason": r} for p, r in opened.fallbacks],
        "error": None,
    }


# ---- the onnxruntime build: installed, recorded by install.sh, wanted by this hardware --------------


def installed_distributions() -> list[tuple[str, str]]:
    """(distribution, version) of each onnxruntime build installed here, from package metadata (no import)."""
    found = []
    for name in DISTRIBUTIONS:
        try:
            found.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            continue
    return found


def build_of(distribution: str, arch: str) -> str:
    if distribution == "onnxruntime-gpu":
        return "jetson" if arch == "aarch64" else "cuda"
    return next((b.name for b in BUILDS.values() if b.distribution == distribution), distribution)


def recorded_build() -> str | None:
    """The build scripts/install.sh recorded for this virtualenv (`runtime=` in <prefix>/.installed), kept
    by upgrades; None outside such an install."""
    try:
        stamp = (Path(sys.prefix).parent / ".installed").read_text()
    except OSError:
        return None
    found = re.search(r"\bruntime=([a-z]+)", stamp)
    return found.group(1) if found else None


def wanted_build(probe: hardware.Probe) -> tuple[str, str]:
    """The build that unlocks what the probe found, and why. Decided from facts, not measured: the
    OpenVINO and GPU builds keep the CPU provider, and autotune measures the providers on each model
    (docs/probe.md, "Which onnxruntime build")."""
    cpu = probe.cpu
    if probe.jetson is not None and cpu.arch == "aarch64":
        j = probe.jetson
        return "jetson", (
            f"{j.module} (L4T {j.l4t or '?'}): NVIDIA's onnxruntime-gpu for JetPack has the TensorRT and CUDA "
            "providers; the PyPI wheel for aarch64 runs on the CPU only"
        )
    gpu = next((a for a in probe.accelerators if a.vendor == "nvidia" and a.kind == "gpu"), None)
    if gpu is not None and cpu.arch == "x86_64":
        driver = f" (driver {gpu.details['driver_version']})" if gpu.details.get("driver_version") else ""
        return "cuda", (
            f"{gpu.name}{driver}: onnxruntime-gpu has the CUDA and TensorRT providers (it needs the CUDA 12 "
            "and cuDNN 9 libraries) and keeps the CPU provider"
        )
    if cpu.arch == "x86_64":
        intel = [a.kind.upper() for a in probe.accelerators if a.vendor == "intel" and a.kind in ("gpu", "npu")]
        simd = next((f for f in ("avx512f", "avx2") if f in cpu.flags), None)
        if simd is None and not intel:
            return "cpu", f"{cpu.vendor} x86-64 CPU without AVX2: OpenVINO's CPU plugin has no measured gain here"
        found = f"{cpu.vendor} x86-64 CPU" + (f" with {simd}" if simd else "")
        if intel:
            found += f" and the Intel {' and '.join(intel)}, which only OpenVINO reaches"
        return "openvino", (
            f"{found}: onnxruntime-openvino adds OpenVINO's CPU plugin (1.34-1.45x the CPU provider on the "
            "PP-OCR text detector on an AVX-512 EPYC) and keeps the CPU provider; autotune measures both on "
            "each model"
        )
    return "cpu", f"{cpu.arch} {cpu.model}: the PyPI onnxruntime wheel (CPU provider) is the build for this device"


def _requirement(build: RuntimeBuild) -> str:
    if build.requirement:
        return build.requirement
    own = [r for r in _requires() if _name(r) == "onnxruntime"]
    return own[0] if own else "onnxruntime"


def _requires() -> list[str]:
    try:
        return list(metadata.requires("edge-agent") or [])
    except metadata.PackageNotFoundError:  # run from a checkout on PYTHONPATH
        return []


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ ;\[(]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def _index_url(build: RuntimeBuild, probe: hardware.Probe) -> str | None:
    if build.name != "jetson":
        return build.index_url
    l4t = probe.jetson.l4t if probe.jetson else None
    return JETSON_INDEX.get((l4t or "").split(".")[0])


def install_plan(runtime: str, extras: str = "", root: str = "/") -> dict[str, Any]:
    """What to pip-install for the onnxruntime build `runtime` (a name in BUILDS, or `auto`) here.

    `dependencies`: the agent's other requirements (with `extras`), `remove`: the builds installed now
    that must go first. Raises ValueError for an unknown build or one without wheels for this CPU.
    """
    from agent.device import hardware

    probe = hardware.probe(root, runtime=hardware.RuntimeInfo(version="", available=()))
    if runtime == "auto":
        name, reason = wanted_build(probe)
    elif runtime in BUILDS:
        name, reason = runtime, "named with --runtime"
    else:
        raise ValueError(f"unknown onnxruntime build '{runtime}' (auto, {', '.join(BUILDS)})")
    build = BUILDS[name]
    if build.arch is not None and build.arch != probe.cpu.arch:
        raise ValueError(f"{build.distribution} ({name}) has wheels for {build.arch} only; this is {probe.cpu.arch}")
    wanted_extras = {e.strip() for e in extras.split(",") if e.strip()}
    dependencies = []
    for req in _requires():
        spec, _, marker = req.partition(";")
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", marker)
        if _name(spec) == "onnxruntime" or (extra and extra.group(1) not in wanted_extras):
            continue
        dependencies.append(spec.strip() if extra else req.strip())
    return {
        "build": name,
        "reason": reason,
        "requirement": _requirement(build),
        "index_url": _index_url(build, probe),
        "dependencies": dependencies,
        "remove": [d for d, _v in installed_distributions() if d != build.distribution],
    }


def print_install_plan(argv: list[str]) -> int:
    """`python -I -c '...print_install_plan(sys.argv[1:])' BUILD [EXTRAS]`, for the install scripts: the
    plan as `key=value` lines (`dependency=` and `remove=` once per item); a refusal on stderr, exit 2."""
    try:
        plan = install_plan(argv[0], argv[1] if len(argv) > 1 else "")
    except (ValueError, IndexError) as exc:
        print(exc, file=sys.stderr)
        return 2
    for key in ("build", "reason", "requirement", "index_url"):
        print(f"{key}={plan[key] or ''}")
    print(
        "".join(f"dependency={d}\n" for d in plan["dependencies"]) + "".join(f"remove={d}\n" for d in plan["remove"]),
        end="",
    )
    return 0


def runtime_build_report(probe: hardware.Probe) -> dict[str, Any]:
    """The probe's words on the build: installed, recorded by install.sh, and wanted here (with how)."""
    installed = installed_distributions()
    arch = probe.cpu.arch
    if len(installed) == 1:
        build = build_of(installed[0][0], arch)
    else:
        build = "unknown" if not installed else "mixed"  # mixed: two builds over one module; reinstall one
    name, reason = wanted_build(probe)
    wanted = BUILDS[name]
    index = _index_url(wanted, probe)
    remove = [d for d, _v in installed if d != wanted.distribution]
    pip = (f"pip uninstall -y {' '.join(remove)} && " if remove else "") + f"pip install '{_requirement(wanted)}'"
    return {
        "build": build,
        "distributions": [f"{d} {v}" for d, v in installed],
        "recorded": recorded_build(),
        "wanted": {
            "build": name,
            "reason": reason,
            "install": f"sudo scripts/install.sh --runtime {name}",
            "pip": pip + (f" --index-url {index}" if index else ""),
        },
    }


def run(args: argparse.Namespace) -> int:
    from agent.device import hardware
    from agent.device.providers import rank

    runtime, profile_state = load_runtime(args.profile)
    if not Path(args.root).is_dir():
        raise CliError(f"--root {args.root}: not a directory", USAGE)
    state_dir = Path(args.state_dir) if args.state_dir else profile_state
    found = hardware.probe(args.root, state_dir=state_dir)
    ranking = rank(runtime, found)
    verified = None
    if args.verify:
        with tempfile.TemporaryDirectory(prefix="edge-agent-probe-") as tmp:
            verified = verify_chain(runtime, state_dir or Path(tmp), found)
    doc = report(found, runtime, ranking, state_dir, verified)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_text(doc)
    return 1 if verified and verified["error"] else 0


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 1024**3:.1f} GiB"


def print_text(doc: dict[str, Any], out: TextIO = sys.stdout) -> None:
    def line(key: str, value: str) -> None:
        print(f"  {key + ':':<14}{value}", file=out)

    cpu = doc["cpu"]
    print(f"Hardware (read under {doc['root']})", file=out)
    line("board", doc["board"] or "unknown")
    mhz = f", {cpu['max_mhz']} MHz" if cpu["max_mhz"] else ""
    line(
        "cpu",
        f"{cpu['model']} ({cpu['vendor']}, {cpu['arch']}): {cpu['physical_cores']} cores, "
        f"{cpu['logical_cores']} threads{mhz}; {' '.join(cpu['flags']) or 'no SIMD flags found'}",
    )
    mem = doc["memory"]
    line("memory", f"{_gib(mem['total_bytes'])} total, {_gib(mem['available_bytes'])} available" if mem else "unknown")
    disk = doc["disk"]
    if disk:
        line("state disk", f"{disk['path']}: {_gib(disk['free_bytes'])} free of {_gib(disk['total_bytes'])}")
    zones = [f"{z['type']} {z['celsius']:.1f} C" for z in doc["thermal"] if z["celsius"] is not None]
    line("thermal", ", ".join(zones) or "no thermal zones")
    if doc["jetson"]:
        j = doc["jetson"]
        line("jetson", f"{j['module']}, L4T {j['l4t'] or '?'}, {j['soc'] or '?'}")
    if not doc["accelerators"]:
        line("accelerators", "none found")
    for a in doc["accelerators"]:
        bits = [
            b
            for b in (
                a["driver"] and f"driver {a['driver']}",
                a["details"].get("driver_version"),
                a["memory_bytes"] and _gib(a["memory_bytes"]),
                ", ".join(a["nodes"]),
            )
            if b
        ]
        line(a["kind"], f"{a['name']}" + (f" ({'; '.join(bits)})" if bits else ""))
    rt = doc["runtime"]
    print(f"Runtime: onnxruntime {rt['version']}, built with {', '.join(rt['available'])}", file=out)
    recorded = f"; install.sh keeps {rt['recorded']}" if rt["recorded"] else ""
    line("build", f"{rt['build']} ({', '.join(rt['distributions']) or 'no package metadata'}){recorded}")
    want = rt["wanted"]
    mark = " (installed)" if want["build"] == rt["build"] else ""
    line("wanted", f"{want['build']}{mark}: {want['reason']}")
    if not mark:
        line("to install", f"{want['install']}; in a virtualenv: {want['pip']}")
    for d in rt["ep_devices"]:
        line("ep device", f"{d['ep']} on {d['device_type']} ({d['device_vendor']})")
    s = doc["settings"]
    providers = s["providers"] if s["providers"] == "auto" else ", ".join(p["name"] for p in s["providers"])
    print(
        f"Ranking (providers: {providers}; {s['threads']} threads"
        f"{'; accelerator required' if s['require_accelerator'] else ''}):",
        file=out,
    )
    n = 0
    for c in doc["ranking"]:
        label = c["provider"] + (f"[{c['options']['device_type']}]" if "device_type" in c["options"] else "")
        if c["kept"]:
            n += 1
        mark = f"{n}." if c["kept"] else "-"
        print(f"  {mark:<3} {label:<36} {'kept' if c['kept'] else 'dropped'}: {c['reason']}", file=out)
    for note in doc["notes"]:
        print(f"  note: {note}", file=out)
    v = doc["verified"]
    if v is not None:
        for f in v["fallbacks"]:
            print(f"  fell back from {f['provider']}: {f['reason']}", file=out)
        if v["error"]:
            print(f"Verified: FAILED: {v['error']}", file=out)
        else:
            share = ""
            if v["assignment"]:
                total = sum(v["assignment"].values())
                share = " (" + ", ".join(f"{p}: {k}/{total} nodes" for p, k in v["assignment"].items()) + ")"
            print(f"Verified: a test model runs on {v['provider']}{share}", file=out)
    print(f"Fingerprint: {doc['fingerprint']}", file=out)
