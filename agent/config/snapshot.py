"""A profile validated once, kept in the device's state folder, so that starts while it stays the same need
no pydantic: its import and the profile's validators took more than the whole cold-start budget (issue 15).

The snapshot is the validated objects, pickled, behind a header that says what they came from: a digest of
the document once its environment variables are expanded, the profile's folder and the home folder (which
relative and `~` paths resolve against), and the size and change time of every module whose classes or checks
made them. Any difference and the profile is validated again and the snapshot rewritten; so is a snapshot
that cannot be read. Unpickling builds profile classes and paths only (`_Unpickler.find_class`), of modules
the header names under `agent.`: a damaged or planted file fails to load, it cannot run code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
import io
import json
import logging
import os
import pathlib
import pickle
from pathlib import Path
from typing import Any, TypeVar

from agent.config.base import Secret, Strict

log = logging.getLogger(__name__)

FILE = "validated-profile.pickle"
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


def document_key(data: Any, base_dir: Path) -> str:
    """What the validated profile depends on besides the code: the expanded document and the folders its
    relative and `~` paths resolve against."""
    text = json.dumps([FORMAT, data, str(base_dir), os.path.expanduser("~")], sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def location(data: dict[str, Any], base_dir: Path, default: Path) -> Path | None:
    """Where the profile's device keeps its state (its `device.state_dir`, resolved as validation resolves it),
    read from the document before validation; None where the document does not say it plainly."""
    device = data.get("device")
    state_dir = device.get("state_dir", default) if isinstance(device, dict) else default
    if not isinstance(state_dir, (str, Path)) or not str(state_dir):
        return None
    path = Path(os.path.expanduser(str(state_dir)))
    return (path if path.is_absolute() else base_dir / path) / FILE


def load(path: Path, key: str, kind: type[P]) -> P | None:
    """The `kind` kept at `path` for `key`, or None (none kept, another key, changed code, unreadable)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError:
        return None
    try:
        head, _, body = raw.partition(b"\n")
        header = json.loads(head)
        if len(raw) > MAX_BYTES or header.get("key") != key or header.get("code") != _fingerprint(header["modules"]):
            return None
        kept = _Unpickler(io.BytesIO(body), frozenset(header["modules"])).load()
    except Exception as exc:  # noqa: BLE001 (a damaged file of any kind is validated again)
        log.debug("profile snapshot %s not used: %s", path, exc)
        return None
    return kept if type(kept) is kind else None


def save(path: Path, key: str, profile: object) -> None:
    """Keep `profile` at `path` for later starts (atomically; a state folder that cannot be written only
    means the next start validates again)."""
    modules = sorted({type(o).__module__ for o in _objects(profile)} | set(CHECKS))
    header = {"key": key, "modules": modules, "code": _fingerprint(modules)}
    data = json.dumps(header).encode() + b"\n" + pickle.dumps(profile, protocol=5)
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # the daemon makes it too, a moment later
        with open(temp, "wb") as f:
            f.write(data)
        os.replace(temp, path)
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
