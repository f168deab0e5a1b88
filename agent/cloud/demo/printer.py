"""The demo's output: a live table on stdout (a row a second, an event a line), notes on stderr."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from agent.cloud.demo.profile import MODEL, PIPELINE
from agent.cloud.demo.tally import Tally
from agent.cloud.fleet.status import short_provider
from agent.util.timefmt import parse_utc_iso

RECENT = 5.0  # seconds of results behind a row's latency percentiles
FPS_RESULTS = 15  # results behind a row's rate
BAD_EVENTS = ("refused", "error", "failed", "rolled_back", "lost", "dropped")


def _model(d: dict[str, Any]) -> str:
    return f"{d.get('model')} {d.get('version')}"


def _previous(d: dict[str, Any], text: str) -> str:
    return text.format(d["previous"]) if d.get("previous") else ""


# One line of text for each event the demo explains; any other prints its fields.
EVENT_TEXT: dict[str, Callable[[dict[str, Any]], str]] = {
    "model.activated": lambda d: (
        f"{_model(d)} ({d.get('variant')}) activated on {short_provider(d.get('provider'))}"
        + _previous(d, ", replacing {}")
    ),
    "model.swapped": lambda d: (
        f"pipeline {d.get('pipeline', PIPELINE)} now runs {_model(d)} "
        f"(was {d.get('previous')}) on {short_provider(d.get('provider'))}: hot swap"
    ),
    "model.downloading": lambda d: f"downloading {_model(d)} ({d.get('variant')}, {d.get('bytes')} bytes)",
    "model.verifying": lambda d: f"verifying {_model(d)}: signature, digest, test vectors",
    "pipeline.started": lambda d: (
        f"pipeline {d.get('pipeline')} started: {_model(d)} on "
        f"{short_provider(d.get('provider'))}, source {d.get('source')}"
    ),
    "model.active": lambda d: (
        f"{_model(d)} serves every pipeline that uses it" + _previous(d, " (previous {}, kept for rollback)")
    ),
    "model.probation_passed": lambda d: f"{_model(d)} passed its probation",
    "model.rolled_back": lambda d: (  # `to`: the version active now (agent/transport/contract/events.py)
        f"{_model(d)} rolled back" + (f" to {d['to']}" if d.get("to") else "") + f": {d.get('reason')}"
    ),
    "model.refused": lambda d: f"{_model(d)} refused: {d.get('reason')}",
    "agent.started": lambda d: (
        f"agent {d.get('version')} serving pipelines {', '.join(map(str, d.get('pipelines') or []))}"
    ),
    "pipeline.stopped": lambda d: f"pipeline {d.get('pipeline')} stopped after {d.get('results')} results",
    "pipeline.finished": lambda d: f"pipeline {d.get('pipeline')} finished after {d.get('results')} results",
}


def _fields(d: dict[str, Any]) -> str:
    return " ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in d.items())


def _epoch(value: object) -> float | None:
    ts = parse_utc_iso(str(value))
    return None if ts is None else ts.timestamp()


def _total_latency(msg: dict[str, Any]) -> float:
    lat = msg.get("latency_ms") or {}
    return float(sum(v for v in lat.values() if isinstance(v, (int, float))))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class Printer:
    """Writes from any thread; once a reader closes its end (`edge-agent demo | head`) it goes quiet."""

    HEADER = f"{'time':8}  {'model':13} {'provider':9} {'fps':>5} {'p50 ms':>7} {'p95 ms':>7} {'cpu%':>5}  {'seq':>11}  boxes"

    def __init__(self, out: TextIO, err: TextIO, color: bool) -> None:
        self.out, self.err, self.color = out, err, color
        self.lock = threading.Lock()
        self.gone = threading.Event()  # stdout or stderr was closed by its reader

    def _print(self, text: str, stream: TextIO) -> None:
        if self.gone.is_set():
            return
        with self.lock:
            try:
                print(text, file=stream, flush=True)
            except (BrokenPipeError, OSError, ValueError):
                self.gone.set()

    def paint(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def note(self, text: str) -> None:
        self._print(self.paint("==> ", "1;34") + text, self.err)

    def line(self, text: str) -> None:
        self._print(text, self.out)

    def tagged(self, mark: str, name: str, text: str, code: str) -> None:
        """A line between the rows: the time, a coloured mark and name (`* model.swapped`), the text."""
        self.line(f"{time.strftime('%H:%M:%S')}  " + self.paint(f"{mark} {name:17}", code) + f" {text}")

    def header(self) -> None:
        self.line(self.paint(self.HEADER, "1"))

    def row(self, tally: Tally) -> None:
        """One line for the results that arrived since the previous line."""
        now = time.monotonic()
        fresh = [a for a in tally.window if not a.shown]
        for a in fresh:
            a.shown = True
        recent = [a.result for a in tally.window if a.at > now - RECENT]
        clock = time.strftime("%H:%M:%S")
        if not fresh:
            self.line(f"{clock}  {self.paint('(no results this second)', '2')}")
            return
        last = fresh[-1].result
        stamps = [t for t in (_epoch(m.get("ts")) for m in recent[-FPS_RESULTS:]) if t is not None]
        fps = (
            f"{(len(stamps) - 1) / (stamps[-1] - stamps[0]):5.1f}"
            if len(stamps) > 2 and stamps[-1] > stamps[0]
            else "    -"
        )
        lat = [_total_latency(m) for m in recent]
        boxes = (last.get("output") or {}).get("boxes") or []
        shown = " ".join("[" + ",".join(str(int(v)) for v in b.get("box", [])) + "]" for b in boxes[:2])
        more = " ..." if len(boxes) > 2 else ""
        seqs = [s for a in fresh if isinstance(s := a.result.get("seq"), int)]
        seq = f"{min(seqs)}-{max(seqs)}" if len(seqs) > 1 else (str(seqs[0]) if seqs else "?")
        system = (tally.health or {}).get("system") or {}
        cpu = system.get("cpu_percent")
        label = f"{MODEL[:4]}@{last.get('model_version')}"
        version = f"{label:13}"
        if tally.versions and last.get("model_version") != tally.versions[0]:
            version = self.paint(version, "1;32")
        self.line(
            f"{clock}  {version} {short_provider(last.get('provider')):9} {fps} {_percentile(lat, 0.5):7.1f} "
            f"{_percentile(lat, 0.95):7.1f} {cpu if cpu is not None else '-':>5}  {seq:>11}  "
            f"{len(boxes)} {shown}{more}"
        )

    def event(self, msg: dict[str, Any]) -> None:
        kind = str(msg.get("type", "?"))
        details = {k: v for k, v in msg.items() if k not in ("device", "seq", "ts", "type")}
        text = EVENT_TEXT.get(kind, _fields)(details)
        self.tagged("*", kind, text, "1;31" if kind.endswith(BAD_EVENTS) else "1;33")
