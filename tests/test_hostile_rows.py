"""Hostile sensor rows (issue 17, items 4 and 9 for csv/jsonl, and "at least 100 generated bad inputs"):
NaN, infinity and out-of-range values, wrong cell counts, deep nesting, huge lines, bad encodings, wrong
types and names. Each row ends in a `frame.rejected` event naming the file, line and value, within a
second, without a traceback; the good rows around it all come through once, in order.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.inference import throttle
from agent.inference.sources import SOURCES, make_source
from agent.inference.sources.base import SourceContext
from agent.transport.events import Event
from tests.helpers.models import linear_model, save
from tests.helpers.profiles import one_pipeline, validated
from tests.helpers.waiting import wait_for

REPO = Path(__file__).resolve().parent.parent
GOOD_JSON = '{"a": %d, "b": 2}'


def read(kind: str, path: Path, **fields: Any) -> tuple[list[list[float]], list[Event], float]:
    """Every sample and event of a file source, and the seconds it took."""
    events: list[Event] = []
    config = validated(SOURCES[kind].Config, type=kind, path=str(path), **fields)
    source = make_source(config, SourceContext("p", events.append))
    started = time.perf_counter()
    items = [list(w.data) for w in source.frames(threading.Event())]
    return items, events, time.perf_counter() - started


def reasons(events: list[Event]) -> list[str]:
    assert all(e.type == "frame.rejected" for e in events), [e.type for e in events]
    return [str(e.fields["reason"]) for e in events]


# -- item 9: values that are not finite numbers ---------------------------------------------------


def test_csv_nan_inf_and_out_of_range_are_rejected_by_default_naming_value_and_line(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text("a,b\n1,2\nnan,1\n1,inf\n1e400,2\n-Infinity,2\n1,2,3\n4\n3,4\n")
    items, events, _ = read("csv", path)
    assert items == [[1, 2], [3, 4]]
    assert reasons(events) == [
        "r.csv line 3: column 'a': 'nan' is not a finite number (invalid: pass lets it through)",
        "r.csv line 4: column 'b': 'inf' is not a finite number (invalid: pass lets it through)",
        "r.csv line 5: column 'a': '1e400' is not a finite number (invalid: pass lets it through)",
        "r.csv line 6: column 'a': '-Infinity' is not a finite number (invalid: pass lets it through)",
        "r.csv line 7: 3 cells, the header has 2",  # an extra cell was accepted silently before
        "r.csv line 8: 1 cells, the header has 2",
    ]
    passed, events, _ = read("csv", path, invalid="pass")
    assert len(passed) == 6 and np.isnan(passed[1][0]) and passed[2][1] == np.inf and passed[3][0] == np.inf
    assert reasons(events) == ["r.csv line 7: 3 cells, the header has 2", "r.csv line 8: 1 cells, the header has 2"]


def test_jsonl_nan_infinity_and_numbers_beyond_float_are_rejected_by_default(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    big = "1" + "0" * 400
    path.write_text(
        "\n".join(
            [
                GOOD_JSON % 1,
                '{"a": NaN, "b": 1}',
                '{"a": 1, "b": Infinity}',
                '{"a": 1e400, "b": 1}',
                f'{{"a": {big}, "b": 1}}',
                GOOD_JSON % 5,
            ]
        )
        + "\n"
    )
    items, events, _ = read("jsonl", path, fields=["a", "b"])
    assert items == [[1, 2], [5, 2]]
    assert reasons(events) == [
        "r.jsonl line 2: field 'a': nan is not a finite number (invalid: pass lets it through)",
        "r.jsonl line 3: field 'b': inf is not a finite number (invalid: pass lets it through)",
        "r.jsonl line 4: field 'a': inf is not a finite number (invalid: pass lets it through)",
        "r.jsonl line 5: field 'a': 1000000000000000000000000000000000000... is beyond the range of a float",
    ]
    passed, events, _ = read("jsonl", path, fields=["a", "b"], invalid="pass")
    assert len(passed) == 5 and np.isnan(passed[1][0])
    assert len(events) == 1  # an integer no float can hold is refused either way


def test_a_nested_jsonl_line_is_rejected_once_and_the_agent_does_not_reread_the_file(tmp_path: Path) -> None:
    """Before: one nested line made the source raise RecursionError, restart and read the file again
    forever (4 rows gave ~78 results, each a duplicate with a fresh seq). A real agent, results on stdout."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "\n".join([GOOD_JSON % 1, GOOD_JSON % 2, "[" * 60_000 + "]" * 60_000, '{"a": NaN, "b": 1}', GOOD_JSON % 3])
        + "\n"
    )
    model = save(linear_model(np.ones((2, 1))), tmp_path / "m.onnx")
    profile = one_pipeline(tmp_path, model, {"type": "jsonl", "path": str(rows), "fields": ["a", "b"]})
    ran = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--profile", str(profile)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    results = [json.loads(line) for line in ran.stdout.splitlines()]
    assert [r["seq"] for r in results] == [1, 2, 3]  # each good row once
    assert [r["source_seq"] for r in results] == [0, 1, 2]
    assert "rows.jsonl line 3: longer than 65536 bytes" in ran.stderr
    assert "rows.jsonl line 4: field 'a': nan is not a finite number" in ran.stderr
    assert "Traceback" not in ran.stderr and "RecursionError" not in ran.stderr and "source.error" not in ran.stderr


# -- generated hostile rows ----------------------------------------------------------------------------


def hostile_jsonl() -> Iterator[tuple[str, bytes]]:
    """(name, one line without its newline): each wrong in one way for fields a, b and timestamp ts."""
    for depth in (33, 40, 64, 100, 500, 1000, 5000, 10_000, 30_000):
        yield f"depth-list-{depth}", b"[" * depth + b"]" * depth
        yield f"depth-obj-{depth}", b'{"a":' * depth + b"1" + b"}" * depth
        yield f"depth-in-field-{depth}", b'{"a": ' + b"[" * depth + b"]" * depth + b', "b": 1, "ts": 0}'
    yield "unclosed-deep", b"[" * 50_000
    for size in (65_537, 200_000, 1_000_000):
        yield f"long-{size}", b'{"a": 1, "b": 2, "ts": 0, "pad": "' + b"x" * size + b'"}'
    yield "long-number", b'{"a": 1' + b"0" * 70_000 + b', "b": 1, "ts": 0}'
    for value in (
        "NaN",
        "Infinity",
        "-Infinity",
        "1e400",
        "-1e400",
        "1" + "0" * 400,
        "-" + "9" * 320,
        "1e309",
        "2e308",
    ):
        yield f"a={value[:12]}", f'{{"a": {value}, "b": 1, "ts": 0}}'.encode()
        yield f"b={value[:12]}", f'{{"a": 1, "b": {value}, "ts": 0}}'.encode()
    for value in ('"1"', "true", "null", "[1]", '{"x": 1}', '""', "false", '"NaN"'):
        yield f"type-a-{value}", f'{{"a": {value}, "b": 1, "ts": 0}}'.encode()
        yield f"type-b-{value}", f'{{"a": 1, "b": {value}, "ts": 0}}'.encode()
    for ts in (
        "NaN",
        "1e400",
        '"not a date"',
        '"9999-99-99"',
        "-1e20",
        "1e20",
        "[]",
        '"' + "9" * 1000 + '"',
        "null",
        "true",
    ):
        yield f"ts-{ts[:12]}", f'{{"a": 1, "b": 1, "ts": {ts}}}'.encode()
    yield "no-ts", b'{"a": 1, "b": 1}'
    for text in ("1", '"x"', "[]", "null", "true", "[1, 2]", "nonsense", "{", "}", '{"a": 1,}', "{'a': 1}"):
        yield f"not-object-{text}", text.encode()
    yield "missing-a", b'{"b": 1, "ts": 0}'
    yield "missing-both", b'{"ts": 0}'
    yield "empty-object", b"{}"
    for name in ("A", "a ", "\u0430", "a\u0000", "__proto__", "../a", "a" * 10_000):
        yield f"name-{name[:10]!r}", json.dumps({name: 1, "b": 1, "ts": 0}).encode()
    yield "latin1", '{"a": 1, "b": 1, "ts": 0, "n": "café"}'.encode("latin-1").replace(b'1, "b"', b'\xff, "b"')
    yield "utf16", '{"a": 1, "b": 1, "ts": 0}'.encode("utf-16")
    yield "nul", b'{"a": 1\x00, "b": 1, "ts": 0}'
    yield "binary", bytes(range(0, 10)) + bytes(range(11, 256))
    yield "lone-surrogate-key", b'{"\\ud800": 1, "b": 1, "ts": 0}'
    yield "control", b'{"a": \x07 1, "b": 1, "ts": 0}'
    yield "dup-keys-bad-last", b'{"a": 1, "a": "x", "b": 1, "ts": 0}'


def hostile_csv() -> Iterator[tuple[str, bytes]]:
    """(name, one data row for the header `a,b,ts`): each wrong in one way."""
    for value in ("nan", "NaN", "inf", "-inf", "Infinity", "1e400", "-1e400", "1" + "0" * 400, "+inf", "1e309"):
        yield f"a={value[:12]}", f"{value},1,0".encode()
        yield f"b={value[:12]}", f"1,{value},0".encode()
        yield f"ts={value[:12]}", f"1,1,{value}".encode()
    for value in ("x", "", " ", "1,5", "0x10", "--1", "1e", "e5", "true", "None", "nan(123)", "1.2.3"):
        quoted = f'"{value}"' if "," in value else value
        yield f"text-a-{value!r}", f"{quoted},1,0".encode()
        yield f"text-b-{value!r}", f"1,{quoted},0".encode()
    for cells in (1, 2, *range(4, 24), 1000):
        yield f"cells-{cells}", ",".join(["1"] * cells).encode()
    yield "empty-cells", b",,"
    for ts in ("nan", "1e400", "-1e20", "1e20", "not-a-date", "9999-99-99T00:00:00Z", "9" * 1000, ""):
        yield f"ts-{ts[:12]}", f"1,1,{ts}".encode()
    # past year 9999 or before year 1 once the offset is applied, or a negative epoch before year 1
    for ts in ("9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00", "-1e11"):
        yield f"ts-range-{ts}", f"1,1,{ts}".encode()
    for size in (65_537, 300_000):
        yield f"long-{size}", b"1,1," + b"9" * size
    yield "quote-unclosed", b'"1,1,0'
    yield "quote-huge", b'"' + b"x" * 70_000 + b'",1,0'
    yield "latin1", "café,1,0".encode("latin-1")
    yield "utf16", "1,1,0".encode("utf-16")
    yield "nul", b"1\x00,1,0"
    yield "binary", bytes(range(0, 10)) + bytes(range(11, 256))
    yield "control", b"\x1b[31m1,1,0"
    yield "semicolons", b"1;1;0"
    yield "tabs", b"1\t1\t0"
    for name in ("a,b", "../x", "\u0430"):
        yield f"name-like-{name!r}", f"{name},1,0".encode()


def run_hostile(
    tmp_path: Path, kind: str, header: bytes, good: bytes, cases: list[tuple[str, bytes]], **fields: Any
) -> None:
    """One file: a good row, then each bad one followed by a good one. Every bad line is one
    frame.rejected naming its line; every good row comes through once, in order."""
    lines = [header] if header else []
    bad_lines: dict[int, str] = {}
    for name, row in cases:
        lines.append(good)
        lines.append(row)
        bad_lines[len(lines)] = name
    lines.append(good)
    path = tmp_path / f"hostile.{kind}"
    path.write_bytes(b"\n".join(lines) + b"\n")
    items, events, took = read(kind, path, **fields)
    assert len(items) == len(cases) + 1, f"{len(items)} good rows came through of {len(cases) + 1}"
    assert took < len(cases) * 0.05 + 1, took  # well under a second per row
    rejected = reasons(events)
    named = {int(r.split(" line ", 1)[1].split(":", 1)[0]) for r in rejected}
    missing = sorted(set(bad_lines) - named)
    assert not missing, "not refused: " + ", ".join(bad_lines[n] for n in missing[:10])
    assert len(rejected) == len(cases), "a line refused twice"
    assert all(len(r) < 400 for r in rejected), max(rejected, key=len)[:500]


def test_at_least_100_hostile_jsonl_rows_each_end_in_frame_rejected(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cases = list(hostile_jsonl())
    assert len(cases) >= 100, len(cases)
    with caplog.at_level(logging.DEBUG):
        run_hostile(
            tmp_path, "jsonl", b"", b'{"a": 1, "b": 2, "ts": 1700000000}', cases, fields=["a", "b"], timestamp="ts"
        )
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_at_least_100_hostile_csv_rows_each_end_in_frame_rejected(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cases = list(hostile_csv())
    assert len(cases) >= 100, len(cases)
    with caplog.at_level(logging.DEBUG):
        run_hostile(tmp_path, "csv", b"a,b,ts", b"1,2,1700000000", cases, columns=["a", "b"], timestamp="ts")
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_a_running_agent_keeps_serving_through_hostile_rows_followed_live(tmp_path: Path) -> None:
    """`follow: true`: hostile rows appended to the file while the agent runs; good rows go on."""
    rows = tmp_path / "live.jsonl"
    rows.write_text(GOOD_JSON % 0 + "\n")
    model = save(linear_model(np.ones((2, 1))), tmp_path / "m.onnx")
    profile = one_pipeline(tmp_path, model, {"type": "jsonl", "path": str(rows), "fields": ["a", "b"], "follow": True})
    out, log = tmp_path / "out.jsonl", tmp_path / "agent.log"
    with out.open("wb") as stdout, log.open("wb") as stderr:
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--profile", str(profile)], stdout=stdout, stderr=stderr, cwd=REPO
        )
    try:
        assert wait_for(lambda: out.read_text().count("\n") >= 1, 60), log.read_text()
        cases = list(hostile_jsonl())
        with rows.open("ab") as f:
            for i, (_, row) in enumerate(cases, 1):
                f.write(row + b"\n" + (GOOD_JSON % i).encode() + b"\n")
        assert wait_for(lambda: out.read_text().count("\n") >= len(cases) + 1, 30), log.read_text()[-2000:]
        assert agent.poll() is None
        text = log.read_text()
        assert "Traceback" not in text and "source.error" not in text
        assert text.count("event type=frame.rejected") >= 1  # folded repeats: at least the first of each kind
    finally:
        agent.kill()
        agent.wait(10)


def test_the_event_throttle_forgets_kinds_whose_interval_has_passed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rejected row's reason quotes its value, and each distinct reason was a kind the pipeline's throttle
    kept for ever: 10,000 distinct bad rows, 10,000 entries. Now the kinds still within their interval."""
    clock = [0.0]
    monkeypatch.setattr(throttle.time, "monotonic", lambda: clock[0])
    sent: list[Event] = []
    folding = throttle.EventThrottle(sent.append)
    for i in range(10_000):
        clock[0] += 0.01  # 100 rows a second: about 1,000 distinct kinds within one interval
        value = "".join(chr(ord("a") + int(d)) for d in str(i))  # no digits: the throttle reads those as counts
        folding(
            Event("frame.rejected", {"pipeline": "p", "reason": f"s.csv line: column 'a': {value!r} is not a number"})
        )
    assert len(sent) == 10_000  # each kind is new: every one goes out
    assert len(folding._last) <= 2 * throttle.MAX_KINDS and len(folding._folded) <= 2 * throttle.MAX_KINDS
    for _ in range(2):
        folding(Event("frame.rejected", {"pipeline": "p", "reason": "s.csv line: column 'a': 'zz' is not a number"}))
    assert len(sent) == 10_001  # the repeat within the interval is still folded
