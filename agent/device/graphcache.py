"""The optimised model, cached per device under the state folder, so that later starts skip graph optimisation.

The key holds everything that changes what ONNX Runtime's optimiser writes: the runtime's version and
build, the provider and its options, the optimisation level, the hardware fingerprint (level `all` lays
tensors out for this CPU's SIMD width) and the model's digest; a change in any of them is a new entry,
never a stale one. The checksum of what was written is kept beside it and checked before every use: a
damaged or missing file is removed and rebuilt from the model. Providers that compile the graph
themselves (TensorRT, OpenVINO) keep their own caches and are not cached here.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from agent.device.providers import CPU, CUDA
from agent.util.files import read_small
from agent.util.hashing import checksum_file, sha256_bytes

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: the record holds the file's checksum (agent.util.hashing.checksum_file)
MAX_RECORD_BYTES = 64 * 1024  # a record is a few hundred bytes
KEPT = 8  # entries kept, most recently used first: every model version updated in leaves one behind
CACHEABLE = frozenset({CPU, CUDA})  # providers whose optimised graph is still a plain ONNX model
ORT_FORMAT_ID = b"ORTM"  # an .ort (flatbuffer) model: already optimised, nothing to cache
_NOT_WRITTEN: set[str] = set()  # entries already reported as not written in this process


@dataclass(frozen=True)
class GraphCache:
    """One cache entry: the optimised model and, beside it, the record of what it is."""

    model: Path
    record: Path
    key: str

    def verified(self) -> Path | None:
        """The optimised model when its checksum matches the record; a damaged entry is removed."""
        if not self.model.exists() and not self.record.exists():
            return None
        try:
            record = json.loads(read_small(self.record, MAX_RECORD_BYTES))  # a regular file, bounded
            if record.get("version") == CACHE_VERSION and record.get("checksum") == checksum_file(self.model):
                os.utime(self.record)  # recently used: the last to be pruned
                return self.model
            reason = "its checksum does not match the record"
        except (OSError, ValueError, AttributeError) as exc:
            reason = f"{exc.__class__.__name__}: {exc}"
        log.warning("optimised model cache entry dropped, rebuilding key=%s reason=%s", self.key, reason)
        self.drop()
        return None

    def staging(self) -> Path:
        """Where ONNX Runtime writes the optimised model while the session is built (renamed by `keep`)."""
        self.model.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.model.parent, prefix=".tmp-", suffix=".onnx")
        os.close(fd)
        return Path(name)

    def keep(self, staged: Path, source: str) -> bool:
        """Make a fully written optimised model the entry: the file first, then its record (both atomic).

        False when the disk refuses (full, read-only): a full disk costs the next start its speed, nothing
        else, and nothing of the entry is left behind for a later start to trust or to fill the disk with.
        """
        tmp: str | None = None
        try:
            if staged.stat().st_size == 0:
                raise OSError(errno.EIO, "onnxruntime wrote an empty optimised model")
            checksum = checksum_file(staged)
            os.replace(staged, self.model)
            fd, tmp = tempfile.mkstemp(dir=self.record.parent, prefix=".tmp-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump({"version": CACHE_VERSION, "checksum": checksum, "key": self.key, "source": source}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.record)
        except OSError as exc:
            staged.unlink(missing_ok=True)
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            self.drop()
            self.not_written(f"{exc.__class__.__name__}: {exc}")
            return False
        self._prune()
        return True

    def not_written(self, reason: str) -> None:
        """Say once per entry (per process) that the session runs without the cache, and why."""
        if self.key in _NOT_WRITTEN:
            log.debug("optimised model not cached key=%s reason=%s", self.key, reason)
            return
        _NOT_WRITTEN.add(self.key)
        log.warning(
            "optimised model not cached key=%s reason=%s; the session runs without it (the next start "
            "optimises the model again)",
            self.key,
            reason,
        )

    def _prune(self) -> None:
        """Beyond KEPT entries, the least recently used go (with files a crash left half-written)."""
        folder = self.record.parent
        try:  # another agent process may prune the same folder at the same time
            records = sorted(folder.glob("*.json"), key=lambda r: r.stat().st_mtime, reverse=True)
            for old in records[KEPT:]:
                GraphCache(old.with_suffix(".onnx"), old, old.stem).drop()
            for stale in folder.glob(".tmp-*"):
                if stale.stat().st_mtime < time.time() - 3600:
                    stale.unlink(missing_ok=True)
        except OSError as exc:
            log.debug("optimised model cache not pruned: %s", exc)

    def drop(self) -> None:
        self.record.unlink(missing_ok=True)
        self.model.unlink(missing_ok=True)


def graph_cache(
    state_dir: Path,
    model: Path | bytes,
    digest: str,
    provider: str,
    options: dict[str, str],
    level: str,
    fingerprint: str,
    runtime_version: str,
) -> GraphCache | None:
    """The entry for this model, provider, options and level on this device; None when nothing is cached
    for it (a level that optimises nothing, a provider that compiles, a model already in ORT format)."""
    if level == "disabled" or provider not in CACHEABLE or _ort_format(model):
        return None
    parts = [CACHE_VERSION, runtime_version, fingerprint, provider, sorted(options.items()), level, digest]
    key = sha256_bytes(json.dumps(parts).encode())[:32]
    folder = Path(state_dir) / "cache" / "optimized"
    return GraphCache(folder / f"{key}.onnx", folder / f"{key}.json", key)


def _ort_format(model: Path | bytes) -> bool:
    if isinstance(model, bytes):
        return model[4:8] == ORT_FORMAT_ID
    try:
        with open(model, "rb") as f:
            return f.read(8)[4:8] == ORT_FORMAT_ID
    except OSError:
        return False
