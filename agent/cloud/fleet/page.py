"""`fleet status --html FILE`: the fleet state as one static page, no script, no server: open it, mail it,
or let a web server publish the file a timer rewrites."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from html import escape

from agent.cloud.fleet.status import FleetState, group_rows, human_age, models_cell, short_provider, version_rows

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{padding:.2em .7em;border-bottom:1px solid #ddd;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
th{background:#f3f3f3}
"""


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], numeric: frozenset[int] = frozenset()) -> str:
    out = ["<table><tr>", *(f"<th>{escape(h)}</th>" for h in head), "</tr>"]
    for row in rows:
        out.append("<tr>")
        for i, cell in enumerate(row):
            cls = ' class="n"' if i in numeric else ""
            out.append(f"<td{cls}>{escape(cell)}</td>")
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def render_page(state: FleetState, now: datetime | None = None) -> str:
    """The whole page: per group and model, per version, then every device."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y-%m-%d %H:%M:%SZ")
    groups = _table(
        ("group", "model", "latest", "devices", "on latest", "in progress", "held", "failed", "offline", "behind"),
        group_rows(state),
        frozenset(range(3, 10)),
    )
    versions = _table(
        (
            "model",
            "version",
            "devices",
            "error-free hours",
            "p95 ms (median)",
            "p95 ms (p95)",
            "fallbacks",
            "drops",
            "errors",
        ),
        version_rows(state),
        frozenset(range(2, 9)),
    )
    devices = _table(
        ("device", "state", "group", "models", "provider", "health", "outbox"),
        [
            (
                d["device"],
                d["state"] or "?",
                d["group"] or "?",
                models_cell(d["models"]),
                ", ".join(short_provider(p) for p in d["providers"]) or "-",
                human_age(d["health_age_s"]),
                "-" if d["outbox_depth"] is None else str(d["outbox_depth"]),
            )
            for d in state["devices"]
        ],
        frozenset({6}),
    )
    title = f"edge-agent fleet ({escape(state['prefix'])}): {len(state['devices'])} devices"
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{STYLE}</style></head><body><h1>{title}</h1><p>read {stamp} from the broker's retained topics</p>"
        f"<h2>Groups</h2>{groups}<h2>Versions</h2>{versions}<h2>Devices</h2>{devices}</body></html>\n"
    )
