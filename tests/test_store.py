"""The local store: versions appear whole or not at all; active/previous switch in one rename."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from agent.models.manifest import dumps
from agent.models.store import Store, StoreError
from agent.util.files import write_atomic

pytestmark = pytest.mark.arm64


def install(store: Store, model: str, version: str, content: bytes | None = None) -> Path:
    content = content if content is not None else f"model {model} {version}".encode()
    digest = "sha256:" + hashlib.sha256(content).hexdigest()
    manifest = {
        "schema": 1,
        "model": model,
        "version": version,
        "created": "2026-11-25T10:00:00Z",
        "expires": "2027-11-25T10:00:00Z",
        "variants": [
            {"id": "fp32", "blob": {"digest": digest, "size": len(content)}, "ir_version": 8, "opsets": {"ai.onnx": 13}}
        ],
    }
    stage = store.stage(model)
    (stage / "model.onnx").write_bytes(content)
    (stage / "manifest.json").write_bytes(dumps(manifest))
    return store.commit(
        model,
        version,
        stage,
        {"variant": "fp32", "digest": digest, "file": "model.onnx", "provider": "CPUExecutionProvider"},
    )


def test_empty_store(tmp_path: Path) -> None:
    store = Store(tmp_path)
    assert store.models() == [] and store.active("m") is None and store.check("m") == []
    with pytest.raises(StoreError, match="m is not in the store"):
        store.rollback("m", reason="test")


def test_activate_then_rollback_swaps_active_and_previous(tmp_path: Path) -> None:
    store = Store(tmp_path)
    install(store, "m", "1.0.0")
    install(store, "m", "1.1.0")
    assert store.active("m") is None  # committed is not active
    store.activate("m", "1.0.0")
    with pytest.raises(StoreError, match="no earlier version to roll back to"):
        store.rollback("m", reason="test")
    active = store.activate("m", "1.1.0")
    assert active.version == "1.1.0" and active.path.read_bytes() == b"model m 1.1.0"
    assert store.pointer("m") == {"active": "1.1.0", "previous": "1.0.0", "history": ["1.0.0"], "held": []}
    assert store.rollback("m", reason="probation failed: too slow").version == "1.0.0"
    pointer = store.pointer("m")
    assert (pointer["active"], pointer["previous"], pointer["history"]) == ("1.0.0", None, [])
    assert [(h["version"], h["reason"]) for h in pointer["held"]] == [("1.1.0", "probation failed: too slow")]
    with pytest.raises(StoreError, match="no earlier version to roll back to"):
        store.rollback("m", reason="again")  # never forward again to the version it left
    current = store.active("m")
    assert current is not None and current.variant.id == "fp32" and current.provider == "CPUExecutionProvider"
    assert current.digest == current.variant.blob.digest and store.check("m") == []


def test_rollbacks_walk_back_through_history_and_hold_each_version_they_leave(tmp_path: Path) -> None:
    store = Store(tmp_path, keep_versions=4)
    for version in ("1.0.0", "1.1.0", "1.2.0", "1.3.0"):
        install(store, "m", version)
        store.activate("m", version)
    assert store.rollback("m", reason="ordered by the rollback command").version == "1.2.0"
    assert store.rollback("m", reason="ordered by the rollback command").version == "1.1.0"  # back, not forward
    assert [h["version"] for h in store.held("m")] == ["1.3.0", "1.2.0"]
    assert store.held("m")[0]["since"].startswith("20") and store.held_reason("m", "1.1.0") is None
    # A version named by the operator: that one, and naming a held version lifts its hold.
    assert store.rollback("m", "1.3.0", reason="the operator asked for 1.3.0").version == "1.3.0"
    assert [h["version"] for h in store.held("m")] == ["1.2.0", "1.1.0"]
    assert store.rollback("m", reason="again").version == "1.0.0"  # 1.1.0 and 1.2.0 are held: skipped
    with pytest.raises(StoreError, match="1.9.0 is not on this device"):
        store.rollback("m", "1.9.0", reason="test")
    # Activating a version (an update or an override) lifts its hold too.
    store.activate("m", "1.2.0")
    assert [h["version"] for h in store.held("m")] == ["1.1.0", "1.3.0"]


def test_a_refused_version_is_held_without_being_installed(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.hold("m", "2.0.0", "test vector fp32-0 failed")
    assert store.held_reason("m", "2.0.0") == "test vector fp32-0 failed" and store.active("m") is None
    install(store, "m", "1.0.0")
    store.activate("m", "1.0.0")
    assert store.held_reason("m", "2.0.0") == "test vector fp32-0 failed"
    store.hold("m", "2.0.0", "refused again")
    assert [(h["version"], h["reason"]) for h in store.held("m")] == [("2.0.0", "refused again")]


def test_a_pointer_written_by_an_older_agent_still_reads(tmp_path: Path) -> None:
    store = Store(tmp_path)
    install(store, "m", "1.0.0")
    install(store, "m", "1.1.0")
    (tmp_path / "models" / "m" / "pointer.json").write_text('{"active": "1.0.0", "previous": "1.1.0", "held": "1.1.0"}')
    pointer = store.pointer("m")
    assert (pointer["active"], pointer["history"], [h["version"] for h in pointer["held"]]) == (
        "1.0.0",
        ["1.1.0"],
        ["1.1.0"],
    )


def test_collect_keeps_n_versions_and_never_the_active_or_previous(tmp_path: Path) -> None:
    store = Store(tmp_path, keep_versions=3)
    for v in ("1.0.0", "1.1.0", "1.2.0", "1.3.0", "1.4.0"):
        install(store, "m", v)
    store.activate("m", "1.0.0")
    store.activate("m", "1.1.0")
    assert store.collect("m") == ["1.3.0", "1.2.0"]
    assert store.versions("m") == ["1.0.0", "1.1.0", "1.4.0"]
    assert not [p for p in (tmp_path / "models" / "m").iterdir() if p.name.startswith(".trash")]


def test_keep_versions_is_at_least_two(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        Store(tmp_path, keep_versions=1)


def test_recover_clears_what_a_crash_leaves(tmp_path: Path) -> None:
    store = Store(tmp_path)
    install(store, "m", "1.0.0")
    store.activate("m", "1.0.0")
    stage = store.stage("m")
    (stage / "model.onnx").write_bytes(b"half")
    (tmp_path / "models" / "m" / ".trash-abc").mkdir()
    (tmp_path / "models" / "m" / ".pointer.json.1234.tmp").write_bytes(b"{")
    partial = store.partial_path("sha256:" + "0" * 64)
    partial.write_bytes(b"resume me")
    removed = store.recover()
    assert len(removed) == 3 and partial.exists()  # partial downloads stay, to be resumed
    assert sorted(p.name for p in (tmp_path / "models" / "m").iterdir()) == ["1.0.0", "pointer.json"]


def test_a_version_folder_without_installed_json_is_not_a_version(tmp_path: Path) -> None:
    store = Store(tmp_path)
    (tmp_path / "models" / "m" / "9.9.9").mkdir(parents=True)
    assert store.versions("m") == []


def test_check_reports_damage(tmp_path: Path) -> None:
    store = Store(tmp_path)
    folder = install(store, "m", "1.0.0")
    store.activate("m", "1.0.0")
    (folder / "model.onnx").write_bytes(b"model m 1.0.1")  # same size, other bytes
    assert store.check("m") == [
        f"active: {folder / 'model.onnx'} does not match its digest {store.installed('m', '1.0.0').digest}"
    ]
    (folder / "model.onnx").unlink()
    assert "is missing" in store.check("m")[0]
    (tmp_path / "models" / "m" / "pointer.json").write_text("{")
    assert "not valid JSON" in store.check("m")[0]


def test_write_atomic_replaces_whole(tmp_path: Path) -> None:
    target = tmp_path / "p.json"
    write_atomic(target, b'{"a": 1}')
    write_atomic(target, b'{"a": 2}')
    assert json.loads(target.read_bytes()) == {"a": 2} and [p.name for p in tmp_path.iterdir()] == ["p.json"]


def test_lock_is_reentrant_across_store_objects_in_turn(tmp_path: Path) -> None:
    with Store(tmp_path).lock():
        pass
    with Store(tmp_path).lock():
        pass


def test_resolve_for_the_pipeline(tmp_path: Path) -> None:
    from types import SimpleNamespace

    store = Store(tmp_path)
    with pytest.raises(ValueError, match="model 'm' has no active version in the store yet"):
        store.resolve(SimpleNamespace(model="m"))
    install(store, "m", "1.0.0")
    store.activate("m", "1.0.0")
    path, version = store.resolve(SimpleNamespace(model="m"))
    assert version == "1.0.0" and path.read_bytes() == b"model m 1.0.0"
