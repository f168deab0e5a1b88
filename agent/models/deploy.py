"""Deployment orders: "run model M at version V", signed by an orders key of the registry, retained on MQTT.

`edge-agent fleet deploy` writes an order to `<prefix>/<device>/deploy` (target `device:ID`) or to
`<prefix>/fleet/<group>/deploy` (target `group:NAME`), retained, so that a device that connects later
still finds it. The payload is one JSON object:

    {"order": "<the order's JSON text>", "sig": {"alg": "ed25519", "key": KEYID, "sig": BASE64}}

The order travels as a string so that the signature covers its exact bytes (the same signature file as
`manifest.json.sig`, from `agent.models.signing`, bound to the order payload type so that no other
signed document passes for an order), with no canonical-JSON rules for other tools to get right. An
empty retained payload means the order was withdrawn.

A device trusts an order exactly as far as it trusts a manifest: signature first (by a key its
registry's root trusts for orders now: agent.models.trust), then a strict parse
(unknown keys, wrong types, names that fail the registry's name patterns, times Python cannot hold in UTC are
refused), then expiry, then the issue time: one more than MAX_CLOCK_SKEW ahead of the device's clock is
refused, for its issue time would become its topic's replay mark (agent.models.orders) and hold back every
order issued before it, however long the clocks take to get there. Every refusal is one line, fit for a
`deploy.refused` event.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.models.signing import ORDER, SignatureError, sign, verify
from agent.util import jsonlimits
from agent.util.names import NAME_PATTERN, VERSION_PATTERN
from agent.util.timefmt import from_iso

SCHEMA = 1
MAX_ORDER_BYTES = 64 * 1024
DEFAULT_EXPIRES = timedelta(days=7)
# How far ahead of the device's clock an order may be issued: an order from a signer whose clock ran years
# ahead once locked its topic until then (replay marks), and locks it for a day at most now. A day, not
# minutes: a board without a real-time clock starts at the time it last stopped (fake-hwclock) and may
# connect before NTP corrects it, and an order it refuses is read again only at its next connect.
MAX_CLOCK_SKEW = timedelta(days=1)
WHAT = "deployment order"

_NAME = re.compile(NAME_PATTERN)
_VERSION = re.compile(VERSION_PATTERN)
_NAME_WORDS = "letters, digits, '_', '.' and '-', up to 64, starting with a letter or digit"
_VERSION_WORDS = "letters, digits, '_', '.', '+' and '-', up to 64, starting with a letter or digit"

_REQUIRED = ("schema", "id", "model", "version", "target", "issued", "expires")
_OPTIONAL = ("allow_older", "canary")


class OrderError(ValueError):
    """An order a device must not act on; the message is the one-line reason it publishes.
    `order_id` is the id the payload claims, when it could be read (it is not trusted)."""

    def __init__(self, message: str, order_id: str | None = None) -> None:
        super().__init__(message)
        self.order_id = order_id


@dataclass(frozen=True)
class Canary:
    """Set on the device orders of a canary run: the group being rolled out and its canary devices."""

    group: str
    devices: tuple[str, ...]


@dataclass(frozen=True)
class DeployOrder:
    id: str
    model: str
    version: str
    target: str  # "device:ID" or "group:NAME"
    issued: datetime
    expires: datetime
    allow_older: bool = False  # a rollback order: install a version older than the active one
    canary: Canary | None = None

    @property
    def target_kind(self) -> str:
        return self.target.split(":", 1)[0]

    @property
    def target_name(self) -> str:
        return self.target.split(":", 1)[1]

    def as_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "schema": SCHEMA,
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "target": self.target,
            "issued": _iso(self.issued),
            "expires": _iso(self.expires),
        }
        if self.allow_older:
            doc["allow_older"] = True
        if self.canary is not None:
            doc["canary"] = {"group": self.canary.group, "devices": list(self.canary.devices)}
        return doc

    def to_bytes(self) -> bytes:
        return json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":")).encode()

    def event_fields(self) -> dict[str, str]:
        """What a device adds to every event about this order, so that `fleet deploy` can follow it."""
        return {"order": self.id, "model": self.model, "version": self.version}

    def expired(self, now: datetime | None = None) -> bool:
        return self.expires <= (now or datetime.now(timezone.utc))


def _iso(ts: datetime) -> str:
    return ts.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_order_id(now: datetime | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    return now.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def parse_target(target: str) -> tuple[str, str]:
    """("device", ID) or ("group", NAME); ValueError with a one-line message otherwise."""
    kind, sep, name = target.partition(":") if isinstance(target, str) else ("", "", "")
    if not sep or kind not in ("device", "group"):
        raise ValueError(f"target {target!r} must be device:ID or group:NAME")
    if not _NAME.fullmatch(name):
        raise ValueError(f"{kind} {name!r} in target {target!r} is not a name ({_NAME_WORDS})")
    return kind, name


def new_order(
    model: str,
    version: str,
    target: str,
    *,
    expires_in: timedelta = DEFAULT_EXPIRES,
    allow_older: bool = False,
    canary: Canary | None = None,
    now: datetime | None = None,
    order_id: str | None = None,
) -> DeployOrder:
    """A fresh order, checked as strictly as a device will check it (ValueError, one line)."""
    now = (now or datetime.now(timezone.utc)).replace(microsecond=0)
    order = DeployOrder(
        id=order_id or new_order_id(now),
        model=model,
        version=version,
        target=target,
        issued=now,
        expires=now + expires_in,
        allow_older=allow_older,
        canary=canary,
    )
    _check(order.as_dict())  # one set of rules for writing and reading
    return order


def sign_order(order: DeployOrder, private_key: Ed25519PrivateKey) -> bytes:
    """The retained payload: the order's exact bytes and an ed25519 signature over them."""
    data = order.to_bytes()
    envelope = {"order": data.decode(), "sig": json.loads(sign(private_key, data, ORDER))}
    return json.dumps(envelope, separators=(",", ":")).encode()


Keys = Mapping[str, Ed25519PublicKey]


def parse_order(
    payload: bytes, public_keys: Keys | Callable[[], Keys], *, now: datetime | None = None
) -> DeployOrder | None:
    """The verified order in a retained deploy payload; None for an empty payload (order withdrawn).

    Raises OrderError (one line) for anything a device must not act on: not JSON, not the envelope,
    a bad signature or an unknown key, a strict-parse failure, or an expired order. `public_keys` may be a
    function that fetches them: called only for a payload that is an envelope, so that garbage published on
    a group's deploy topic does not make every device of the group ask the registry for its keys."""
    if not payload:
        return None
    if len(payload) > MAX_ORDER_BYTES:
        raise OrderError(f"{WHAT} is {len(payload)} bytes; the limit is {MAX_ORDER_BYTES}")
    try:
        envelope = jsonlimits.loads(payload, max_bytes=MAX_ORDER_BYTES)
    except ValueError as exc:
        raise OrderError(f"{WHAT} is not JSON ({_first_line(exc)})") from None
    if (
        not isinstance(envelope, dict)
        or set(envelope) != {"order", "sig"}
        or not isinstance(envelope["order"], str)
        or not isinstance(envelope["sig"], dict)
    ):
        raise OrderError(f'{WHAT} is not {{"order": "<JSON text>", "sig": {{...}}}}')
    text: str = envelope["order"]
    claimed = _claimed_id(text)
    what = f"{WHAT} {claimed}" if claimed else WHAT
    try:
        signed = text.encode()
    except UnicodeEncodeError:  # valid JSON can escape a lone surrogate, which has no UTF-8 form
        raise OrderError(f"{what} is not UTF-8 text (a lone surrogate)", claimed) from None
    try:
        keys = public_keys() if callable(public_keys) else public_keys
        verify(keys, signed, json.dumps(envelope["sig"]).encode(), what, ORDER)
    except SignatureError as exc:
        raise OrderError(str(exc), claimed) from None
    try:
        doc = jsonlimits.loads(text, max_bytes=MAX_ORDER_BYTES)
    except ValueError as exc:
        raise OrderError(f"{what} is not JSON ({_first_line(exc)})", claimed) from None
    try:
        order = _check(doc)
    except ValueError as exc:
        raise OrderError(f"{what}: {exc}", claimed) from None
    current = now or datetime.now(timezone.utc)
    if order.expired(current):
        raise OrderError(
            f"{what} expired at {_iso(order.expires)}; issue a new one with `edge-agent fleet deploy`", order.id
        )
    if order.issued - current > MAX_CLOCK_SKEW:
        raise OrderError(
            f"{what} is issued at {_iso(order.issued)}, more than {MAX_CLOCK_SKEW.total_seconds() / 3600:.0f} h ahead of this "
            f"device's clock ({_iso(current)}); check the clocks (NTP) of this device and of the host that signed it",
            order.id,
        )
    return order


def applies_to(order: DeployOrder, device_id: str, group: str) -> bool:
    """Is this device the order's target (itself, or its group)?"""
    return target_applies(order.target, device_id, group)


def target_applies(target: str, device_id: str, group: str) -> bool:
    """Is this device the target `device:ID` or `group:NAME`?"""
    kind, _, name = target.partition(":")
    return (kind == "device" and name == device_id) or (kind == "group" and name == group)


def effective_order(
    orders: Iterable[DeployOrder | None], device_id: str, group: str, now: datetime | None = None
) -> DeployOrder | None:
    """Of the orders a device holds (its own topic's and its group's), the one to act on: the most
    recently issued that applies to it and has not expired. A canary's device order and the group order
    that follows it name the same version; a later group order supersedes an older device order."""
    live = [o for o in orders if o is not None and applies_to(o, device_id, group) and not o.expired(now)]
    return max(live, key=lambda o: (o.issued, o.target_kind == "device"), default=None)


# ---- strict parsing ---------------------------------------------------------------------------------


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _claimed_id(text: str) -> str | None:
    """The id an unverified order claims, for error messages only."""
    try:
        value = jsonlimits.loads(text, max_bytes=MAX_ORDER_BYTES).get("id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and _NAME.fullmatch(value) else None


def _string(doc: dict[str, Any], key: str) -> str:
    value = doc[key]
    if not isinstance(value, str):
        raise ValueError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
    return value


def _name(doc: dict[str, Any], key: str, pattern: re.Pattern[str] = _NAME, words: str = _NAME_WORDS) -> str:
    value = _string(doc, key)
    if not pattern.fullmatch(value):
        raise ValueError(f"{key}: {value!r} is not a name ({words})")
    return value


def _time(doc: dict[str, Any], key: str) -> datetime:
    value = _string(doc, key)
    try:
        ts = from_iso(value)  # `Z` too, on Python 3.10
    except ValueError:
        raise ValueError(f"{key}: {value!r} is not an ISO 8601 time") from None
    if ts.tzinfo is None:
        raise ValueError(f"{key}: {value!r} has no UTC offset (write it like 2026-11-25T10:00:00Z)")
    try:
        return ts.astimezone(timezone.utc)
    except OverflowError:  # 9999-12-31T23:59:59-01:00: an OverflowError later, in the order book, once
        raise ValueError(f"{key}: {value!r} is out of range in UTC") from None


def _check(doc: object) -> DeployOrder:
    if not isinstance(doc, dict):
        raise ValueError(f"expected a JSON object, got {type(doc).__name__}")
    unknown = sorted(set(doc) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}")
    missing = [k for k in _REQUIRED if k not in doc]
    if missing:
        raise ValueError(f"required key {missing[0]!r} is missing")
    if type(doc["schema"]) is not int or doc["schema"] != SCHEMA:
        raise ValueError(f"schema: expected {SCHEMA}, got {doc['schema']!r}")
    order_id = _name(doc, "id")
    model = _name(doc, "model")
    version = _name(doc, "version", _VERSION, _VERSION_WORDS)
    target = _string(doc, "target")
    parse_target(target)
    issued, expires = _time(doc, "issued"), _time(doc, "expires")
    if expires <= issued:
        raise ValueError("expires is not after issued")
    allow_older = doc.get("allow_older", False)
    if not isinstance(allow_older, bool):
        raise ValueError(f"allow_older: expected true or false, got {allow_older!r}")
    canary = None
    if doc.get("canary") is not None:
        raw = doc["canary"]
        if not isinstance(raw, dict) or set(raw) != {"group", "devices"}:
            raise ValueError('canary: expected {"group": NAME, "devices": [ID, ...]}')
        group = _name(raw, "group")
        devices = raw["devices"]
        if not isinstance(devices, list) or not all(isinstance(d, str) and _NAME.fullmatch(d) for d in devices):
            raise ValueError("canary.devices: expected a list of device ids")
        canary = Canary(group, tuple(devices))
    return DeployOrder(order_id, model, version, target, issued, expires, allow_older, canary)
