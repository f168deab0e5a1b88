"""Attacks on the registry's keys, one named test each, in the manner of python-tuf's attack tests.

A real registry folder served over HTTP (tests.helpers.registry) with signing roles: an offline root key
signs keys/<N>.root.json, which names the online key of each role. The attacker writes into the folder
what a compromised mirror would serve, signed with what a thief would hold (an online key, a key of his
own); deployment orders travel through a real Mosquitto, set up as docs/mqtt.md says, to real agents
(`edge-agent run`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.cloud.roots import Change, current, following, resign
from agent.cloud.writes import replace_file
from agent.device.compat import caps_for
from agent.models.deploy import OrderError, new_order, parse_order, sign_order
from agent.models.registry import PullResult, RegistryClient
from agent.models.signing import ROOT, add_signature, generate_keypair, key_id, load_private_key, load_public_keys
from agent.models.store import Store
from agent.models.trust import LATEST, Root, parse_root, root_path
from tests.helpers.broker import Mosquitto
from tests.helpers.daemon_proc import AgentProcess, sensor_csv
from tests.helpers.models import linear_model, save
from tests.helpers.mqtt_client import Subscriber
from tests.helpers.registry import Registry, make_registry
from tests.helpers.waiting import wait_for
from tests.test_mqtt_acl import acl_broker, fleet_subscriber

CAPS = caps_for("1.32.0")


@dataclass(frozen=True)
class Keys:
    private: Path
    public: dict[str, Ed25519PublicKey]
    pub: Path

    @property
    def kid(self) -> str:
        return next(iter(self.public))


def keypair(tmp: Path, name: str) -> Keys:
    private, public = generate_keypair(tmp / "keys", name)
    return Keys(private, load_public_keys(public), public)


def root_keys(registry: Registry) -> Keys:
    assert registry.root_key is not None
    return Keys(registry.root_key, load_public_keys(registry.public_key), registry.public_key)


def online_kid(registry: Registry) -> str:
    return key_id(load_private_key(registry.key).public_key())


def device(registry: Registry, state: Path, pinned: Path | None = None, **kwargs: Any) -> RegistryClient:
    """One device's registry client: its own state folder, the root key pinned (or `pinned`)."""
    kwargs.setdefault("caps", CAPS)
    return RegistryClient(
        registry.url,
        pinned or registry.public_key,
        Store(state),
        providers=("CPUExecutionProvider",),
        retries=0,
        backoff=0.01,
        **kwargs,
    )


def running(registry: Registry, tmp_path: Path) -> RegistryClient:
    """A device that runs m 1.0.0 from the registry, trusting its root version of now."""
    registry.publish("m", "1.0.0", registry.tiny("a"))
    dev = device(registry, tmp_path / "dev")
    assert dev.check_and_pull("m").status == "activated"
    return dev


def serve_root(registry: Registry, root: Root, *signers: Keys, latest: bool = True, data: bytes | None = None) -> None:
    """Put root version N in the registry folder as a mirror (hostile or not) serves it: no checks."""
    body = data if data is not None else root.to_bytes()
    sig = b""
    for keys in signers:
        sig = add_signature(sig, load_private_key(keys.private), body, ROOT)
    replace_file(registry.root / (root_path(root.version) + ".sig"), sig)
    replace_file(registry.root / root_path(root.version), body)
    if latest:
        replace_file(registry.root / (LATEST + ".sig"), sig)
        replace_file(registry.root / LATEST, body)


def refused(result: PullResult, reason: str) -> None:
    assert result.status == "refused", result
    assert result.reason is not None and "\n" not in result.reason
    assert result.reason.startswith(reason) or reason in result.reason, result.reason


def newest(registry: Registry) -> Root:
    root = current(registry.root)
    assert root is not None
    return root


# ---- root rotation -----------------------------------------------------------------------------------


def test_a_chain_of_two_root_rotations_is_followed(registry: Registry, tmp_path: Path) -> None:
    registry.publish("m", "1.0.0", registry.tiny("a"))
    dev = device(registry, tmp_path / "dev")
    assert dev.check_and_pull("m").status == "activated" and dev.trust.version == 1
    r1, r2, r3 = root_keys(registry), keypair(tmp_path, "root2"), keypair(tmp_path, "root3")
    # Each rotation is signed by the outgoing root key and by the incoming one.
    registry.next_root(Change(root=True, keys=r2.public), r1.private, r2.private)
    registry.next_root(Change(root=True, keys=r3.public), r2.private, r3.private)
    registry.publish("m", "1.1.0", registry.tiny("b", doc=b"1.1"))

    result = dev.check_and_pull("m")
    assert (result.status, result.version) == ("activated", "1.1.0") and dev.trust.version == 3
    again = device(registry, tmp_path / "dev")  # the chain followed is kept in the state folder
    assert again.trust.version == 3 and again.check_and_pull("m").status == "current"

    # Devices installed at any point of the chain reach its end: pinned to the first root key (every
    # version walked from 1), to the middle one (anchored at version 2), and to the newest.
    for keys, name in ((r1, "r1"), (r2, "r2"), (r3, "r3")):
        fresh = device(registry, tmp_path / name, pinned=keys.pub)
        assert fresh.check_and_pull("m").status == "activated" and fresh.trust.version == 3, name


def test_a_new_root_not_signed_by_the_old_root_is_refused(registry: Registry, tmp_path: Path) -> None:
    dev = running(registry, tmp_path)
    thief = keypair(tmp_path, "thief")
    forged = following(newest(registry), Change(root=True, keys=thief.public))
    serve_root(registry, forged, thief)  # signed by its own (the thief's) key only
    refused(
        dev.check_and_pull("m"),
        f"keys/2.root.json has 0 valid signature(s) by the root keys of version 1 ({root_keys(registry).kid}); 1 needed",
    )
    assert dev.trust.version == 1 and device(registry, tmp_path / "dev").trust.version == 1


def test_a_new_root_not_signed_by_its_own_new_key_is_refused(registry: Registry, tmp_path: Path) -> None:
    dev = running(registry, tmp_path)
    r2 = keypair(tmp_path, "root2")
    unproven = following(newest(registry), Change(root=True, keys=r2.public))
    serve_root(registry, unproven, root_keys(registry))  # the holder of the new key never signed it
    refused(
        dev.check_and_pull("m"), f"keys/2.root.json has 0 valid signature(s) by its own root keys ({r2.kid}); 1 needed"
    )
    assert dev.trust.version == 1


def test_an_expired_root_is_refused(registry: Registry, tmp_path: Path) -> None:
    dev = running(registry, tmp_path)
    stale = following(
        newest(registry), Change(expires=timedelta(days=1)), now=datetime.now(timezone.utc) - timedelta(days=10)
    )
    serve_root(registry, stale, root_keys(registry))  # validly signed, but its time is over
    result = dev.check_and_pull("m")
    refused(result, f"root version 2 expired at {stale.expires:%Y-%m-%dT%H:%M:%SZ}; the registry's root key holders")

    # The root a device trusts expires too: a registry that is no longer re-signed (or a mirror frozen
    # in time) is refused, whatever else it serves.
    fresh = make_registry(tmp_path / "other")
    try:
        fresh.publish("m", "1.0.0", fresh.tiny("a"))
        later = newest(fresh).expires + timedelta(seconds=1)
        refused(device(fresh, tmp_path / "late", now=lambda: later).check_and_pull("m"), "root version 1 expired at ")
    finally:
        fresh.server.stop()


def test_a_root_that_lowers_its_version_is_refused(registry: Registry, tmp_path: Path) -> None:
    registry.publish("m", "1.0.0", registry.tiny("a"))
    first_root = (registry.root / root_path(1)).read_bytes(), (registry.root / (root_path(1) + ".sig")).read_bytes()
    registry.next_root(Change())  # version 2: every expiry renewed
    dev = device(registry, tmp_path / "dev")
    assert dev.check_and_pull("m").status == "activated" and dev.trust.version == 2

    # The mirror serves version 1 again as the newest (with it, keys version 2 no longer names).
    replace_file(registry.root / LATEST, first_root[0])
    replace_file(registry.root / (LATEST + ".sig"), first_root[1])
    refused(
        dev.check_and_pull("m"),
        "keys/root.json is root version 1, older than version 2 that this device trusts; a root never goes back",
    )
    # ... or names a version 3 whose file holds version 2 again.
    v2 = (registry.root / root_path(2)).read_bytes()
    third = following(parse_root(v2, "v2"), Change())
    serve_root(registry, third, root_keys(registry), data=v2)
    replace_file(registry.root / LATEST, third.to_bytes())
    refused(dev.check_and_pull("m"), "keys/3.root.json is root version 2; version 3 was expected")
    assert dev.trust.version == 2


def test_a_threshold_of_root_keys_is_needed_to_rotate(registry: Registry, tmp_path: Path) -> None:
    registry.publish("m", "1.0.0", registry.tiny("a"))
    a, b, c = (keypair(tmp_path, n) for n in "abc")
    three = {**a.public, **b.public, **c.public}
    registry.next_root(Change(root=True, keys=three, threshold=2), root_keys(registry).private, a.private, b.private)
    dev = device(registry, tmp_path / "dev")
    assert dev.check_and_pull("m").status == "activated" and dev.trust.version == 2

    renewal = following(newest(registry), Change())
    serve_root(registry, renewal, a)  # one of the three: not enough
    kids = ", ".join(sorted(three))
    refused(
        dev.check_and_pull("m"),
        f"keys/3.root.json has 1 valid signature(s) by the root keys of version 2 ({kids}); 2 needed",
    )
    serve_root(registry, renewal, a, c)  # two of them
    assert dev.check_and_pull("m").status == "current" and dev.trust.version == 3


def test_a_registry_that_drops_its_keys_is_not_trusted_as_single_key_again(registry: Registry, tmp_path: Path) -> None:
    dev = running(registry, tmp_path)
    shutil.rmtree(registry.root / "keys")
    refused(
        dev.check_and_pull("m"),
        "keys/root.json is not on the registry (404); this device trusts root version 1 and never goes back",
    )


def test_a_device_pinned_to_an_online_key_is_refused_clearly(registry: Registry, tmp_path: Path) -> None:
    """A profile of a single-key registry, kept while the registry moved to signing roles."""
    registry.publish("m", "1.0.0", registry.tiny("a"))
    online_pub = registry.key.with_suffix(".pub")
    refused(
        device(registry, tmp_path / "dev", pinned=online_pub).check_and_pull("m"),
        f"no root of this registry (versions 1 to 1) is signed by the pinned key(s) {online_kid(registry)}: "
        "registry.public_key must hold the registry's root key(s)",
    )


def test_a_single_key_registry_still_works_with_its_key_pinned(tmp_path: Path) -> None:
    """What earlier releases made, and what keeps old profiles working: no keys/, one key signs all."""
    plain = make_registry(tmp_path / "plain", roles=False)
    try:
        plain.publish("m", "1.0.0", plain.tiny("a"))
        dev = device(plain, tmp_path / "dev")
        assert dev.check_and_pull("m").status == "activated" and dev.trust.version is None
    finally:
        plain.server.stop()


# ---- revocation ----------------------------------------------------------------------------------------


def test_a_manifest_signed_by_a_revoked_key_is_refused_at_the_next_poll_and_by_a_device_back_from_offline(
    registry: Registry, tmp_path: Path
) -> None:
    registry.publish("m", "1.0.0", registry.tiny("a"))
    online, away = device(registry, tmp_path / "online"), device(registry, tmp_path / "away")
    for dev in (online, away):
        assert dev.check_and_pull("m").status == "activated"
    stolen = online_kid(registry)
    # The thief signs a version with the online key he took; the mirror serves it.
    registry.publish("m", "2.0.0", registry.tiny("evil", doc=b"evil"), channel=None)
    # The operator revokes the key (version 2, a new online key takes its roles) and signs again.
    replacement = keypair(tmp_path, "online2")
    registry.next_root(Change(revoke=frozenset({stolen}), keys=replacement.public))
    assert online.check_and_pull("m").status == "refused"  # the next poll: the channel still has the old key
    refused(
        online.check_and_pull("m", version="2.0.0"),
        f"models/m/2.0.0/manifest.json is signed by key {stolen}, revoked by root version 2; trusted: {replacement.kid}",
    )
    # A device that slept through the revocation, and one more root version, walks both when it returns.
    registry.next_root(Change())
    refused(away.check_and_pull("m", version="2.0.0"), f"is signed by key {stolen}, revoked by root version 2")
    assert away.trust.version == 3

    # Signed again with the new key (the operator checked the folder first: the thief's version goes).
    shutil.rmtree(registry.root / "models" / "m" / "2.0.0")
    key = load_private_key(replacement.private)
    resign(registry.root, key, key)
    assert online.check_and_pull("m").status == "current" and away.check_and_pull("m").status == "current"


def test_an_online_key_signs_only_for_its_role(registry: Registry, tmp_path: Path) -> None:
    orders = keypair(tmp_path, "orders")
    registry.next_root(Change(role="orders", keys=orders.public))
    registry.publish("m", "1.0.0", registry.tiny("a"))
    registry.resign("m", "1.0.0", lambda doc: None, key=orders.private)  # the orders key signs a manifest
    refused(
        device(registry, tmp_path / "dev").check_and_pull("m"),
        f"models/m/1.0.0/manifest.json is signed by key {orders.kid}, which root version 2 trusts for orders, not for manifests",
    )


# ---- cross-type replay ---------------------------------------------------------------------------------


def _copy(registry: Registry, source: str, target: str) -> None:
    for suffix in ("", ".sig"):
        destination = registry.root / (target + suffix)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(registry.root / (source + suffix), destination)


def test_a_channel_pointer_presented_as_a_manifest_is_refused(registry: Registry, tmp_path: Path) -> None:
    registry.publish("m", "1.0.0", registry.tiny("a"))
    _copy(registry, "channels/m/stable.json", "models/m/9.9.9/manifest.json")
    refused(
        device(registry, tmp_path / "dev").check_and_pull("m", version="9.9.9"),
        "models/m/9.9.9/manifest.json is signed as a channel pointer, not as a manifest",
    )
    # Relabelled as a manifest's signature, it still is not one: the signature binds the type it was made for.
    sig = registry.root / "models/m/9.9.9/manifest.json.sig"
    sig.write_text(sig.read_text().replace("channel+json", "manifest+json"))
    refused(
        device(registry, tmp_path / "dev2").check_and_pull("m", version="9.9.9"),
        "bad signature on models/m/9.9.9/manifest.json (key ",
    )


def test_a_manifest_presented_as_a_channel_pointer_is_refused(registry: Registry, tmp_path: Path) -> None:
    registry.publish("m", "1.0.0", registry.tiny("a"), channel=None)
    _copy(registry, "models/m/1.0.0/manifest.json", "channels/m/stable.json")
    refused(
        device(registry, tmp_path / "dev").check_and_pull("m"),
        "channels/m/stable.json is signed as a manifest, not as a channel pointer",
    )


def test_a_channel_pointer_presented_as_an_order_is_refused(registry: Registry, tmp_path: Path) -> None:
    registry.publish("m", "1.0.0", registry.tiny("a"))
    text = (registry.root / "channels/m/stable.json").read_text()
    sig = json.loads((registry.root / "channels/m/stable.json.sig").read_bytes())
    dev = device(registry, tmp_path / "dev")
    with pytest.raises(
        OrderError, match=r"^deployment order is signed as a channel pointer, not as a deployment order$"
    ):
        parse_order(json.dumps({"order": text, "sig": sig}).encode(), dev.order_keys())


def test_an_order_presented_as_a_manifest_is_refused(registry: Registry, tmp_path: Path) -> None:
    registry.publish("m", "1.0.0", registry.tiny("a"), channel=None)
    envelope = json.loads(sign_order(new_order("m", "1.0.0", "device:dev"), load_private_key(registry.key)))
    target = registry.root / "models/m/1.0.0/manifest.json"
    target.write_text(envelope["order"])
    target.with_name("manifest.json.sig").write_text(json.dumps(envelope["sig"]))
    refused(
        device(registry, tmp_path / "dev").check_and_pull("m", version="1.0.0"),
        "models/m/1.0.0/manifest.json is signed as a deployment order, not as a manifest",
    )


# ---- orders, on real agents ----------------------------------------------------------------------------


@dataclass
class Device:
    agent: AgentProcess
    sub: Subscriber
    registry: Registry

    @property
    def topic(self) -> str:
        return f"edge/{self.agent.device}/deploy"

    def events(self, type_: str, version: str | None = None) -> list[dict[str, Any]]:
        found = self.sub.payloads(f"edge/{self.agent.device}/events")
        return [e for e in found if e["type"] == type_ and (version is None or e.get("version") == version)]

    def wait(self, check: Any, what: str, timeout: float = 60) -> Any:
        value = wait_for(check, timeout, interval=0.1)
        assert value, f"timed out waiting for {what}\n{self.agent.stderr()[-4000:]}"
        return value

    def active(self) -> str | None:
        found = Store(self.agent.state_dir).active("m")
        return found.version if found else None

    def recorded(self) -> dict[str, Any]:
        """The orders the device follows (orders.json): only orders it carried out."""
        path = self.agent.state_dir / "orders.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def retain(self, payload: bytes) -> None:
        self.sub.client.publish(self.topic, payload, qos=1, retain=True).wait_for_publish(5)

    def order(self, version: str, key: Path, **kwargs: Any) -> bytes:
        return sign_order(new_order("m", version, f"device:{self.agent.device}", **kwargs), load_private_key(key))


def linear(tmp: Path, name: str, weight: float) -> Path:
    return save(linear_model(np.full((3, 1), weight)), tmp / f"{name}.onnx")


class DeviceAgent(AgentProcess):
    """An agent on the devices' listener of the documented broker (docs/mqtt.md), as user `dev-a`."""

    def watch_contract(self) -> None:
        """Nothing: the fleet's subscriber reads (and checks) all the device sends, while a second client
        with the device's own user would take its session over (the client id is the user name)."""


@pytest.fixture
def agent(tmp_path: Path, broker_factory: Callable[..., Mosquitto]) -> Iterator[Device]:
    """A real agent (`dev-a`) serving model m from the channel stable (1.0.0), polling every second,
    under the documented broker set-up: orders come from the fleet user on the fleet's listener."""
    broker = acl_broker(broker_factory, tmp_path)
    secret = tmp_path / "dev-a.secret"
    secret.write_text("pw-dev-a\n")
    registry = make_registry(tmp_path / "reg")
    registry.publish("m", "1.0.0", linear(tmp_path, "v1", 1.0), channel="stable")
    process = DeviceAgent(
        tmp_path,
        "dev-a",
        "g",
        broker.url,
        registry.url,
        registry.public_key,
        csv=sensor_csv(tmp_path / "sensor.csv"),
        registry={"poll_interval": "1s", "probation": {"duration": 0}},
        mqtt={"username": "dev-a", "password_file": str(secret)},
    )
    made = Device(process, fleet_subscriber(broker, "edge/#"), registry)
    process.start()
    made.wait(lambda: made.active() == "1.0.0" and made.events("agent.started"), "the agent on 1.0.0")
    yield made
    process.stop()
    made.sub.close()
    registry.server.stop()


@pytest.mark.slow
def test_an_order_signed_by_a_revoked_key_is_refused_at_once_and_by_a_device_offline_during_the_revocation(
    agent: Device, tmp_path: Path
) -> None:
    registry = agent.registry
    registry.publish("m", "2.0.0", linear(tmp_path, "v2", 2.0), channel=None)
    first_key, first_kid = registry.key, online_kid(registry)
    second = keypair(tmp_path, "online2")
    registry.next_root(Change(revoke=frozenset({first_kid}), keys=second.public))
    resign(registry.root, load_private_key(second.private), load_private_key(second.private))

    # Online: the thief's order, signed with the revoked key, arrives after the revocation.
    agent.retain(agent.order("2.0.0", first_key))
    refusal = agent.wait(lambda: agent.events("deploy.refused"), "the refusal")[0]
    assert refusal["topic"] == agent.topic
    assert f"is signed by key {first_kid}, revoked by root version 2; trusted: {second.kid}" in refusal["reason"]

    # Offline: the device is away while the second key leaks and is revoked in turn.
    assert agent.agent.terminate() == 0
    third = keypair(tmp_path, "online3")
    registry.next_root(Change(revoke=frozenset({second.kid}), keys=third.public))
    resign(registry.root, load_private_key(third.private), load_private_key(third.private))
    agent.retain(agent.order("2.0.0", second.private))
    before = len(agent.events("deploy.refused"))
    agent.agent.start()
    late = agent.wait(lambda: agent.events("deploy.refused")[before:], "the refusal on return")[0]
    assert f"is signed by key {second.kid}, revoked by root version 3; trusted: {third.kid}" in late["reason"]
    assert agent.active() == "1.0.0" and agent.events("model.activated", "2.0.0") == []
    assert agent.recorded() == {}

    # The operator's order, with the key the root trusts now, is carried out.
    agent.retain(agent.order("2.0.0", third.private))
    agent.wait(lambda: agent.active() == "2.0.0" and agent.events("model.active", "2.0.0"), "2.0.0 active")


@pytest.mark.slow
def test_an_old_order_replayed_on_the_device_topic_never_changes_what_it_follows(agent: Device, tmp_path: Path) -> None:
    registry = agent.registry
    key = registry.key
    old = agent.order("1.0.0", key)  # signed and valid: an order the operator wrote earlier
    registry.publish("m", "2.0.0", linear(tmp_path, "v2", 2.0), channel="stable")
    agent.wait(lambda: agent.active() == "2.0.0", "the channel's 2.0.0")

    # The old order for an older version, published again: refused, and not recorded.
    agent.retain(old)
    refusal = agent.wait(lambda: agent.events("model.refused", "1.0.0"), "its refusal")[0]
    assert "version 1.0.0 is older than the active 2.0.0" in refusal["reason"] and agent.recorded() == {}
    registry.publish("m", "3.0.0", linear(tmp_path, "v3", 3.0), channel="stable")
    agent.wait(lambda: agent.active() == "3.0.0", "the channel's 3.0.0: the device still follows its channel")

    # An order carried out, then withdrawn: published again, it is a replay.
    registry.publish("m", "4.0.0", linear(tmp_path, "v4", 4.0), channel=None)
    ordered = agent.order("4.0.0", key)
    agent.retain(ordered)
    agent.wait(lambda: agent.active() == "4.0.0", "the order's 4.0.0")
    agent.retain(b"")
    agent.wait(lambda: agent.active() == "3.0.0" and agent.events("deploy.withdrawn"), "back on the channel")
    refusals = len(agent.events("deploy.refused"))
    agent.retain(ordered)
    replay = agent.wait(lambda: agent.events("deploy.refused")[refusals:], "the replay's refusal")[0]
    assert (
        "was withdrawn from edge/dev-a/deploy; published again, it is not followed (replay refused)" in replay["reason"]
    )
    agent.retain(old)  # older still than the withdrawn one
    older = agent.wait(lambda: agent.events("deploy.refused")[refusals + 1 :], "the older replay's refusal")[0]
    assert "already seen on edge/dev-a/deploy" in older["reason"]
    assert agent.active() == "3.0.0" and agent.recorded() == {}
    registry.publish("m", "5.0.0", linear(tmp_path, "v5", 5.0), channel="stable")
    agent.wait(lambda: agent.active() == "5.0.0", "the channel's 5.0.0")
