"""The wire contract (agent/transport/contract/): producers cannot emit what it lacks, the fleet side
cannot read what it lacks, the docs show what the agent sends, and the suite's subscribers catch any
device message that breaks it."""

from __future__ import annotations

import ast
import json
import re
import time
import uuid
from pathlib import Path

import pytest

from agent.cloud.fleet.inventory import Inventory
from agent.cloud.fleet.watch import event_matches
from agent.models.deploy import new_order
from agent.service.commands.dispatch import CommandDispatcher
from agent.service.health import HealthReporter
from agent.transport.contract import EVENTS, ContractError, event_body, event_payload, parse_event, parse_health
from agent.transport.contract.replies import check_reply
from agent.transport.contract.wire import ENVELOPE, PARSERS
from agent.transport.events import Event
from tests.helpers.broker import Mosquitto
from tests.helpers.mqtt_client import VIOLATIONS, Subscriber, contract_kind
from tests.test_docs import parse_blocks

pytest_plugins = ["pytester"]  # the fixture's own test runs a small suite

REPO = Path(__file__).resolve().parent.parent
AGENT = REPO / "agent"
# Calls whose first argument is an event type: Event(...), and the producers' helpers that make one.
PRODUCERS = {"Event", "emit", "_event", "_folded", "_error"}
ROLLED_BACK = {"model": "m", "version": "2.0.0", "to": "1.0.0", "reason": "probation failed: p95", "cause": "probation"}


def emitted_types() -> dict[str, str]:
    """Every event type the agent's code names where it makes an event, and where."""
    found: dict[str, str] = {}
    for path in sorted(AGENT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name not in PRODUCERS:
                continue
            for type_ in _strings(node.args[0]):
                found.setdefault(type_, f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def _strings(node: ast.expr) -> list[str]:
    """The event types an argument can be: a string, or either branch of `"a" if done else "b"`."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return _strings(node.body) + _strings(node.orelse)
    return []


# ---- producers ----------------------------------------------------------------------------------


def test_every_event_type_the_agent_makes_is_in_the_contract_and_every_contract_type_is_made() -> None:
    made = emitted_types()
    assert {t: where for t, where in made.items() if t not in EVENTS} == {}
    assert sorted(set(EVENTS) - set(made)) == []


def test_no_event_field_takes_an_envelope_name() -> None:
    assert {
        t: sorted(ENVELOPE & set(m.model_fields)) for t, m in EVENTS.items() if ENVELOPE & set(m.model_fields)
    } == {}


@pytest.mark.parametrize(
    "type_, fields, message",
    [
        ("model.rolled_back", {**ROLLED_BACK, "previous": "1.0.0"}, "event model.rolled_back: field 'previous': Extra"),
        ("model.rolled_back", {k: v for k, v in ROLLED_BACK.items() if k != "cause"}, "field 'cause': Field required"),
        ("model.rolled_back", {**ROLLED_BACK, "cause": "bored"}, "field 'cause': Input should be 'probation'"),
        ("outbox.dropped", {"count": "3", "total": 3, "max_bytes": 1, "reason": "r"}, "field 'count': Input should be"),
        ("model.downloaded", {"model": "m"}, "event 'model.downloaded': not an event type of the contract"),
    ],
)
def test_an_event_that_breaks_the_contract_cannot_be_made(type_: str, fields: dict[str, object], message: str) -> None:
    with pytest.raises(ContractError) as caught:
        Event(type_, fields)
    assert message in str(caught.value)
    assert not isinstance(caught.value, ValueError)  # producers' `except ValueError` must not hide it


def test_an_event_crosses_the_wire_as_its_producer_made_it() -> None:
    event = Event("model.rolled_back", {**ROLLED_BACK, "order": "o-1"}, ts=1_800_000_000.0)
    raw = json.dumps(event_payload("dev-1", 7, "2027-01-15T08:00:00.000Z", event.body))
    assert list(json.loads(raw))[:4] == ["device", "seq", "ts", "type"]
    read = parse_event(raw)
    assert (read.envelope.device, read.envelope.seq, read.type) == ("dev-1", 7, "model.rolled_back")
    assert read.body == event.body and event.payload() == {**ROLLED_BACK, "order": "o-1"}
    with pytest.raises(ContractError, match="field 'seq'"):
        parse_event(json.dumps({**json.loads(raw), "seq": 0}))


def test_health_and_replies_from_the_agents_own_code_match_the_contract(tmp_path: Path) -> None:
    health = HealthReporter(lambda body: None, device="dev-1", state_dir=tmp_path, agent_version="0.1.0")
    health.add_source("pipelines", lambda: 1 / 0)  # a failing source: its section reads {"error": ...}
    parse_health(json.dumps(health.collect()))
    commands = CommandDispatcher("dev-1")
    for name, payload in [("ping", b'{"id": 7}'), ("ping", b"[]"), ("nope", b""), ("rollback", b"{}")]:
        check_reply(json.loads(json.dumps(commands.handle(name, payload))))


# ---- the fleet side -------------------------------------------------------------------------------


STATUS = {"device": "dev-1", "group": "g", "state": "offline", "reason": "stopped"}


@pytest.mark.parametrize(
    "raw",
    [
        json.dumps(STATUS),
        json.dumps({**STATUS, "state": "asleep"}),  # a value the contract does not have
        json.dumps({**STATUS, "extra": 1}),  # an unknown key
        json.dumps({k: v for k, v in STATUS.items() if k != "group"}),  # a missing key
        json.dumps({**STATUS, "device": 7}),  # no coercion
        '{"device": "a", "state": "online", "device": "b"}',  # a repeated key: the last one, both ways
        "[1, 2]",  # not an object
        '{"device":',  # not JSON
        "\ufeff" + json.dumps(STATUS),  # a byte-order mark is not JSON on the wire
        "[" * 40 + "]" * 40,  # deeper than jsonlimits allows
        json.dumps({**STATUS, "reason": "x" * (2 << 20)}),  # larger than a payload may be
        # an unterminated string of escaped quotes before brackets: 1 MB of it took the depth scan ~80 min
        '{"device": "' + '\\"' * 500_000 + "[" * 40,
    ],
)
def test_one_pass_json_validation_gives_the_answers_of_parse_then_validate(raw: str) -> None:
    """parse_status and parse_health validate with pydantic's JSON parser in one pass (`check_json`): the
    model, or the ContractError message, is the one `decode` then `check_model` gives, within the same bounds."""
    from agent.transport.contract import parse_status
    from agent.transport.contract.base import check_model, decode
    from agent.transport.contract.status import StatusMessage

    def two_pass() -> object:
        return check_model(StatusMessage, decode(raw, "status"), "status")

    try:
        expected: object = two_pass()
    except ContractError as exc:
        with pytest.raises(ContractError) as got:
            parse_status(raw)
        assert str(got.value) == str(exc)
    else:
        assert parse_status(raw) == expected


def test_the_fleet_side_follows_a_rollback_by_the_version_rolled_back_from() -> None:
    """Issue 13, defect 1, in one unit: the device's probation names the bad version in `version`."""
    order = new_order("m", "2.0.0", "device:dev-1")
    topic = "edge/dev-1/deploy"
    assert event_matches(event_body("model.rolled_back", ROLLED_BACK), order, topic)
    assert event_matches(event_body("model.rolled_back", {**ROLLED_BACK, "order": order.id}), order, topic)
    assert not event_matches(event_body("model.rolled_back", {**ROLLED_BACK, "version": "3.0.0"}), order, topic)
    assert not event_matches(event_body("model.rolled_back", {**ROLLED_BACK, "order": "other"}), order, topic)


def test_the_fleet_side_reads_nothing_the_contract_does_not_have() -> None:
    inventory = Inventory(None, "edge")  # type: ignore[arg-type]  # absorb() needs no connection
    head = {"device": "dev-1", "seq": 1, "ts": "2027-01-15T08:00:00.000Z", "type": "model.rolled_back"}
    old = {**head, "model": "m", "version": "1.0.0", "variant": "fp32", "previous": "2.0.0"}  # before issue 13
    message = inventory.absorb("edge/dev-1/events", json.dumps(old).encode())
    assert message is not None and message.event is None
    assert (message.error or "").startswith("event model.rolled_back: field 'to': Field required")
    message = inventory.absorb("edge/dev-1/status", b'{"device": "dev-1", "state": "online"}')
    assert message is not None and "field 'group'" in (message.error or "") and "dev-1" not in inventory.devices


# ---- the docs -------------------------------------------------------------------------------------

CONTRACT_NOTE = re.compile(r"<!--\s*contract:\s*(\S+).*-->")
CHECKED_DOCS = ("mqtt.md", "events.md", "fleet.md")
NOT_EVENTS = {"source.type", "postprocess.type"}  # profile keys that read like event types


def json_examples(page: Path) -> list[tuple[str, str, list[object]]]:
    """(where, kind, the JSON values) of every json block of a page; `kind` is named by a
    `<!-- contract: KIND -->` line right above the block."""
    lines = page.read_text().splitlines()
    out = []
    for block in parse_blocks(page):
        if block.lang != "json":
            continue
        note = CONTRACT_NOTE.match(lines[block.line - 2].strip()) if block.line >= 2 else None
        values, text, at = [], block.body, 0
        while text[at:].strip():
            value, at = json.JSONDecoder().raw_decode(text, len(text) - len(text[at:].lstrip()))
            values.append(value)
        out.append((block.where, note.group(1) if note else "", values))
    return out


@pytest.mark.parametrize("page", CHECKED_DOCS)
def test_every_json_example_in_the_docs_is_what_the_contract_says(page: str) -> None:
    for where, kind, values in json_examples(REPO / "docs" / page):
        assert kind in (*PARSERS, "none"), f"{where}: a json block needs <!-- contract: KIND --> above it ({kind!r})"
        for value in values if kind != "none" else ():
            try:
                PARSERS[kind](json.dumps(value))  # type: ignore[index]  # narrowed by the assert above
            except ContractError as exc:
                pytest.fail(f"{where}: {exc}")


def documented_events() -> dict[str, set[str]]:
    """docs/events.md's table: each type and the fields its row names (backticked, outside parentheses)."""
    rows: dict[str, set[str]] = {}
    for line in (REPO / "docs" / "events.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        fields = set(re.findall(r"`([a-z_0-9]+)`", re.sub(r"\([^)]*\)", "", cells[2])))
        for type_ in re.findall(r"`([a-z_]+\.[a-z_]+)`", cells[0]):
            rows[type_] = fields
    return rows


def test_docs_events_names_every_event_type_with_its_fields() -> None:
    documented = documented_events()
    assert sorted(set(EVENTS) - set(documented)) == [], "in the contract, not in docs/events.md"
    assert sorted(set(documented) - set(EVENTS)) == [], "in docs/events.md, not in the contract"
    wrong = {
        t: (sorted(f), sorted(EVENTS[t].model_fields))
        for t, f in documented.items()
        if f != set(EVENTS[t].model_fields)
    }
    assert wrong == {}, "docs/events.md fields differ from the contract: (documented, contract)"


@pytest.mark.parametrize("page", [*CHECKED_DOCS, "pipelines.md", "registry.md", "README.md"])
def test_the_docs_name_no_event_type_the_agent_does_not_send(page: str) -> None:
    families = {t.split(".")[0] for t in EVENTS} - {"agent"}  # `agent.x` is a module
    text = (REPO / "docs" / page).read_text()
    named = set(re.findall(r"`((?:{})\.[a-z_]+)`".format("|".join(families)), text))
    files = {n for n in named if n.rpartition(".")[2] in ("py", "yaml", "json", "md", "onnx")}
    assert sorted(named - files - NOT_EVENTS - set(EVENTS)) == []


# ---- the suite's subscribers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic, kind",
    [
        ("edge/dev-1/events", "events"),
        ("site/edge/dev-1/health", "health"),
        ("edge/dev-1/status", "status"),
        ("edge/dev-1/cmd/ping/reply", "reply"),
        ("edge/dev-1/cmd/status", None),
        ("edge/dev-1/p/results", None),
        ("edge/fleet/g1/deploy", None),
    ],
)
def test_the_subscribers_know_which_contract_a_topic_follows(topic: str, kind: str | None) -> None:
    assert contract_kind(topic) == kind


def test_a_subscriber_catches_a_device_message_that_breaks_the_contract(broker: Mosquitto) -> None:
    """The check the autouse fixture `fail_on_contract_violations` relies on can fail."""
    device = f"dev-{uuid.uuid4().hex[:6]}"
    sub = Subscriber(broker.port, f"edge/{device}/#")
    try:
        good = event_payload(device, 1, "2027-01-15T08:00:00.000Z", event_body("model.rolled_back", ROLLED_BACK))
        sub.publish(f"edge/{device}/events", json.dumps(good))
        sub.publish(f"edge/{device}/events", json.dumps({**good, "seq": 2, "previous": "1.0.0"}))
        sub.publish(f"edge/{device}/p/results", b'{"anything": "goes"}')  # results are not checked
        sub.wait_for(lambda: len(sub.messages) == 3)
        time.sleep(0.1)
    finally:
        sub.close()
    assert VIOLATIONS.take() == [
        f"edge/{device}/events: event model.rolled_back: field 'previous': Extra inputs are not permitted"
    ]


def test_the_fixture_fails_a_test_that_saw_a_violation(pytester: pytest.Pytester) -> None:
    pytester.makeconftest("from tests.conftest import fail_on_contract_violations  # noqa: F401\n")
    pytester.makepyfile(
        """
        from tests.helpers.mqtt_client import VIOLATIONS

        def test_sees_a_bad_health():
            VIOLATIONS.check("edge/dev-1/health", b'{"ts": "yesterday"}')
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*messages that break the wire contract:*", "*edge/dev-1/health: health: field*"])
