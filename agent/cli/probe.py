"""`edge-agent probe [--json]`: the hardware found and the provider ranking, with reasons.

The JSON output is a contract (docs/probe.md, checked by tests/test_cli_probe_bench.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from agent import __version__
from agent.cli.errors import USAGE, CliError

if TYPE_CHECKING:  # the CLI imports every verb at start: onnxruntime loads only when probe runs
    from agent.config.profile import RuntimeConfig
    from agent.device import hardware
    from agent.device.providers import Ranking

SCHEMA_VERSION = 1


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

    doc = {"schema_version": SCHEMA_VERSION, "edge_agent": __version__}
    doc.update(probe.to_dict())
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
    plain = runtime.model_copy(update={"autotune": False})
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
