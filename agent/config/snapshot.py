"""A profile validated once, kept in the agent's cache folder, so that starts while it stays the same neither
parse its YAML nor import pydantic: those took more than the whole cold-start budget (issue 15).

The snapshot is the validated objects, pickled, behind a header that says what they came from: a digest of
the profile's bytes and of the environment variables it names, the profile's folder and the home folder
(which relative and `~` paths resolve against), and the size and change time of every module whose classes
or checks made them; and where its `${VAR}`s stand, so that their secrets are masked as a validation masks
them. Any difference and the profile is validated again and the snapshot rewritten; so is a snapshot that
cannot be read. Unpickling builds profile classes and paths only (`_Unpickler.find_class`), of modules
the header names under `agent.`: a damaged or planted file fails to load, it cannot run code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import io
import json
import logging
import os
import pathlib
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from agent.config.base import Secret, Strict
from agent.util.cachedir import cache_folder
from agent.util.files import read_small
from agent.util.hashing import sha256_bytes
from agent.util.redact import ENV_REFERENCE

log = logging.getLogger(__name__)

FOLDER = "profiles"  # under the cache folder: one snapshot per profile file, named by its path
KEPT = 16  # snapshots kept, the most recently used
MAX_BYTES = 8 * 1024**2  # 256 pipelines of profile objects come to well under 1 MiB
FORMAT = 1
# Modules whose code decides what a profile validates to without holding its classes.
CHECKS = (
    "agent.config.base",
    "agent.config.checks",
    "agent.config.units",
    "agent.config.validate",
    "agent.config.yamldoc",
)
P = TypeVar("P")


def document_key(raw: bytes, environ: Mapping[str, str], base_dir: Path) -> str:
    """What the validated profile depends on besides the code: its bytes, the values of the environment
    variables they name, and the folders its relative and `~` paths resolve against."""
    names = sorted({m.group(1) for m in ENV_REFERENCE.finditer(raw.decode("utf-8", "replace"))})
    parts = [FORMAT, sha256_bytes(raw), [[n, environ.get(n)] for n in names], str(base_dir), os.path.expanduser("~")]
    return sha256_bytes(json.dumps(parts).encode())


def location(profile: Path) -> Path | None:
    """Where the snapshot of the profile file at `profile` (absolute) is kept, in the agent's cache folder
    (agent.util.cachedir: systemd's CacheDirectory for the service); None where there is none."""
    cache = cache_folder()
    return cache / FOLDER / f"{sha256_bytes(str(profile).encode())[:32]}.pickle" if cache is not None else None


def load(path: Path, key: str, kind: type[P]) -> tuple[P, list[tuple[str, str]]] | None:
    """The `kind` kept at `path` for `key` and where its `${VAR}`s stand (the key above each, and the text),
    or None (none kept, another key, changed code, unreadable)."""
    try:
        raw = read_small(path, MAX_BYTES)  # a regular file, bounded: a FIFO there never blocks the start
    except OSError:
        return None
    try:
        head, _, body = raw.partition(b"\n")
        header = json.loads(head)
        if len(raw) > MAX_BYTES or header.get("key") != key or header.get("code") != _fingerprint(header["modules"]):
            return None
        kept = _Unpickler(io.BytesIO(body), frozenset(header["modules"])).load()
        expanded = [(str(key_name), str(template)) for key_name, template in header["expanded"]]
    except Exception as exc:  # noqa: BLE001 (a damaged file of any kind is validated again)
        log.debug("profile snapshot %s not used: %s", path, exc)
        return None
    if type(kept) is not kind:
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # recently used: the last to be pruned
    return kept, expanded


def save(path: Path, key: str, profile: object, expanded: list[tuple[str, str]]) -> None:
    """Keep `profile` at `path` for later starts (atomically; a cache folder that cannot be written only
    means the next start validates again); the least recently used beyond KEPT go."""
    modules = sorted({type(o).__module__ for o in _objects(profile)} | set(CHECKS))
    header = {"key": key, "modules": modules, "code": _fingerprint(modules), "expanded": expanded}
    data = json.dumps(header).encode() + b"\n" + pickle.dumps(profile, protocol=5)
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temp, "wb") as f:
            f.write(data)
        os.replace(temp, path)
        kept = sorted(path.parent.glob("*.pickle"), key=lambda f: f.stat().st_mtime, reverse=True)
        for old in kept[KEPT:]:
            old.unlink(missing_ok=True)
    except OSError as exc:
        log.debug("profile snapshot %s not kept: %s", path, exc)
        with contextlib.suppress(OSError):
            temp.unlink()


def _objects(value: object) -> list[object]:
    """Every profile object in `value`, itself included."""
    found: list[object] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if dataclasses.is_dataclass(item) and not isinstance(item, type):
            found.append(item)
            stack.extend(getattr(item, f.name) for f in dataclasses.fields(item))
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return found


def _fingerprint(modules: list[str]) -> list[list[Any]]:
    """Size and change time of each module's file: a new release or an edited checkout changes them."""
    out: list[list[Any]] = []
    for name in modules:
        spec = importlib.util.find_spec(name) if name.startswith("agent.") else None
        if spec is None or spec.origin is None:
            raise LookupError(f"no module {name}")
        st = os.stat(spec.origin)
        out.append([name, st.st_size, st.st_mtime_ns])
    return out


_PATHS = {("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath")}


class _Unpickler(pickle.Unpickler):
    """Builds profile classes (of the agent's own modules the header names) and paths, and nothing else."""

    def __init__(self, file: io.BytesIO, modules: frozenset[str]) -> None:
        super().__init__(file)
        self.modules = modules

    def find_class(self, module: str, name: str) -> Any:
        if (module.split(".")[0], name) in _PATHS:
            return getattr(pathlib, name)
        if module in self.modules and module.startswith("agent."):
            found = getattr(importlib.import_module(module), name, None)
            if found is Secret or (isinstance(found, type) and issubclass(found, Strict)):
                return found
        raise pickle.UnpicklingError(f"{module}.{name} is not a profile class")
