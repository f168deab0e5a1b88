"""A model file's sha256, remembered by what `stat` says of the file, so that a start does not hash it again.

Every start keys its sessions and caches on the model's sha256: 3.6 ms for the 4.7 MB PP-OCR detector here,
and roughly a second for a 100 MB model on a Raspberry Pi 4, whose cores have no SHA instructions, for bytes
that have not changed. The memo (one small file in the cache folder) keys an entry on the file's path, size,
mtime, ctime, inode and device, and keeps one only when the file had not been touched for `RACY_NS` before it
was hashed: git's "racily clean" rule, since a write within the same timestamp tick as the hash would leave
every field as it was (FAT keeps mtimes in 2 s steps). ctime cannot be set back by anyone, so `touch -d` or
`rsync -t` on a file of the same size still changes the key.

For keys only: what verifies downloaded bytes (the model store) hashes them every time.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

from agent.util.cachedir import cache_folder
from agent.util.files import read_small, write_atomic
from agent.util.hashing import sha256_file

log = logging.getLogger(__name__)

MEMO_NAME = "digests.json"
KEEP = 64  # entries: the models of a device's profile and its recent versions
LIMIT = KEEP * 5 * 1024  # bytes of memo read at most: 64 entries of the longest path Linux takes (4 KiB)
RACY_NS = 3_000_000_000  # a file touched this recently before its hash is hashed again next time
_DIGEST = re.compile(r"[0-9a-f]{64}")

Stamp = list[int]  # size, mtime_ns, ctime_ns, inode, device


def file_sha256(path: Path) -> str:
    """The file's sha256 (hex), from the memo where the file is as it was when it was hashed."""
    stamp = _stamp(os.stat(path))
    key = os.path.abspath(path)
    folder = cache_folder()
    memo = _read(folder / MEMO_NAME) if folder is not None else {}
    entry = memo.get(key)
    if entry is not None and entry[:5] == stamp:
        return str(entry[5])
    hashed_at = time.time_ns()
    digest = sha256_file(path)
    settled = max(stamp[1], stamp[2]) < hashed_at - RACY_NS
    if folder is not None and settled and _stamp(os.stat(path)) == stamp:
        memo.pop(key, None)
        memo[key] = [*stamp, digest]
        _write(folder / MEMO_NAME, dict(list(memo.items())[-KEEP:]))
    return digest


def _stamp(st: os.stat_result) -> Stamp:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _read(path: Path) -> dict[str, list[int | str]]:
    """The memo's well-formed entries; nothing (and no complaint) where it is missing or damaged: a memo
    that cannot be read costs a hash, never a start."""
    try:
        raw = read_small(path, LIMIT)
        loaded = json.loads(raw) if len(raw) <= LIMIT else None
    except (OSError, ValueError):
        return {}
    if not isinstance(loaded, dict):
        return {}
    return {
        key: value
        for key, value in loaded.items()
        if isinstance(value, list)
        and len(value) == 6
        and all(type(v) is int for v in value[:5])
        and isinstance(value[5], str)
        and _DIGEST.fullmatch(value[5])
    }


def _write(path: Path, memo: dict[str, list[int | str]]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(memo, separators=(",", ":")).encode())
    except OSError as exc:  # a read-only or full cache folder: the next start hashes again
        log.debug("model digest not remembered path=%s reason=%s", path, exc)
