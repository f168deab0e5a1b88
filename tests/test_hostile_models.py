"""A hostile model intake: the registry host, a CDN or the network lie, or a publisher's key was stolen and
what it signs lies too. Whatever comes, the device never crashes, hangs, fills its memory or its disk,
and keeps what it serves.

Every case goes through the real path: a registry on loopback (tests.helpers.registry), the real client,
store and test-vector run; a small disk is a real tmpfs (as tests/test_outbox_disk_full.py mounts it).
Before the fixes: a 1 MB test vector inflated to 1 GiB in memory (a zip bomb; bzip2 does it in 2 KB
whatever size the member claims), one whose header claimed a huge shape raised MemoryError or
OverflowError out of `check_and_pull` (and so did JSON nested too deep, a void dtype, an encrypted member
and an unknown compression), a refusal repeated 400 KB of the manifest with its escape sequences into an
event, a download abandoned when the channel moved kept the next version out of a small disk for good, a
disk filling up mid-download stayed full, and the registry cache grew by every manifest ever polled.
"""

from __future__ import annotations

import io
import json
import os
import time
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.device.compat import caps_for
from agent.models.fetch import MAX_CACHE_BYTES
from agent.models.registry import MAX_REASON_CHARS
from agent.models.registry_verify import MAX_TESTS
from agent.models.store import STALE_PARTIAL, Store
from agent.models.vectors import JSON_KEY, MAX_MEMBERS, MAX_VECTOR_BYTES, encode
from agent.transport.events import Event
from tests.helpers.registry import Registry
from tests.test_outbox_disk_full import fill, mount_tmpfs
from tests.test_registry_hostile_http import PeakRSS

CAPS = caps_for("1.32.0")
MiB = 2**20
DISK_MARGIN = 16 * MiB  # agent.models.registry.DISK_MARGIN: what a download leaves free


def npz(members: dict[str, bytes], level: int = 6) -> bytes:
    """A zip of raw members, as a hostile publisher writes it (numpy never would)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=level) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": descr, "fortran_order": False, "shape": shape})
    return out.getvalue()


def bomb(size: int) -> bytes:
    """An .npz whose one member `y.npy` inflates to `size` bytes of float32 zeros (deflate level 1, quick to
    make: size/220 on disk; numpy's level 6 makes it size/1000)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        with z.open("y.npy", "w", force_zip64=True) as member:
            member.write(npy_header((1, size // 16, 4)))
            block = bytes(MiB)
            for _ in range(size // MiB):
                member.write(block)
    return buf.getvalue()


def with_expected(registry: Registry, data: bytes, version: str = "1.0.0") -> None:
    """m `version` re-signed with `data` as its test vector's expected outputs (a stolen key)."""
    blob = registry.put(data)
    registry.resign("m", version, lambda doc: doc["tests"][0].update(expected=blob))


def pull(registry: Registry, state: Path, events: list[Event] | None = None, **kwargs: Any) -> Any:
    return registry.client(state, events, caps=CAPS, **kwargs).check_and_pull("m")


@pytest.fixture
def served(registry: Registry, tmp_path: Path) -> Registry:
    """m 1.0.0 (y = x on float32 [1, 4], with its test vector) active on the device at tmp_path/state."""
    registry.publish("m", "1.0.0", registry.tiny("m1"))
    assert pull(registry, tmp_path / "state").status == "activated"
    registry.publish("m", "1.1.0", registry.tiny("m2", doc=b"2"))
    return registry


def refused(registry: Registry, state: Path, expect: str) -> str:
    """Pull m: refused with `expect` in the reason, as a model.refused event, and 1.0.0 still serves."""
    events: list[Event] = []
    result = pull(registry, state, events)
    assert result.status == "refused", result
    assert expect in (result.reason or ""), result.reason
    assert events[-1].type == "model.refused" and events[-1].fields["reason"] == result.reason
    active = Store(state).active("m")
    assert active is not None and active.version == "1.0.0"
    return str(result.reason)


# ---- test vectors -------------------------------------------------------------------------------------


def test_a_zip_bomb_test_vector_is_refused_without_inflating_it(served: Registry, tmp_path: Path) -> None:
    """768 MiB of zeros in a 3.5 MB vector: before, all of it was inflated into one array (RSS +766 MiB), then
    refused (and held) for its shape."""
    with_expected(served, bomb(768 * MiB), "1.1.0")
    with PeakRSS() as rss:
        reason = refused(served, tmp_path / "state", "test vector fp32-0: test data cannot be read: ")
    assert f"more than the {MAX_VECTOR_BYTES} bytes test data may hold" in reason, reason
    assert rss.grown < 128 * MiB, f"RSS grew by {rss.grown / MiB:.0f} MiB"


def test_a_bzip2_member_lying_about_its_size_is_refused_without_inflating_it(served: Registry, tmp_path: Path) -> None:
    """384 MiB of zeros in 445 bytes of bzip2 whose directory entry claims 144 bytes: zipfile inflates a bzip2
    read whole before it cuts it at the member's size (before: +384 MiB here; 2 GiB in 1,749 bytes took 4 GiB)."""
    buf = io.BytesIO()
    z = zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_BZIP2)
    header = npy_header((1, 4))
    with z.open("y.npy", "w", force_zip64=True) as member:
        member.write(header)
        for _ in range(384):
            member.write(bytes(MiB))
    z.filelist[0].file_size = len(header) + 16
    z.close()
    with_expected(served, buf.getvalue(), "1.1.0")
    with PeakRSS() as rss:
        refused(served, tmp_path / "state", "member 'y.npy' is compressed with zip method 12; test data is stored")
    assert rss.grown < 128 * MiB, f"RSS grew by {rss.grown / MiB:.0f} MiB"


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda m: setattr(m, "flag_bits", m.flag_bits | 1), "member 'y.npy' is encrypted"),
        (lambda m: setattr(m, "compress_type", 99), "member 'y.npy' is compressed with zip method 99"),
    ],
)
def test_an_encrypted_or_unknown_zip_member_is_refused(
    served: Registry, tmp_path: Path, mutate: Callable[[zipfile.ZipInfo], None], reason: str
) -> None:
    """Before: RuntimeError ('password required') and NotImplementedError out of the pull."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("y.npy", npy_header((1, 4)) + bytes(16))
        mutate(z.filelist[0])
    with_expected(served, buf.getvalue(), "1.1.0")
    refused(served, tmp_path / "state", reason)


@pytest.mark.parametrize("shape", [(2**40,), (10**22,)])
def test_a_test_vector_whose_header_claims_a_huge_shape_is_refused(
    served: Registry, tmp_path: Path, shape: tuple[int, ...]
) -> None:
    """Before: numpy allocated the claimed shape first, MemoryError (8 TiB) or OverflowError out of the pull."""
    with_expected(served, npz({"y.npy": npy_header(shape) + bytes(16)}), "1.1.0")
    reason = refused(served, tmp_path / "state", "test vector fp32-0: test data cannot be read: member 'y.npy'")
    assert "bytes of data; the member holds 16" in reason, reason


def test_a_test_vector_of_too_many_members_is_refused_before_they_are_read(served: Registry, tmp_path: Path) -> None:
    """20,000 one-number members (before: all read, then an onnxruntime error; 200,000 took 16 s and 363 MiB)."""
    scalar = io.BytesIO()
    np.lib.format.write_array(scalar, np.zeros((), np.float32))
    with_expected(served, npz({f"{i}.npy": scalar.getvalue() for i in range(20_000)}, level=1), "1.1.0")
    started = time.monotonic()
    refused(served, tmp_path / "state", f"20000 members, more than the {MAX_MEMBERS} test data may have")
    assert time.monotonic() - started < 10.0


def test_a_zip_directory_too_large_to_parse_is_refused_unparsed(served: Registry, tmp_path: Path) -> None:
    """A central directory of 60,000 entries: zipfile parses every one of them (before: 1,000,000 entries, a
    91 MiB vector, took 9.7 s and 570 MiB before any could be counted)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(60_000):
            z.writestr(f"{i}.npy", b"")
    with_expected(served, buf.getvalue(), "1.1.0")
    refused(served, tmp_path / "state", "its zip directory is ")


def test_json_test_data_nested_too_deep_is_refused(served: Registry, tmp_path: Path) -> None:
    """A map output stored as JSON text 100,000 brackets deep: before, RecursionError out of the pull."""
    text = io.BytesIO()
    np.lib.format.write_array(text, np.array("[" * 100_000 + "]" * 100_000))
    names = io.BytesIO()
    np.lib.format.write_array(names, np.array(json.dumps(["y"])))
    with_expected(served, npz({"y.npy": text.getvalue(), f"{JSON_KEY}.npy": names.getvalue()}), "1.1.0")
    refused(served, tmp_path / "state", "test vector fp32-0: test data cannot be read: 'y' is not JSON")


def test_test_data_of_raw_bytes_is_refused(served: Registry, tmp_path: Path) -> None:
    """Expected outputs of dtype V4, raw bytes: before, ValueError out of the comparison and the pull."""
    with_expected(served, npz({"y.npy": npy_header((1, 4), "|V4") + bytes(16)}), "1.1.0")
    refused(served, tmp_path / "state", "member 'y.npy' holds |V4, not numbers, booleans or text")


def test_test_data_that_test_vectors_can_hold_still_passes(served: Registry, tmp_path: Path) -> None:
    """The bounds refuse none of what `encode` writes (the identity model's own output)."""
    with_expected(served, encode({"y": np.zeros((1, 4), np.float32)}), "1.1.0")
    inputs = served.put(encode({"x": np.zeros((1, 4), np.float32)}))
    served.resign("m", "1.1.0", lambda doc: doc["tests"][0].update(inputs=inputs))
    assert pull(served, tmp_path / "state").status == "activated"


def test_a_variant_with_thousands_of_test_vectors_is_refused_before_any_download(
    served: Registry, tmp_path: Path
) -> None:
    """200 vectors (sharing their data here, to keep the test short). Before: every one downloaded, synced
    and run; 2,500 distinct ones, what a 1 MiB manifest holds, took one pull 225 s and left 5,000 files."""

    def many(doc: dict[str, Any]) -> None:
        doc["tests"] = [{**doc["tests"][0], "name": f"fp32-{i}"} for i in range(200)]

    served.resign("m", "1.1.0", many)
    asked = len(served.blob_requests())
    refused(served, tmp_path / "state", f"variant fp32 has 200 test vectors; a device runs at most {MAX_TESTS}")
    assert len(served.blob_requests()) == asked


# ---- what a refusal says -----------------------------------------------------------------------------


def test_a_refusal_quoting_a_huge_hostile_string_is_one_short_printable_line(served: Registry, tmp_path: Path) -> None:
    """A provider name of 400,000 characters led by a terminal escape: before, the whole of it (and the escape)
    was the reason of the model.refused event, at every poll."""
    hostile = "\x1b[2J\x1b[31m" + "P" * 400_000 + "\nforged line"
    served.resign("m", "1.1.0", lambda doc: doc["variants"][0].update(providers=[hostile]))
    reason = refused(served, tmp_path / "state", "variant fp32 suits \\x1b[2J\\x1b[31mPPP")
    assert len(reason) <= MAX_REASON_CHARS + 40 and reason.isprintable(), reason[-200:]
    assert reason.endswith(" characters)"), reason[-200:]


# ---- the disk ------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 22 MiB file system: the download margin, one 3 MiB version, and a little room."""
    yield from mount_tmpfs(tmp_path / "small", "22m")


def test_a_download_abandoned_when_the_channel_moved_does_not_keep_the_next_version_out(
    registry: Registry, small_disk: Path
) -> None:
    """1.0.0 is cut 1000 bytes short (retries 0) and the channel moves to 1.1.0 meanwhile: before, 1.0.0's
    partial (3 MiB) stayed, and 1.1.0 was 'not enough disk' at every poll, for good."""
    size = 3 * MiB
    registry.publish("m", "1.0.0", registry.tiny("m1", doc=b"1" * size))
    blob = registry.blob_path("m", "1.0.0")
    registry.server.faults[blob.name] = ("cut", blob.stat().st_size - 1000)
    state = small_disk / "state"
    first = pull(registry, state, retries=0)
    assert first.status == "failed" and (state / "models" / ".partial" / blob.name).exists(), first
    registry.publish("m", "1.1.0", registry.tiny("m2", doc=b"2" * size))
    events: list[Event] = []
    second = pull(registry, state, events, retries=0)
    assert second.status == "activated", second
    assert list((state / "models" / ".partial").iterdir()) == []


def test_a_partial_download_untouched_for_a_day_is_discarded_by_the_next_download(
    registry: Registry, tmp_path: Path
) -> None:
    registry.publish("m", "1.0.0", registry.tiny("m1"))
    state = tmp_path / "state"
    store = Store(state)
    old, recent = store.partial_path("sha256:" + "a" * 64), store.partial_path("sha256:" + "b" * 64)
    old.write_bytes(b"x" * 1000)
    recent.write_bytes(b"y" * 1000)
    day_ago = time.time() - STALE_PARTIAL - 60
    os.utime(old, (day_ago, day_ago))
    assert pull(registry, state).status == "activated"
    assert not old.exists() and recent.exists()  # another pull's, still being resumed


def test_a_disk_that_fills_up_mid_download_is_given_back(registry: Registry, small_disk: Path) -> None:
    """Something else fills the disk once the download has begun: before, the partial kept what it had
    written (304 KB), the disk stayed full (0 bytes free) and the next poll was 'not enough disk'."""
    size = 3 * MiB
    registry.publish("m", "1.0.0", registry.tiny("m1", doc=b"1" * size))
    state = small_disk / "state"
    filled: list[Path] = []

    def fill_once(have: int, total: int) -> None:
        if not filled:
            filled.append(fill(small_disk, leave=256 * 1024))

    events: list[Event] = []
    result = pull(registry, state, events, retries=0, progress=fill_once)
    assert result.status == "failed" and events[-1].type == "model.error", result
    assert "the disk filled up at" in (result.reason or "") and "the partial download is discarded" in (
        result.reason or ""
    ), result.reason
    assert list((state / "models" / ".partial").iterdir()) == []
    filled[0].unlink()
    assert pull(registry, state).status == "activated"


def test_a_channel_moved_at_every_poll_grows_neither_the_registry_cache_nor_memory(
    registry: Registry, tmp_path: Path
) -> None:
    """A stolen key moves the channel to a new version of 600 KB at every poll, each refused before any
    download (opset 99). Before: every manifest and signature stayed in registry-cache (30 versions: 65 files,
    17 MiB), and in the client's memory (60 versions of 900 KB: 51 MiB kept, RSS +44 MiB)."""
    client = registry.client(tmp_path / "state", caps=CAPS)
    pad = "x" * 600_000

    def hostile(doc: dict[str, Any]) -> None:
        doc["variants"][0]["opsets"] = {"ai.onnx": 99}
        doc["metadata"] = {"pad": pad}

    def poll(version: str) -> None:
        registry.publish("m", version, registry.tiny("m"), no_tests=True)
        registry.resign("m", version, hostile)
        assert client.check_and_pull("m").status == "refused"

    poll("1.0.0")
    tracemalloc.start()
    try:
        for k in range(1, MAX_CACHE_BYTES // len(pad) + 8):
            poll(f"1.0.{k}")
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kept < 8 * MiB, f"{kept / MiB:.0f} MiB kept after {MAX_CACHE_BYTES // len(pad) + 7} polls"
    cached = sum(p.stat().st_size for p in (tmp_path / "state" / "registry-cache").iterdir())
    assert cached <= MAX_CACHE_BYTES, cached
    # What is polled over and over (the root, the channel) is what stays: still conditional GETs.
    before = len(registry.server.requests)
    assert client.check_and_pull("m").status == "refused"
    sent = {r["path"]: r["if_none_match"] for r in registry.server.requests[before:]}
    assert sent["/keys/root.json"] and sent["/channels/m/stable.json"], sent
