"""`fleet rollout status|list`: a rollout as the controller's state file has it, as JSON and as text.

Reasons and events hold what devices wrote (a refusal's reason, a report's claims): the text view shows
them `printable`, so a reason of escape sequences does not reach the operator's terminal as such."""

from __future__ import annotations

import time
from collections import Counter
from typing import TypedDict

from agent.cloud.fleet.plan import RolloutSpec
from agent.cloud.fleet.state import Rollout, StateDB
from agent.cloud.fleet.status import table
from agent.util.printable import printable

SHOWN = 10  # failed devices and events listed in the text view


class WaveView(TypedDict):
    wave: int
    devices: int
    states: dict[str, int]


class RolloutView(TypedDict):
    id: str
    model: str
    version: str
    group: str
    state: str
    reason: str | None
    request: str | None
    wave: int
    waves: list[WaveView]
    states: dict[str, int]
    rollback: dict[str, int]
    failures: list[dict[str, str | None]]
    events: list[dict[str, object]]
    spec: dict[str, object]
    age_s: float


def view(db: StateDB, rollout: Rollout) -> RolloutView:
    targets = db.targets(rollout.id)
    waves: dict[int, Counter[str]] = {}
    for t in targets:
        waves.setdefault(t.wave, Counter())[t.state] += 1
    spec: RolloutSpec = rollout.spec
    return {
        "id": rollout.id,
        "model": spec.model,
        "version": spec.version,
        "group": spec.group,
        "state": rollout.state,
        "reason": rollout.reason,
        "request": rollout.request,
        "wave": rollout.wave,
        "waves": [
            {"wave": w, "devices": sum(c.values()), "states": dict(sorted(c.items()))} for w, c in sorted(waves.items())
        ],
        "states": dict(sorted(Counter(t.state for t in targets).items())),
        "rollback": dict(sorted(Counter(t.rb_state for t in targets if t.rb_state).items())),
        "failures": [
            {"device": t.device, "state": t.state, "reason": t.reason}
            for t in targets
            if t.state in ("failed", "timed-out")
        ],
        "events": [
            {"ts": ts, "device": device, "type": type_, "reason": reason}
            for ts, device, type_, reason in db.events(rollout.id)
        ],
        "spec": spec.to_json(),
        "age_s": round(time.time() - rollout.created, 1),
    }


def render(v: RolloutView) -> str:
    waves = len(v["waves"])
    where = f", wave {v['wave'] + 1} of {waves}" if v["state"] in ("running", "paused") and v["wave"] >= 0 else ""
    asked = f" ({v['request']} requested)" if v["request"] else ""
    lines = [f"rollout {v['id']}: {v['model']} {v['version']} -> group:{v['group']}: {v['state']}{where}{asked}"]
    if v["reason"]:
        lines.append(f"  {printable(v['reason'])}")
    for w in v["waves"]:
        states = ", ".join(f"{n} {s}" for s, n in w["states"].items())
        lines.append(f"  wave {w['wave'] + 1}: {w['devices']} device(s): {states}")
    if v["rollback"]:
        lines.append("  rollback: " + ", ".join(f"{n} {s}" for s, n in v["rollback"].items()))
    for f in v["failures"][:SHOWN]:
        lines.append(f"  {printable(f['device'])}: {f['state']}: {printable(f['reason'])}")
    if len(v["failures"]) > SHOWN:
        lines.append(f"  ... and {len(v['failures']) - SHOWN} more (--json lists them all)")
    for e in v["events"][-SHOWN:]:
        lines.append(f"  event {printable(e['type'])}: {printable(e['reason'])}")
    return "\n".join(lines)


def render_list(views: list[RolloutView]) -> str:
    if not views:
        return "(no rollouts)"
    rows = [("ROLLOUT", "MODEL", "VERSION", "GROUP", "STATE", "DEVICES", "PASSED", "FAILED")]
    for v in views:
        failed = v["states"].get("failed", 0) + v["states"].get("timed-out", 0)
        rows.append(
            (
                v["id"],
                v["model"],
                v["version"],
                v["group"],
                v["state"],
                str(sum(v["states"].values())),
                str(v["states"].get("passed", 0)),
                str(failed),
            )
        )
    return "\n".join(table(rows))
