"""Deployment orders on the device side: signed, strictly parsed, expiring, and aimed at a device or group."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from agent.models.deploy import (
    Canary,
    DeployOrder,
    OrderError,
    applies_to,
    effective_order,
    new_order,
    parse_order,
    parse_target,
    sign_order,
)
from agent.models.orders import OrderBook
from agent.models.signing import ORDER, generate_keypair, load_private_key, load_public_keys, sign

pytestmark = pytest.mark.arm64

NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Any], Any]:
    """(private key, trusted public keys, an untrusted private key)."""
    d = tmp_path_factory.mktemp("keys")
    private, public = generate_keypair(d)
    other, _ = generate_keypair(d, "other")
    return load_private_key(private), load_public_keys(public), load_private_key(other)


def order(**kw: Any) -> DeployOrder:
    args: dict[str, Any] = {"model": "text-detector", "version": "1.5.0", "target": "group:north-gate", "now": NOW}
    args.update(kw)
    return new_order(**args)


def envelope(doc: dict[str, Any], private: Any) -> bytes:
    """An order signed exactly as written, for documents new_order would not make."""
    text = json.dumps(doc)
    return json.dumps({"order": text, "sig": json.loads(sign(private, text.encode(), ORDER))}).encode()


def good_doc(**changes: Any) -> dict[str, Any]:
    doc = order().as_dict()
    doc.update(changes)
    return doc


def refusal(payload: bytes, keys: dict[str, Any], now: datetime = NOW) -> str:
    with pytest.raises(OrderError) as info:
        parse_order(payload, keys, now=now)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_signed_order_round_trips(keys: Any) -> None:
    private, public, _ = keys
    o = order(canary=Canary("north-gate", ("cam-1", "cam-2")), allow_older=True, expires_in=timedelta(hours=1))
    payload = sign_order(o, private)
    env = json.loads(payload)
    assert set(env) == {"order", "sig"} and env["sig"]["type"] == ORDER
    (signature,) = env["sig"]["signatures"]
    assert signature["alg"] == "ed25519" and len(signature["key"]) == 16
    assert json.loads(env["order"])["target"] == "group:north-gate"
    got = parse_order(payload, public, now=NOW)
    assert got == o
    assert (got.target_kind, got.target_name) == ("group", "north-gate")
    assert got.expires - got.issued == timedelta(hours=1)
    assert got.event_fields() == {"order": o.id, "model": "text-detector", "version": "1.5.0"}


def test_an_empty_payload_means_withdrawn(keys: Any) -> None:
    assert parse_order(b"", keys[1]) is None


def test_refusals_say_why_in_one_line(keys: Any) -> None:
    private, public, stranger = keys
    o = order()
    payload = sign_order(o, private)
    assert refusal(b"{nope", public).startswith("deployment order is not JSON (")
    assert (
        refusal(b'{"order": {}, "sig": {}}', public) == 'deployment order is not {"order": "<JSON text>", "sig": {...}}'
    )
    assert refusal(b"[1]", public) == 'deployment order is not {"order": "<JSON text>", "sig": {...}}'
    assert refusal(b"x" * 70000, public) == "deployment order is 70000 bytes; the limit is 65536"

    tampered = json.loads(payload)
    tampered["order"] = tampered["order"].replace("1.5.0", "1.6.0")
    msg = refusal(json.dumps(tampered).encode(), public)
    assert msg.startswith(f"bad signature on deployment order {o.id} (key ")

    msg = refusal(sign_order(o, stranger), public)
    assert f"deployment order {o.id} is signed by unknown key" in msg and "trusted: " in msg

    bad_sig = json.loads(payload)
    bad_sig["sig"] = {"type": ORDER, "signatures": [{"alg": "rsa", "key": "x", "sig": ""}]}
    assert (
        refusal(json.dumps(bad_sig).encode(), public)
        == f"signature of deployment order {o.id} uses 'rsa'; only ed25519 is accepted"
    )


def test_expired_orders_are_refused(keys: Any) -> None:
    private, public, _ = keys
    o = order(expires_in=timedelta(minutes=10))
    assert parse_order(sign_order(o, private), public, now=NOW + timedelta(minutes=9)) == o
    msg = refusal(sign_order(o, private), public, now=NOW + timedelta(minutes=10))
    assert (
        msg
        == f"deployment order {o.id} expired at 2026-11-25T12:10:00Z; issue a new one with `edge-agent fleet deploy`"
    )
    with pytest.raises(OrderError) as info:
        parse_order(sign_order(o, private), public, now=NOW + timedelta(days=1))
    assert info.value.order_id == o.id


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"model": "../etc"},
            "model: '../etc' is not a name (letters, digits, '_', '.' and '-', up to 64, starting with a letter or digit)",
        ),
        ({"model": ".hidden"}, "model: '.hidden' is not a name"),
        ({"version": "1/2"}, "version: '1/2' is not a name"),
        ({"version": 15}, "version: expected a string, got int 15"),
        ({"target": "cam-1"}, "target 'cam-1' must be device:ID or group:NAME"),
        ({"target": "device:a/b"}, "device 'a/b' in target 'device:a/b' is not a name"),
        ({"target": "site:x"}, "target 'site:x' must be device:ID or group:NAME"),
        ({"schema": 2}, "schema: expected 1, got 2"),
        ({"schema": True}, "schema: expected 1, got True"),
        ({"extra": 1}, "unknown key 'extra'"),
        ({"allow_older": "yes"}, "allow_older: expected true or false, got 'yes'"),
        ({"issued": "yesterday"}, "issued: 'yesterday' is not an ISO 8601 time"),
        ({"expires": "2026-12-01T00:00:00"}, "expires: '2026-12-01T00:00:00' has no UTC offset"),
        ({"expires": "2026-11-25T11:00:00Z"}, "expires is not after issued"),
        ({"canary": {"group": "g"}}, 'canary: expected {"group": NAME, "devices": [ID, ...]}'),
        ({"canary": {"group": "g", "devices": ["a/b"]}}, "canary.devices: expected a list of device ids"),
    ],
)
def test_strict_parse_names_the_field(keys: Any, changes: dict[str, Any], message: str) -> None:
    private, public, _ = keys
    doc = good_doc(**changes)
    msg = refusal(envelope(doc, private), public)
    assert msg.startswith(f"deployment order {doc['id']}: {message}"), msg


def test_a_missing_key_and_a_non_object_order(keys: Any) -> None:
    private, public, _ = keys
    doc = good_doc()
    del doc["version"]
    assert refusal(envelope(doc, private), public).endswith(": required key 'version' is missing")
    text = "[1, 2]"
    payload = json.dumps({"order": text, "sig": json.loads(sign(private, text.encode(), ORDER))}).encode()
    assert refusal(payload, public) == "deployment order: expected a JSON object, got list"


def test_new_order_checks_what_it_writes() -> None:
    with pytest.raises(ValueError, match="model: 'a b' is not a name"):
        order(model="a b")
    with pytest.raises(ValueError, match="must be device:ID or group:NAME"):
        order(target="everyone")
    assert parse_target("device:cam-1") == ("device", "cam-1")
    o = order()
    assert o.id.startswith("20261125T120000Z-") and o.expires - o.issued == timedelta(days=7)


def test_applies_to_its_device_or_its_group() -> None:
    g = order(target="group:north-gate")
    d = order(target="device:cam-1")
    assert applies_to(g, "cam-7", "north-gate") and not applies_to(g, "cam-7", "south-gate")
    assert applies_to(d, "cam-1", "anything") and not applies_to(d, "cam-2", "north-gate")
    # a group named like a device is still a group
    assert not applies_to(order(target="group:cam-1"), "cam-1", "default")


def test_effective_order_is_the_newest_that_applies() -> None:
    device_v2 = order(target="device:cam-1", version="2.0", now=NOW)
    group_v3 = order(target="group:north-gate", version="3.0", now=NOW + timedelta(minutes=5))
    other_group = order(target="group:south", version="9.0", now=NOW + timedelta(minutes=9))
    assert (
        effective_order([device_v2, None, group_v3, other_group], "cam-1", "north-gate", now=NOW + timedelta(minutes=6))
        == group_v3
    )
    assert effective_order([device_v2, None], "cam-1", "north-gate", now=NOW) == device_v2
    assert effective_order([device_v2], "cam-1", "north-gate", now=NOW + timedelta(days=8)) is None  # expired
    assert effective_order([None, other_group], "cam-1", "north-gate", now=NOW) is None


def test_rotated_keys_are_all_trusted(tmp_path: Path, keys: Any) -> None:
    private, public, stranger = keys
    both = {**public, **load_public_keys(_pub_of(stranger, tmp_path))}
    assert parse_order(sign_order(order(), stranger), both, now=NOW) is not None


def _pub_of(private: Any, tmp_path: Path) -> Path:
    from agent.models.signing import public_pem

    path = tmp_path / "k.pub"
    path.write_bytes(public_pem(private.public_key()))
    return path


def test_the_order_book_follows_the_newest_order_per_model_and_forgets_withdrawn_ones(tmp_path: Path) -> None:
    book = OrderBook(tmp_path, "cam-1", "north-gate")
    group_v3 = order(target="group:north-gate", version="3.0", now=NOW)
    device_v2 = order(target="device:cam-1", version="2.0", now=NOW + timedelta(minutes=1))
    book.put("edge/fleet/north-gate/deploy", group_v3)
    book.put("edge/cam-1/deploy", device_v2)
    followed = book.effective("text-detector", now=NOW)
    assert followed is not None and (followed["id"], followed["version"]) == (device_v2.id, "2.0")
    assert book.superseded_by(group_v3, NOW) == followed and book.superseded_by(device_v2, NOW) is None
    again = OrderBook(tmp_path, "cam-1", "north-gate")  # kept across restarts
    assert again.topics() == ["edge/cam-1/deploy", "edge/fleet/north-gate/deploy"]
    withdrawn, _ = again.withdraw("edge/cam-1/deploy")
    assert (
        withdrawn is not None and withdrawn["version"] == "2.0" and again.withdraw("edge/cam-1/deploy") == (None, None)
    )
    assert (again.effective("text-detector", now=NOW) or {}).get("version") == "3.0"
    assert OrderBook(tmp_path, "cam-1", "south-gate").effective("text-detector", now=NOW) is None  # another group now
    again.withdraw("edge/fleet/north-gate/deploy")
    assert OrderBook(tmp_path, "cam-1", "north-gate").effective("text-detector", now=NOW) is None


def test_an_expired_order_is_no_longer_followed_and_is_dropped(tmp_path: Path) -> None:
    book = OrderBook(tmp_path, "cam-1", "north-gate")
    short = order(target="device:cam-1", version="2.0", expires_in=timedelta(hours=1))
    book.put("edge/cam-1/deploy", short)
    assert book.effective("text-detector", now=NOW + timedelta(minutes=59)) is not None
    assert book.effective("text-detector", now=NOW + timedelta(hours=1)) is None
    assert book.expire(NOW + timedelta(minutes=59)) == []
    (gone,) = book.expire(NOW + timedelta(hours=2))
    assert gone[0] == "edge/cam-1/deploy" and gone[1]["id"] == short.id
    assert OrderBook(tmp_path, "cam-1", "north-gate").topics() == []


def test_an_older_order_or_a_withdrawn_one_published_again_is_a_replay(tmp_path: Path) -> None:
    topic = "edge/cam-1/deploy"
    book = OrderBook(tmp_path, "cam-1", "north-gate")
    old = order(target="device:cam-1", version="1.0", now=NOW)
    new = order(target="device:cam-1", version="2.0", now=NOW + timedelta(minutes=5))
    assert book.replay(topic, old) is None
    book.saw(topic, old)
    assert book.replay(topic, old) is None  # the retained order again, at a reconnect
    book.saw(topic, new)
    reason = OrderBook(tmp_path, "cam-1", "north-gate").replay(topic, old)  # remembered across restarts
    assert reason == (
        f"deployment order {old.id} was issued before order {new.id} already seen on {topic}; "
        "an older order published again is not followed (replay refused)"
    )
    group_old = order(target="group:north-gate", version="1.0", now=NOW)
    assert book.replay("edge/fleet/north-gate/deploy", group_old) is None  # another topic keeps its own marks
    gone, seen = book.withdraw(topic)  # seen there, never carried out
    assert (
        gone is None and seen is not None and (seen["id"], seen["version"], seen["withdrawn"]) == (new.id, "2.0", True)
    )
    assert book.replay(topic, new) == (
        f"deployment order {new.id} was withdrawn from {topic}; published again, it is not followed (replay refused)"
    )
    newest = order(target="device:cam-1", version="3.0", now=NOW + timedelta(minutes=9))
    assert book.replay(topic, newest) is None


def test_the_order_book_reads_the_file_of_an_older_agent(tmp_path: Path) -> None:
    (tmp_path / "orders.json").write_text('{"text-detector": {"id": "old-1", "version": "1.9"}}')
    book = OrderBook(tmp_path, "cam-1", "north-gate")
    assert (book.effective("text-detector") or {}).get("version") == "1.9"  # no expiry known: kept
    book.put("edge/cam-1/deploy", order(target="device:cam-1", version="2.0"))  # supersedes it
    assert book.topics() == ["edge/cam-1/deploy"]
