"""The compatibility suite's outcomes (case x broker) as JSON, and docs/brokers.md's table made from them.

The suite (tests/test_brokers.py) records every case on every broker; with EDGE_AGENT_BROKER_RESULTS=1 it
writes tests/fixtures/brokers-results.json (brokers that did not run keep their last entry) and
regenerates the table between the markers in docs/brokers.md. A test checks that the committed doc
matches the committed results. By hand:

    python -m tests.helpers.brokers.results        # docs/brokers.md from the committed results
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
RESULTS_FILE = REPO / "tests" / "fixtures" / "brokers-results.json"
DOC = REPO / "docs" / "brokers.md"
START = "<!-- brokers-table: generated from tests/fixtures/brokers-results.json; do not edit -->"
END = "<!-- /brokers-table -->"
ENV = "EDGE_AGENT_BROKER_RESULTS"
OUTCOMES = ("pass", "limited", "fail", "skip")


@dataclass
class Results:
    """What one run saw: each broker's version and outcomes, and the cases' titles in table order."""

    cases: dict[str, str]
    brokers: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> {"version", "protocol"}
    outcomes: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)  # broker -> case -> outcome

    def broker(self, name: str, version: str, protocol: str = "") -> None:
        self.brokers[name] = {"version": version, "protocol": protocol}
        self.outcomes.setdefault(name, {})

    def record(self, broker: str, case: str, outcome: str, note: str = "") -> None:
        assert outcome in OUTCOMES and case in self.cases, (outcome, case)
        entry = {"outcome": outcome}
        if note:
            entry["note"] = note
        self.outcomes.setdefault(broker, {})[case] = entry

    def as_json(self) -> dict[str, Any]:
        return {"cases": self.cases, "brokers": self.brokers, "outcomes": self.outcomes}

    def save(self) -> Path | None:
        """With $EDGE_AGENT_BROKER_RESULTS set (1: the committed file; else a path), merge this run into the
        results file and regenerate docs/brokers.md's table; None when not asked to."""
        target = os.environ.get(ENV)
        if not target or not self.brokers:
            return None
        path = RESULTS_FILE if target == "1" else Path(target)
        merged = json.loads(path.read_text()) if path.exists() else {"cases": {}, "brokers": {}, "outcomes": {}}
        merged["cases"] = self.cases
        merged["brokers"].update(self.brokers)
        merged["outcomes"].update({b: self.outcomes.get(b, {}) for b in self.brokers})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(merged, indent=2, sort_keys=False) + "\n")
        if path == RESULTS_FILE:
            DOC.write_text(with_table(DOC.read_text(), merged))
        return path


def render(results: dict[str, Any]) -> str:
    """The table: a row per case, a column per broker, numbered notes under it."""
    brokers = list(results["brokers"])
    notes: list[str] = []

    def cell(broker: str, case: str) -> str:
        entry = results["outcomes"].get(broker, {}).get(case)
        if entry is None:
            return "not run"
        text = entry["outcome"]
        note = entry.get("note")
        if note:
            if note not in notes:
                notes.append(note)
            text += f" ({notes.index(note) + 1})"
        return text

    head = ["case", *(f"{b} {results['brokers'][b]['version']}" for b in brokers)]
    rows = [f"| {' | '.join(head)} |", f"|{'---|' * len(head)}"]
    protocols = [results["brokers"][b].get("protocol") or "-" for b in brokers]
    rows.append(f"| MQTT version the agent settled on | {' | '.join(protocols)} |")
    for case, title in results["cases"].items():
        rows.append(f"| {title} | {' | '.join(cell(b, case) for b in brokers)} |")
    lines = [*rows, ""]
    lines += [f"{i}. {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(lines).rstrip() + "\n"


def with_table(doc: str, results: dict[str, Any]) -> str:
    """`doc` with the text between the markers replaced by the table."""
    head, _sep, rest = doc.partition(START)
    _old, _sep2, tail = rest.partition(END)
    if not _sep or not _sep2:
        raise ValueError(f"{DOC.name} has no {START!r} ... {END!r} markers")
    return f"{head}{START}\n{render(results)}{END}{tail}"


def main() -> None:
    DOC.write_text(with_table(DOC.read_text(), json.loads(RESULTS_FILE.read_text())))


if __name__ == "__main__":
    main()
