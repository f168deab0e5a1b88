"""Crash-safe file writes (what the store, the orders, the crash guard and the outbox rely on), and bounded
reads of the small files a profile names."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file, or a folder: a folder's fsync is what makes a rename in it survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")  # a name no other writer has
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def read_small(path: Path, limit: int) -> bytes:
    """At most `limit` + 1 bytes of a regular file (the caller refuses more than `limit`). Only a regular file
    is read, and no more than the bound: a FIFO in its place blocked the reader forever, /dev/zero never
    ended, and a huge file was read whole before its size was checked. OSError names what it is instead."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO opens at once, and is refused
    try:
        kind = stat.S_IFMT(os.fstat(fd).st_mode)
        if kind != stat.S_IFREG:
            what = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a device", stat.S_IFDIR: "a directory"}.get(kind, "special")
            raise OSError(f"{what}, not a regular file")
        chunks: list[bytes] = []
        while (have := sum(map(len, chunks))) <= limit and (chunk := os.read(fd, limit + 1 - have)):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


MAX_SECRET_BYTES = 64 << 10  # a password or a token is one line


def read_secret(path: Path) -> str:
    """A password or token file's text, stripped: a small regular UTF-8 file (`read_small`), or OSError
    saying what it is instead (the callers report a file they cannot read, not a traceback)."""
    data = read_small(path, MAX_SECRET_BYTES)
    if len(data) > MAX_SECRET_BYTES:
        raise OSError(f"larger than {MAX_SECRET_BYTES} bytes; a secret file holds one line")
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise OSError(f"not UTF-8 text (byte {exc.start})") from None
