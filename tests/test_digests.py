"""A model file's sha256 remembered by its stat: hit, every kind of change, racy writes, a damaged memo."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest

from agent.util import digests
from agent.util.digests import MEMO_NAME, file_sha256

pytestmark = pytest.mark.arm64


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("EDGE_AGENT_CACHE", str(folder))
    return folder


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files really hashed, in order."""
    seen: list[Path] = []
    real = digests.sha256_file

    def counting(path: Path | str) -> str:
        seen.append(Path(path))
        return real(path)

    monkeypatch.setattr(digests, "sha256_file", counting)
    return seen


def settled(path: Path, data: bytes, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A file written long enough ago to be remembered: here, by taking the racy window away."""
    path.write_bytes(data)
    monkeypatch.setattr(digests, "RACY_NS", -(10**12))
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_file_as_it_was_is_hashed_once(tmp_path: Path, cache: Path, hashed: list[Path], monkeypatch) -> None:
    model = settled(tmp_path / "m.onnx", b"model one", monkeypatch)
    assert file_sha256(model) == file_sha256(model) == file_sha256(Path(os.path.relpath(model))) == sha(b"model one")
    assert hashed == [model]
    assert list(json.loads((cache / MEMO_NAME).read_text())) == [str(model)]


@pytest.mark.parametrize("change", ["same size rewrite", "mtime set back", "replaced by rename", "grown"])
def test_any_change_to_the_file_is_hashed_again(
    tmp_path: Path, cache: Path, hashed: list[Path], monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    model = settled(tmp_path / "m.onnx", b"model one", monkeypatch)
    before = os.stat(model)
    file_sha256(model)
    if change == "same size rewrite":
        model.write_bytes(b"model two")
    elif change == "mtime set back":  # rsync -t, touch -d: the content changed, the mtime says it did not
        model.write_bytes(b"model two")
        os.utime(model, ns=(before.st_atime_ns, before.st_mtime_ns))
    elif change == "replaced by rename":
        (tmp_path / "new").write_bytes(b"model two")
        os.utime(tmp_path / "new", ns=(before.st_atime_ns, before.st_mtime_ns))
        os.replace(tmp_path / "new", model)
    else:
        model.write_bytes(b"model one, longer")
    assert file_sha256(model) == sha(model.read_bytes()) != sha(b"model one")
    assert hashed == [model, model]


def test_a_file_written_just_before_its_hash_is_not_remembered(tmp_path: Path, cache: Path, hashed: list[Path]) -> None:
    """Its next write could fall in the same timestamp tick and leave the stat as it is."""
    model = tmp_path / "m.onnx"
    model.write_bytes(b"fresh")
    assert file_sha256(model) == file_sha256(model) == sha(b"fresh")
    assert hashed == [model, model] and not (cache / MEMO_NAME).exists()


@pytest.mark.parametrize(
    "memo",
    [
        b"not json",
        b"[1, 2]",
        b"{" + b'"a":' * (digests.LIMIT // 4 + 1) + b"1}",  # larger than the bound
        b'{"PATH": [1, 2, 3, 4, 5, "not a digest"]}',
        b'{"PATH": [true, 2, 3, 4, 5, "' + b"0" * 64 + b'"]}',
        b'{"PATH": "' + b"0" * 64 + b'"}',
        "fifo",
    ],
)
def test_a_damaged_memo_costs_a_hash_never_a_wrong_digest(
    tmp_path: Path, cache: Path, hashed: list[Path], monkeypatch: pytest.MonkeyPatch, memo: bytes | str
) -> None:
    model = settled(tmp_path / "m.onnx", b"model one", monkeypatch)
    cache.mkdir()
    if memo == "fifo":
        os.mkfifo(cache / MEMO_NAME)
    else:
        assert isinstance(memo, bytes)
        (cache / MEMO_NAME).write_bytes(memo.replace(b"PATH", str(model).encode()))
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(file_sha256(model)), daemon=True)
    reader.start()
    reader.join(10)  # a FIFO in the memo's place must not hold the start up
    assert result == [sha(b"model one")] and hashed == [model]


def test_a_forged_entry_for_another_stat_is_not_used(
    tmp_path: Path, cache: Path, hashed: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = settled(tmp_path / "m.onnx", b"model one", monkeypatch)
    st = os.stat(model)
    cache.mkdir()
    stale = [st.st_size, st.st_mtime_ns - 1, st.st_ctime_ns, st.st_ino, st.st_dev, "0" * 64]
    (cache / MEMO_NAME).write_text(json.dumps({str(model): stale}))
    assert file_sha256(model) == sha(b"model one") and hashed == [model]


def test_only_the_most_recent_entries_are_kept_and_an_unusable_cache_folder_still_hashes(
    tmp_path: Path, cache: Path, hashed: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(digests, "KEEP", 3)
    files = [settled(tmp_path / f"m{i}.onnx", f"model {i}".encode(), monkeypatch) for i in range(5)]
    for f in files:
        file_sha256(f)
    assert list(json.loads((cache / MEMO_NAME).read_text())) == [str(f) for f in files[2:]]
    monkeypatch.setenv("EDGE_AGENT_CACHE", str(files[0]))  # a file where the folder should be: nothing is kept
    assert file_sha256(files[0]) == file_sha256(files[0]) == sha(b"model 0")
    assert hashed[-2:] == [files[0], files[0]]
