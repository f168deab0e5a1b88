"""The device's registry client against a real HTTP server on loopback, with tiny models.

Every refusal is checked for its reason, and for what must not have happened: no blob requested
when the refusal could be made from the signed manifest, nothing left in the store, nothing active.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from agent.cloud.publish import write_signed
from agent.cloud.server import REQUESTS_KEPT
from agent.device.compat import caps_for
from agent.device.hardware import probe
from agent.models.fetch import retry_after
from agent.models.manifest import dumps
from agent.models.signing import CHANNEL, generate_keypair, load_private_key
from agent.models.store import Store
from agent.models.variants import fast_fp16
from agent.models.vectors import encode
from agent.transport.events import Event
from tests.helpers.registry import FaultyHandler, Registry

pytestmark = pytest.mark.arm64

CAPS = caps_for("1.32.0")


def types(events: list[Event]) -> list[str]:
    return [e.type for e in events]


def assert_nothing_installed(state: Path, model: str = "m") -> None:
    store = Store(state)
    assert store.active(model) is None and store.versions(model) == []
    folder = state / "models" / model
    assert not folder.exists() or not [p for p in folder.iterdir() if p.name.startswith(".stage")]
    partial = state / "models" / ".partial"
    assert not partial.exists() or list(partial.iterdir()) == []


def test_pull_activates_and_a_second_poll_is_a_conditional_get(registry: Registry, tmp_path: Path) -> None:
    registry.publish("m", "1.0.0", registry.tiny("m1"))
    events: list[Event] = []
    client = registry.client(tmp_path / "state", events, caps=CAPS)
    result = client.check_and_pull("m")
    assert (result.status, result.version, result.variant, result.provider) == (
        "activated",
        "1.0.0",
        "fp32",
        "CPUExecutionProvider",
    )
    assert types(events) == ["model.downloading", "model.verifying", "model.activated"]
    assert events[-1].fields == {
        "model": "m",
        "version": "1.0.0",
        "variant": "fp32",
        "provider": "CPUExecutionProvider",
        "previous": None,
        # agent.models.variants: why this variant for this provider (a CPU with native fp16, as an
        # emulated Neoverse N1, would run an fp16 variant first)
        "preference": (
            "fp16 before fp32: CPU runs fp16 faster"
            if fast_fp16("CPUExecutionProvider", probe().cpu.flags)
            else "fp32 first on CPU"
        ),
    }
    active = Store(tmp_path / "state").active("m")
    assert active is not None and active.path.read_bytes() == registry.tiny("m1").read_bytes()
    assert (active.directory / "manifest.json").read_bytes() == registry.manifest_path("m", "1.0.0").read_bytes()

    n = len(registry.server.requests)
    again = registry.client(tmp_path / "state", events, caps=CAPS).check_and_pull("m")
    assert again.status == "current" and types(events)[-1] == "model.activated"
    polls = registry.server.requests[n:]
    # The root of trust first (docs/trust.md), then the channel: each a conditional GET.
    assert [r["path"] for r in polls] == ["/keys/root.json", "/channels/m/stable.json", "/channels/m/stable.json.sig"]
    assert all(r["if_none_match"] for r in polls)


def test_update_keeps_previous_for_rollback(registry: Registry, tmp_path: Path) -> None:
    registry.publish("m", "1.0.0", registry.tiny("a"))
    client = registry.client(tmp_path / "state", caps=CAPS)
    client.check_and_pull("m")
    registry.publish("m", "1.1.0", registry.tiny("b", doc=b"second"))
    result = client.check_and_pull("m")
    assert (result.status, result.version, result.previous) == ("activated", "1.1.0", "1.0.0")
    store = Store(tmp_path / "state")
    assert store.rollback("m", reason="test").version == "1.0.0"


@pytest.mark.parametrize("cap,want", [(None, "op18"), (17, "op16"), (16, "op16"), (15, "op15")])
def test_the_device_picks_the_variant_its_runtime_loads(
    registry: Registry, tmp_path: Path, cap: int | None, want: str
) -> None:
    for opset in (15, 18, 16):
        registry.publish("vad", "1.0.0", registry.tiny(f"op{opset}", opset=opset), variant_id=f"op{opset}")
    caps = CAPS if cap is None else CAPS.with_limits(ai_onnx=cap)
    result = registry.client(tmp_path / "state", caps=caps).check_and_pull("vad")
    assert (result.status, result.variant) == ("activated", want)
    # Only the chosen variant's file was fetched.
    fetched = {r["path"] for r in registry.blob_requests()}
    assert f"/blobs/sha256/{registry.blob_path('vad', '1.0.0', ['op18', 'op16', 'op15'].index(want)).name}" in fetched
    assert (
        len([p for p in fetched if p.split("/")[-1] in {registry.blob_path("vad", "1.0.0", i).name for i in range(3)}])
        == 1
    )


def refuse(
    registry: Registry,
    tmp_path: Path,
    expect: str,
    before_download: bool = True,
    version: str | None = None,
    **client_args: Any,
) -> None:
    events: list[Event] = []
    client_args.setdefault("caps", CAPS)
    result = registry.client(tmp_path / "state", events, **client_args).check_and_pull("m", version=version)
    assert result.status == "refused", result
    assert expect in (result.reason or ""), result.reason
    assert types(events)[-1] == "model.refused" and events[-1].fields["reason"] == result.reason
    assert "model.activated" not in types(events)
    if before_download:
        assert registry.blob_requests() == [] and "model.downloading" not in types(events)
    assert_nothing_installed(tmp_path / "state")


def test_refused_opset_too_new(registry: Registry, tmp_path: Path) -> None:
    registry.publish("m", "1.0.0", registry.tiny("m", opset=18))
    refuse(
        registry,
        tmp_path,
        "variant fp32 needs ai.onnx opset 18; this runtime loads up to 15",
        caps=CAPS.with_limits(ai_onnx=15),
    )


def test_refused_ir_too_new(registry: Registry, tmp_path: Path) -> None:
    registry.publish("m", "1.0.0", registry.tiny("m", opset=18, ir=10))
    refuse(
        registry,
        tmp_path,
        "variant fp32 needs IR version 10; this runtime loads up to 9",
        caps=CAPS.with_limits(ir_version=9),
    )


def test_refused_every_variant_with_its_reason(registry: Registry, tmp_path: Path) -> None:
    registry.publish("m", "1.0.0", registry.tiny("a", opset=18), variant_id="op18")
    registry.publish("m", "1.0.0", registry.tiny("b", opset=16), variant_id="op16")
    refuse(
        registry,
        tmp_path,
        "no variant can run here: variant op18 needs ai.onnx opset 18; this runtime loads up to 15; "
        "variant op16 needs ai.onnx opset 16; this runtime loads up to 15",
        caps=CAPS.with_limits(ai_onnx=15),
    )


def test_refused_unknown_custom_domain(registry: Registry, tmp_path: Path) -> None:
    registry.publish("m", "1.0.0", registry.tiny("m", extra={"com.example.vision": 1}))
    refuse(
        registry,
        tmp_path,
        "needs custom domain 'com.example.vision' (opset 1); no custom-op library for it is registered here",
    )


def test_refused_wrong_architecture(registry: Registry, tmp_path: Path) -> None:
    registry.publish("m", "1.0.0", registry.tiny("m"), architectures=("riscv64",))
    refuse(registry, tmp_path, f"variant fp32 is built for riscv64; this device is {CAPS.arch}")


def test_refused_provider_not_here(registry: Registry, tmp_path: Path) -> None:
    registry.publish("m", "1.0.0", registry.tiny("m"), providers=("TensorrtExecutionProvider",))
    refuse(registry, tmp_path, "variant fp32 suits TensorrtExecutionProvider; this device has CPUExecutionProvider")


def test_refused_bad_signature(registry: Registry, tmp_path: Path) -> None:
    registry.publish("m", "1.0.0", registry.tiny("m"))
    path = registry.manifest_path("m", "1.0.0")
    path.write_bytes(path.read_bytes().replace(b'"precision": "fp32"', b'"precision": "int8"'))
    refuse(registry, tmp_path, "bad signature on models/m/1.0.0/manifest.json")


def test_refused_bad_channel_signature(registry: Registry, tmp_path: Path) -> None:
    registry.publish("m", "1.0.0", registry.tiny("m"))
    path = registry.root / "channels" / "m" / "stable.json"
    path.write_bytes(path.read_bytes().replace(b"1.0.0", b"1.0.1"))
    refuse(registry, tmp_path, "bad signature on channels/m/stable.json")


def test_refused_unknown_key(registry: Registry, tmp_path: Path) -> None:
    registry.publish("m", "1.0.0", registry.tiny("m"))
    other, _ = generate_keypair(tmp_path / "attacker")
    registry.resign("m", "1.0.0", lambda doc: None, key=other)
    refuse(registry, tmp_path, "models/m/1.0.0/manifest.json is signed by unknown key")


def test_refused_expired_manifest(registry: Registry, tmp_path: Path) -> None:
    registry.publish("m", "1.0.0", registry.tiny("m"), expires_days=30)

    def later() -> datetime:
        return datetime(2099, 1, 1, tzinfo=timezone.utc)

    refuse(registry, tmp_path, "manifest of m 1.0.0 expired at", version="1.0.0", now=later)
    refuse(registry, tmp_path, "channels/m/stable.json expired at", now=later)


def test_refused_older_version_unless_rollback_ordered(registry: Registry, tmp_path: Path) -> None:
    registry.publish("m", "1.0.0", registry.tiny("a"))
    registry.publish("m", "2.0.0", registry.tiny("b", doc=b"2"))
    state = tmp_path / "state"
    assert registry.client(state, caps=CAPS).check_and_pull("m").version == "2.0.0"
    # An attacker (or a stale mirror) moves the channel back to a validly signed older version.
    from agent.cloud.publish import move_channel

    move_channel(registry.root, "m", "stable", "1.0.0", load_private_key(registry.key))
    n = len(registry.server.requests)
    events: list[Event] = []
    result = registry.client(state, events, caps=CAPS).check_and_pull("m")
    assert result.status == "refused" and result.reason == (
        "version 1.0.0 is older than the active 2.0.0; an older version is only installed on a rollback order"
    )
    assert [
        r for r in registry.server.requests[n:] if "/models/" in str(r["path"]) or "/blobs/" in str(r["path"])
    ] == []
    active = Store(state).active("m")
    assert active is not None and active.version == "2.0.0"
    ordered = registry.client(state, caps=CAPS).check_and_pull("m", version="1.0.0", allow_older=True)
    assert (ordered.status, ordered.version) == ("activated", "1.0.0")


@pytest.mark.parametrize("pointer_version", ["../../../etc", "..", "a/b"])
def test_refused_path_traversal_in_a_signed_channel(registry: Registry, tmp_path: Path, pointer_version: str) -> None:
    registry.publish("m", "1.0.0", registry.tiny("m"))
    doc = {
        "model": "m",
        "channel": "stable",
        "version": pointer_version,
        "updated": "2026-11-25T00:00:00Z",
        "expires": "2099-01-01T00:00:00Z",
    }
    write_signed(registry.root / "channels" / "m" / "stable.json", dumps(doc), load_private_key(registry.key), CHANNEL)
    refuse(registry, tmp_path, f"channels/m/stable.json: version: {pointer_version!r} is not a safe name")


def test_refused_path_traversal_in_names_asked_for(registry: Registry, tmp_path: Path) -> None:
    client = registry.client(tmp_path / "state", caps=CAPS)
    assert "model '../m' is not a safe name" in (client.check_and_pull("../m").reason or "")
    assert "version '../../x' is not a safe name" in (client.check_and_pull("m", version="../../x").reason or "")
    assert registry.server.requests == []


def test_refused_mix_and_match(registry: Registry, tmp_path: Path) -> None:
    registry.publish("other", "1.0.0", registry.tiny("o"))
    target = registry.manifest_path("m", "1.0.0")
    target.parent.mkdir(parents=True)
    for name in ("manifest.json", "manifest.json.sig"):
        (target.parent / name).write_bytes((registry.manifest_path("other", "1.0.0").parent / name).read_bytes())
    refuse(registry, tmp_path, "models/m/1.0.0/manifest.json is signed for other 1.0.0, not m 1.0.0", version="1.0.0")


def test_refused_oversized_blob(registry: Registry, tmp_path: Path) -> None:
    registry.publish("m", "1.0.0", registry.tiny("m"))
    blob = registry.blob_path("m", "1.0.0")
    size = blob.stat().st_size
    with open(blob, "ab") as f:
        f.write(b"\0" * 1000)
    refuse(
        registry, tmp_path, f"is {size + 1000} bytes on the registry; the signed size is {size}", before_download=False
    )


def test_refused_endless_blob_stops_at_the_signed_size(registry: Registry, tmp_path: Path) -> None:
    registry.publish("m", "1.0.0", registry.tiny("m", doc=os.urandom(200_000)))
    blob = registry.blob_path("m", "1.0.0")
    registry.server.endless[blob.name] = True
    refuse(registry, tmp_path, "is larger than its signed size", before_download=False)


def test_refused_truncated_blob(registry: Registry, tmp_path: Path) -> None:
    registry.publish("m", "1.0.0", registry.tiny("m", doc=b"x" * 1000))
    blob = registry.blob_path("m", "1.0.0")
    size = blob.stat().st_size
    blob.write_bytes(blob.read_bytes()[: size // 2])
    refuse(
        registry,
        tmp_path,
        f"is truncated on the registry: {size // 2} bytes, the signed size is {size}",
        before_download=False,
    )


def test_refused_digest_mismatch(registry: Registry, tmp_path: Path) -> None:
    registry.publish("m", "1.0.0", registry.tiny("m", doc=b"x" * 1000))
    blob = registry.blob_path("m", "1.0.0")
    data = bytearray(blob.read_bytes())
    data[-10] ^= 1
    blob.write_bytes(bytes(data))
    refuse(registry, tmp_path, "m 1.0.0 variant fp32 does not match its signed digest sha256:", before_download=False)


def test_refused_failing_test_vectors(registry: Registry, tmp_path: Path) -> None:
    registry.publish("m", "1.0.0", registry.tiny("m"))
    wrong = registry.put(encode({"y": np.full((1, 4), 7.0, np.float32)}))

    def mutate(doc: dict[str, Any]) -> None:
        doc["tests"][0]["expected"] = wrong

    registry.resign("m", "1.0.0", mutate)
    refuse(
        registry,
        tmp_path,
        "test vector fp32-0 failed on CPUExecutionProvider: output 'y' differs by up to",
        before_download=False,
    )


def test_refused_header_disagreeing_with_the_manifest(registry: Registry, tmp_path: Path) -> None:
    registry.publish("m", "1.0.0", registry.tiny("m", opset=13))
    registry.resign("m", "1.0.0", lambda doc: doc["variants"][0].update(opsets={"ai.onnx": 12}))
    refuse(
        registry,
        tmp_path,
        "variant fp32: the file says IR 8 opsets {'ai.onnx': 13}; the signed manifest says",
        before_download=False,
    )


def test_download_interrupted_half_way_resumes_with_range(registry: Registry, tmp_path: Path) -> None:
    registry.publish("m", "1.0.0", registry.tiny("m", doc=os.urandom(1_000_000)))
    blob = registry.blob_path("m", "1.0.0")
    half = blob.stat().st_size // 2
    registry.server.faults[blob.name] = ("cut", half)
    result = registry.client(tmp_path / "state", caps=CAPS).check_and_pull("m")
    assert result.status == "activated"
    gets = [r for r in registry.blob_requests() if r["path"].endswith(blob.name)]
    assert len(gets) == 2 and gets[0]["range"] is None
    # It resumes from what reached the disk: the cut loses at most the chunk being read.
    start = int(gets[1]["range"].removeprefix("bytes=").rstrip("-"))
    assert half - 65536 <= start <= half


def test_a_later_pull_resumes_what_an_earlier_one_left(registry: Registry, tmp_path: Path) -> None:
    registry.publish("m", "1.0.0", registry.tiny("m", doc=os.urandom(1_000_000)))
    blob = registry.blob_path("m", "1.0.0")
    half = blob.stat().st_size // 2
    registry.server.faults[blob.name] = ("cut", half)
    events: list[Event] = []
    first = registry.client(tmp_path / "state", events, caps=CAPS, retries=0).check_and_pull("m")
    kept = (tmp_path / "state" / "models" / ".partial" / blob.name).stat().st_size
    assert first.status == "failed" and f"connection broken at {kept} of" in (first.reason or "")
    assert types(events) == ["model.downloading", "model.error"] and half - 65536 <= kept <= half
    events.clear()
    second = registry.client(tmp_path / "state", events, caps=CAPS).check_and_pull("m")
    assert second.status == "activated" and events[0].fields["resume_from"] == kept
    assert [r["range"] for r in registry.blob_requests() if r["path"].endswith(blob.name)] == [None, f"bytes={kept}-"]


def test_not_enough_disk_fails_before_downloading(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.publish("m", "1.0.0", registry.tiny("m"))
    monkeypatch.setattr(Store, "free_bytes", lambda self: 1000)
    result = registry.client(tmp_path / "state", caps=CAPS).check_and_pull("m")
    assert result.status == "failed" and "not enough disk for m 1.0.0" in (result.reason or "")
    assert registry.blob_requests() == []


def test_registry_down_is_a_failure_not_a_refusal(tmp_path: Path) -> None:
    from agent.models.registry import RegistryClient
    from tests.helpers.broker import free_port

    _, public = generate_keypair(tmp_path / "k")
    events: list[Event] = []
    client = RegistryClient(
        f"http://127.0.0.1:{free_port()}/",
        public,
        Store(tmp_path / "state"),
        emit=events.append,
        caps=CAPS,
        retries=2,
        backoff=0.01,
        timeout=2,
    )
    result = client.check_and_pull("m")
    assert result.status == "failed" and "GET http://127.0.0.1" in (result.reason or "")
    assert types(events) == ["model.error"]


def test_labels_travel_with_the_version(registry: Registry, tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("background\ntext\n")
    registry.publish("m", "1.0.0", registry.tiny("m"), labels=labels)
    registry.client(tmp_path / "state", caps=CAPS).check_and_pull("m")
    active = Store(tmp_path / "state").active("m")
    assert active is not None and active.labels is not None and active.labels.read_text() == "background\ntext\n"


def test_manifest_records_what_publish_read(registry: Registry) -> None:
    result = registry.publish("m", "1.0.0", registry.tiny("m", opset=16, ir=8))
    v = result.manifest.variants[0]
    assert (v.ir_version, v.opsets, v.min_runtime, v.precision, v.format) == (
        8,
        {"ai.onnx": 16},
        "1.11",
        "fp32",
        "onnx",
    )
    assert [(i.name, i.type, i.shape) for i in v.inputs] == [("x", "float32", (1, 4))]
    doc = json.loads(registry.manifest_path("m", "1.0.0").read_bytes())
    assert doc["tests"][0]["variant"] == "fp32" and doc["tests"][0]["atol"] == 1e-3


def test_a_rolled_back_version_is_held_whichever_path_asks_for_it(registry: Registry, tmp_path: Path) -> None:
    registry.publish("m", "1.0.0", registry.tiny("a"))
    events: list[Event] = []
    client = registry.client(tmp_path / "state", events, caps=CAPS)
    client.check_and_pull("m")
    registry.publish("m", "1.1.0", registry.tiny("b", doc=b"b"))
    client.check_and_pull("m")
    store = Store(tmp_path / "state")
    assert store.rollback("m", reason="probation failed: too slow").version == "1.0.0"
    # The channel still says 1.1.0; an order or a profile pin names it: none of them installs it again ...
    for asked in ({}, {"version": "1.1.0"}):
        held = client.check_and_pull("m", **asked)
        assert (held.status, held.version) == ("held", "1.1.0"), held
        assert "1.1.0 is held on this device (probation failed: too slow)" in (held.reason or "")
    assert store.active("m").version == "1.0.0" and types(events)[-1] == "model.activated"  # no event
    # ... only an override does (a rollback order, a pull with --allow-older), and it lifts the hold.
    assert client.check_and_pull("m", version="1.1.0", allow_older=True).status == "activated"
    assert store.held("m") == []
    store.rollback("m", reason="again")
    registry.publish("m", "1.2.0", registry.tiny("c", doc=b"c"))
    assert client.check_and_pull("m").version == "1.2.0"  # the channel moved on


def test_a_version_refused_by_its_test_vectors_is_held_and_not_downloaded_again(
    registry: Registry, tmp_path: Path
) -> None:
    registry.publish("m", "1.0.0", registry.tiny("m"))
    wrong = registry.put(encode({"y": np.full((1, 4), 7.0, np.float32)}))
    registry.resign("m", "1.0.0", lambda doc: doc["tests"][0].update(expected=wrong))
    client = registry.client(tmp_path / "state", caps=CAPS)
    refused = client.check_and_pull("m")
    assert refused.status == "refused" and Store(tmp_path / "state").held_reason("m", "1.0.0") == refused.reason
    fetched = len(registry.blob_requests())
    again = client.check_and_pull("m", version="1.0.0")
    assert again.status == "held" and len(registry.blob_requests()) == fetched


def test_a_model_that_outputs_only_nan_fails_vectors_that_expect_numbers(registry: Registry, tmp_path: Path) -> None:
    # The identity model given NaN outputs NaN: vectors that expect numbers there must fail, not compare
    # NaN as equal to anything.
    registry.publish("m", "1.0.0", registry.tiny("m"), no_tests=True)
    inputs = registry.put(encode({"x": np.full((1, 4), np.nan, np.float32)}))
    numbers = registry.put(encode({"y": np.ones((1, 4), np.float32)}))
    test = {"name": "fp32-0", "variant": "fp32", "inputs": inputs, "expected": numbers, "rtol": 1e-3, "atol": 1e-3}
    registry.resign("m", "1.0.0", lambda doc: doc.update(tests=[test]))
    refuse(
        registry,
        tmp_path,
        "test vector fp32-0 failed on CPUExecutionProvider: output 'y' is NaN at 4 of 4 positions where a number "
        "is expected",
        before_download=False,
    )


def test_a_busy_server_is_retried_with_backoff(registry: Registry, tmp_path: Path) -> None:
    registry.publish("m", "1.0.0", registry.tiny("m"))
    registry.server.faults["stable.json"] = ("status", 503)
    registry.server.faults[registry.blob_path("m", "1.0.0").name] = ("status", 502)
    sleeps: list[float] = []
    result = registry.client(tmp_path / "state", caps=CAPS, retries=2, backoff=0.5, sleep=sleeps.append).check_and_pull(
        "m"
    )
    assert result.status == "activated"
    assert len(sleeps) == 2 and all(0.25 <= s <= 0.75 for s in sleeps)  # first retry: backoff x jitter(0.5..1.5)


def test_publishing_the_same_file_again_re_signs_instead_of_adding_a_variant(registry: Registry) -> None:
    model = registry.tiny("m")
    registry.publish("m", "1.0.0", model)
    first = json.loads(registry.manifest_path("m", "1.0.0").read_bytes())
    registry.publish("m", "1.0.0", model)
    again = json.loads(registry.manifest_path("m", "1.0.0").read_bytes())
    assert [v["id"] for v in again["variants"]] == [v["id"] for v in first["variants"]] == ["fp32"]
    registry.publish("m", "1.0.0", registry.tiny("m-op12", opset=12))
    assert [v["id"] for v in json.loads(registry.manifest_path("m", "1.0.0").read_bytes())["variants"]] == [
        "fp32",
        "fp32-op12",
    ]


class RetryLaterHandler(FaultyHandler):
    """Answers the statuses queued in `server.later[name]` first, each with its Retry-After header, as a
    CDN's rate limit or a server in maintenance does."""

    def _serve(self, body: bool) -> None:
        path = self.resolve()
        queued = self.server.later.get(path.name) if path is not None else None  # type: ignore[attr-defined]
        if queued:
            status, after = queued.pop(0)
            self.server.record(self)
            self._status_only(status, {"Retry-After": after})
            return
        super()._serve(body)


def answering_later(registry: Registry, later: dict[str, list[tuple[int, str]]]) -> None:
    registry.server.later = later  # type: ignore[attr-defined]
    registry.server.RequestHandlerClass = RetryLaterHandler


def test_429_and_503_are_retried_after_what_retry_after_says(registry: Registry, tmp_path: Path) -> None:
    registry.publish("m", "1.0.0", registry.tiny("m"))
    blob = registry.blob_path("m", "1.0.0").name
    in_a_while = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=40), usegmt=True)
    answering_later(registry, {"stable.json": [(429, "7")], blob: [(503, in_a_while)]})
    sleeps: list[float] = []
    events: list[Event] = []
    result = registry.client(tmp_path / "state", events, caps=CAPS, retries=2, sleep=sleeps.append).check_and_pull("m")
    assert result.status == "activated", result.reason
    assert sleeps[0] == 7.0 and 38 <= sleeps[1] <= 40  # seconds, then an HTTP date (to the second)
    assert "model.refused" not in types(events)


def test_a_retry_after_past_the_deadline_fails_this_poll_and_refuses_nothing(
    registry: Registry, tmp_path: Path
) -> None:
    registry.publish("m", "1.0.0", registry.tiny("m"))
    answering_later(registry, {"stable.json": [(429, "3600")]})
    sleeps: list[float] = []
    events: list[Event] = []
    client = registry.client(tmp_path / "state", events, caps=CAPS, retries=5, sleep=sleeps.append)
    failed = client.check_and_pull("m")
    assert failed.status == "failed" and sleeps == []
    assert "HTTP 429, Retry-After 3600 s" in (failed.reason or "") and "deadline" in (failed.reason or "")
    assert types(events) == ["model.error"]
    assert client.check_and_pull("m").status == "activated"  # the next poll: the model was never refused


def test_a_truncated_document_is_never_trusted_and_is_fetched_again(registry: Registry, tmp_path: Path) -> None:
    registry.publish("m", "1.0.0", registry.tiny("m"))
    registry.server.faults["manifest.json"] = ("cut", 20)  # 20 bytes of a longer Content-Length, then gone
    sleeps: list[float] = []
    result = registry.client(tmp_path / "state", caps=CAPS, retries=1, sleep=sleeps.append).check_and_pull("m")
    assert result.status == "activated", result.reason
    manifests = [r for r in registry.server.requests if str(r["path"]).endswith("/manifest.json")]
    assert len(manifests) == 2 and len(sleeps) == 1


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        (" 0 ", 0.0),
        ("Wed, 21 Oct 2026 07:28:00 GMT", 30.0),  # now + 30 s
        ("Wed, 21 Oct 2026 07:27:00 GMT", 0.0),  # already past
        ("soon", None),
        ("-5", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_header(header: str | None, seconds: float | None) -> None:
    now = datetime(2026, 10, 21, 7, 27, 30, tzinfo=timezone.utc).timestamp()
    assert retry_after(header, now) == seconds


def test_the_development_server_keeps_only_the_newest_requests(registry: Registry) -> None:
    registry.publish("m", "1.0.0", registry.tiny("m"))
    with requests.Session() as http:
        for _ in range(REQUESTS_KEPT + 50):
            http.head(registry.url + "channels/m/stable.json", timeout=5)
    kept = registry.server.requests
    assert len(kept) == REQUESTS_KEPT and all(r["method"] == "HEAD" for r in kept)
