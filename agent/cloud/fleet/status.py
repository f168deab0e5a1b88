"""`fleet status`: read every retained status, health, report and deploy message, and tabulate them.

The read ends when the retained burst is in (`Inventory.sync`), not after a guessed time. `fleet_state()`
is also what `--json` prints, so its keys are a contract: the TypedDicts below (and those of
`agent.cloud.fleet.summary` for the tables per group and per version). The text tables show what devices
wrote through `printable` (escapes neutralised, long strings cut); `--json` escapes by itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TypedDict

from agent.cloud.fleet.client import BrokerSettings
from agent.cloud.fleet.inventory import SETTLE, Device, Unreadable, connected
from agent.cloud.fleet.summary import GroupModel, VersionVitals, group_table, version_table
from agent.models.deploy import MAX_ORDER_BYTES
from agent.util import jsonlimits
from agent.util.printable import printable


class DeviceState(TypedDict):
    device: str
    state: str | None
    group: str | None
    models: dict[str, dict[str, str]]  # name -> version, provider, digest (as the device reports them)
    providers: list[str]
    health_ts: str | None  # as the device wrote it
    health_age_s: float | None
    outbox_depth: int | None
    agent_version: str | None  # as the device's status says
    report: dict[str, object] | None  # the device's last report (its signature is not checked here)


class _OrderTopic(TypedDict):
    topic: str


class OrderState(_OrderTopic, total=False):
    """A retained order as it says it is (its signature is the devices' business): either `error`,
    or the order's fields as it wrote them, unchecked (and `canary` on a canary's device order)."""

    error: str
    id: object
    model: object
    version: object
    target: object
    issued: object
    expires: object
    canary: object


class Refused(TypedDict):
    """Device messages left out because they break the contract or the fleet's checks: how many, and the
    first few as `topic: why`."""

    count: int
    first: list[str]


class FleetState(TypedDict):
    prefix: str
    devices: list[DeviceState]
    orders: list[OrderState]
    groups: list[GroupModel]
    versions: list[VersionVitals]
    refused: Refused


def fleet_state(
    settings: BrokerSettings, prefix: str = "edge", group: str | None = None, settle: float = SETTLE
) -> FleetState:
    with connected(settings, prefix, ("status", "health", "report", "deploy"), settle) as inventory:
        pass  # every retained message, read until the marker came back
    now = datetime.now(timezone.utc)
    chosen = [
        dev for dev in sorted(inventory.devices.values(), key=lambda d: d.id) if group is None or dev.group == group
    ]
    orders = [_order_state(t, p) for t, p in sorted(inventory.orders.items())]
    if group is not None:
        targets = {f"group:{group}", *(f"device:{d.id}" for d in chosen)}
        # `in` a set hashes the target: an order's target that is a list raised TypeError here
        orders = [o for o in orders if isinstance(o.get("target"), str) and o.get("target") in targets]
    group_orders = {
        (str(o["target"]).removeprefix("group:"), str(o.get("model"))): str(o.get("version"))
        for o in orders
        if "error" not in o and str(o.get("target", "")).startswith("group:")
    }
    return {
        "prefix": prefix,
        "devices": [_device_state(dev, now) for dev in chosen],
        "orders": orders,
        "groups": group_table(chosen, group_orders),
        "versions": version_table(chosen),
        "refused": {"count": inventory.refused, "first": list(inventory.refusals)},
    }


def _device_state(dev: Device, now: datetime) -> DeviceState:
    seen = dev.health_time()
    return {
        "device": dev.id,
        "state": dev.state,
        "group": dev.group,
        "models": {
            name: {"version": m.version, "provider": m.provider, **({"digest": m.digest} if m.digest else {})}
            for name, m in dev.models().items()
        },
        "providers": dev.providers(),
        "health_ts": dev.health.ts if dev.health is not None else None,
        "health_age_s": None if seen is None else round((now - seen).total_seconds(), 1),
        "outbox_depth": dev.outbox_depth(),
        "agent_version": dev.status.version if dev.status is not None else None,
        "report": dev.report.report.model_dump(mode="json", exclude_none=True) if dev.report is not None else None,
    }


def _order_state(topic: str, payload: object) -> OrderState:
    if isinstance(payload, Unreadable):
        return {"topic": topic, "error": f"not a deployment order ({payload.error})"}
    doc: object = None
    if isinstance(payload, dict) and isinstance(payload.get("order"), str):
        try:
            doc = jsonlimits.loads(payload["order"], max_bytes=MAX_ORDER_BYTES)
        except jsonlimits.JSONLimitError:
            doc = None
    if not isinstance(doc, dict):
        return {"topic": topic, "error": "not a deployment order"}
    out: OrderState = {
        "topic": topic,
        "id": doc.get("id"),
        "model": doc.get("model"),
        "version": doc.get("version"),
        "target": doc.get("target"),
        "issued": doc.get("issued"),
        "expires": doc.get("expires"),
    }
    if doc.get("canary"):
        out["canary"] = doc["canary"]
    return out


def short_provider(provider: object) -> str:
    """`CUDAExecutionProvider` -> `CUDA`: the table columns stay narrow."""
    name = printable(provider or "?")
    return name.removesuffix("ExecutionProvider") or name


# A health stamped further ahead than this is the device's clock, not a fresh report: shown as such, or a
# device whose clock said 2099 looked `0s ago` however long it had been silent.
CLOCK_SLACK_S = 60


def human_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < -CLOCK_SLACK_S:
        return f"{_span(-seconds)} in the future"
    return f"{_span(max(0.0, seconds))} ago"


def _span(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}min"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Columns padded to their widest cell; a cell is shown `printable` (callers cut device strings)."""
    shown = [[printable(c, None) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in shown) for i in range(len(shown[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in shown]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def group_rows(state: FleetState) -> list[tuple[str, ...]]:
    """Per group and model: group, model, latest, devices, on latest, in progress, held, failed, offline,
    behind (the table and the page share the cells, each with its own headers)."""
    return [
        (
            printable(g["group"]),
            printable(g["model"]),
            printable(g["latest"]),
            *(str(g[k]) for k in ("devices", "on_latest", "in_progress", "held", "failed", "offline", "behind")),
        )
        for g in state["groups"]
    ]


def version_rows(state: FleetState) -> list[tuple[str, ...]]:
    """Per model version: model, version, devices, error-free hours, p95 ms (median and p95 across the
    devices), fallbacks, drops, errors."""
    return [
        (
            printable(v["model"]),
            printable(v["version"]),
            str(v["devices"]),
            f"{v['error_free_h']:.1f}",
            _ms(v["p95_ms_median"]),
            _ms(v["p95_ms_p95"]),
            str(v["fallbacks"]),
            str(v["drops"]),
            str(v["errors"]),
        )
        for v in state["versions"]
    ]


def render_summary(state: FleetState) -> list[str]:
    """The tables per group and model, and per model version."""
    lines: list[str] = []
    if state["groups"]:
        rows: list[tuple[str, ...]] = [
            ("GROUP", "MODEL", "LATEST", "DEVICES", "ON-LATEST", "IN-PROGRESS", "HELD", "FAILED", "OFFLINE", "BEHIND")
        ]
        rows += group_rows(state)
        lines += ["", *table(rows)]
    if state["versions"]:
        vrows: list[tuple[str, ...]] = [
            ("MODEL", "VERSION", "DEVICES", "ERROR-FREE-H", "P95-MS", "P95-MS(P95)", "FALLBACKS", "DROPS", "ERRORS")
        ]
        vrows += version_rows(state)
        lines += ["", *table(vrows)]
    return lines


def models_cell(models: dict[str, dict[str, str]]) -> str:
    """`name version, ...` of one device, each as `printable` (the text table and the page)."""
    return ", ".join(f"{printable(k)} {printable(v.get('version', '?'))}" for k, v in sorted(models.items())) or "-"


def render_status(state: FleetState) -> str:
    rows = [("DEVICE", "STATE", "GROUP", "MODELS", "PROVIDER", "HEALTH", "OUTBOX")]
    for d in state["devices"]:
        rows.append(
            (
                d["device"],
                d["state"] or "?",
                d["group"] or "?",
                models_cell(d["models"]),
                ", ".join(short_provider(p) for p in d["providers"]) or "-",
                human_age(d["health_age_s"]),
                "-" if d["outbox_depth"] is None else str(d["outbox_depth"]),
            )
        )
    lines = table(rows)
    if len(rows) == 1:
        lines.append(f"(no device seen on {state['prefix']}/+/status or {state['prefix']}/+/health)")
    lines += render_summary(state)
    if state["orders"]:
        lines.append("")
        lines.append("retained deployment orders (signatures are checked by the devices):")
        for o in state["orders"]:
            if "error" in o:
                lines.append(f"  {printable(o['topic'])}: {printable(o['error'])}")
            else:
                canary = " (canary)" if o.get("canary") else ""
                said = {k: printable(o.get(k)) for k in ("model", "version", "target", "issued", "expires", "id")}
                lines.append(
                    f"  {printable(o['topic'])}: {said['model']} {said['version']} -> {said['target']}{canary}, "
                    f"issued {said['issued']}, expires {said['expires']}, id {said['id']}"
                )
    refused = state["refused"]
    if refused["count"]:
        lines += ["", f"{refused['count']} message(s) from devices refused (the first {len(refused['first'])}):"]
        lines += [f"  {line}" for line in refused["first"]]
    return "\n".join(lines)
