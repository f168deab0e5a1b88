"""The local model store: complete, verified versions on disk and which one is active.

```
state_dir/models/<model>/<version>/       a complete, verified version: the model file, its signed
                                          manifest and installed.json (variant, digest, provider)
state_dir/models/<model>/pointer.json     {"active": VERSION, "previous": VERSION | null,
                                           "history": [VERSION, ...], "held": [{version, reason, since}]}
state_dir/models/<model>/.stage-*         a version being assembled (deleted on recovery)
state_dir/models/.partial/<sha256 hex>    downloads in progress, kept so that they resume
```

A partial download serves only the pull that resumes it: one that no pull has touched for STALE_PARTIAL
(its version was left behind while the device was away, or the channel moved on) is discarded by the
next download, and so is any other one whose room a download needs (`discard_partials`).

Crash safety comes from ordering: a version folder gets its normal name (by rename, after its files
and the folder are fsynced) only once the download was verified and its test vectors passed; the
pointer moves only to such a folder, by writing a temporary file, fsyncing it, renaming it over
pointer.json and fsyncing the folder. Active and previous live in one file, so one rename switches
both. A kill -9 at any moment therefore leaves the old pointer (and its complete folder) or the new
one; leftovers are staging folders and partial downloads, which `recover()` clears or resumes.

`history` lists the versions that were active before, oldest first: a rollback goes to the newest of
them that is on disk and not held, so repeated rollbacks walk back and never toggle forward. `held`
lists the versions this device refused or rolled back, each with its reason: no channel, order, pin or
command installs them again until an operator overrides the hold by name (see agent.models.registry).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from agent.device import customops
from agent.models.manifest import Manifest, ManifestError, Variant, file_digest, parse_manifest, version_key
from agent.util.files import fsync_path, write_atomic
from agent.util.timefmt import utc_iso

if TYPE_CHECKING:
    from agent.config.profile import PipelineConfig

POINTER = "pointer.json"
INSTALLED = "installed.json"
MANIFEST = "manifest.json"
MAX_HELD = 32  # held versions remembered per model, newest kept: the pointer file stays small
MAX_HISTORY = 32  # earlier versions remembered per model for rollbacks (only those on disk can serve)
# Seconds after which a partial download no pull appended to is another pull's leftover, not a resume in
# progress: every poll (5 minutes by default) of a model with a download pending resumes it.
STALE_PARTIAL = 24 * 3600.0


class StoreError(Exception):
    """The store cannot do what was asked; the message says why in one line."""


class HeldVersion(TypedDict):
    """A version this device will not install again on its own, and why."""

    version: str
    reason: str
    since: str  # UTC ISO 8601


class Pointer(TypedDict):
    """pointer.json: which version serves, the versions before it, and the versions held back."""

    active: str | None
    previous: str | None  # the newest of `history`: what the version before this one was
    history: list[str]  # versions active before, oldest first
    held: list[HeldVersion]


class Installed(TypedDict):
    """installed.json: what the registry client verified and tested before the version got its name."""

    variant: str
    digest: str
    file: str
    provider: str | None  # the provider its test vectors passed on
    labels: str | None
    installed: str  # ISO 8601


@dataclass(frozen=True)
class ActiveModel:
    """What a pipeline loads: the model file of the active version and what is known about it."""

    model: str
    version: str
    path: Path
    digest: str
    manifest: Manifest
    variant: Variant
    labels: Path | None = None
    provider: str | None = None  # the provider its test vectors passed on

    @property
    def directory(self) -> Path:
        return self.path.parent


class Store:
    def __init__(self, state_dir: Path | str, keep_versions: int = 3) -> None:
        if keep_versions < 2:
            raise ValueError("keep_versions must be at least 2 (the active version and one to roll back to)")
        self.root = Path(state_dir) / "models"
        self.keep_versions = keep_versions

    # --- reading ----------------------------------------------------------------------------

    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def pointer(self, model: str) -> Pointer:
        path = self.root / model / POINTER
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {"active": None, "previous": None, "history": [], "held": []}
        except ValueError as exc:
            raise StoreError(f"{path} is not valid JSON ({exc}); the store is damaged") from None
        if not isinstance(doc, dict):
            raise StoreError(f"{path} is not a JSON object; the store is damaged")
        history = doc.get("history")
        if not isinstance(history, list):  # written by an agent that kept one previous version only
            history = [doc["previous"]] if isinstance(doc.get("previous"), str) else []
        history = [v for v in history if isinstance(v, str)]
        return {
            "active": doc.get("active"),
            "previous": history[-1] if history else None,
            "history": history,
            "held": _held_list(doc.get("held")),
        }

    def held(self, model: str) -> list[HeldVersion]:
        """The versions of `model` held on this device, oldest hold first."""
        return self.pointer(model)["held"]

    def held_reason(self, model: str, version: str) -> str | None:
        """Why `version` is held, or None when it is not."""
        return next((h["reason"] for h in self.held(model) if h["version"] == version), None)

    def versions(self, model: str) -> list[str]:
        """Complete versions on disk, oldest first."""
        folder = self.root / model
        if not folder.is_dir():
            return []
        found = [
            p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / INSTALLED).exists()
        ]
        return sorted(found, key=version_key)

    def installed(self, model: str, version: str) -> ActiveModel:
        folder = self.root / model / version
        try:
            info = json.loads((folder / INSTALLED).read_bytes())
            manifest = parse_manifest((folder / MANIFEST).read_bytes(), f"{model} {version} manifest")
        except FileNotFoundError:
            raise StoreError(f"{model} {version} is not in the store") from None
        except (ValueError, ManifestError) as exc:
            raise StoreError(f"{model} {version} in the store is damaged: {exc}") from None
        labels = folder / info["labels"] if info.get("labels") else None
        return ActiveModel(
            model,
            version,
            folder / info["file"],
            info["digest"],
            manifest,
            manifest.variant(info["variant"]),
            labels,
            info.get("provider"),
        )

    def active(self, model: str) -> ActiveModel | None:
        version = self.pointer(model)["active"]
        return self.installed(model, version) if version else None

    def resolve(self, pipeline: PipelineConfig) -> tuple[Path, str]:
        """For `agent.inference.loader.open_pipelines(resolve=...)`: a pipeline's registry model -> (active file, version).

        Raises ValueError (which open_pipelines reports as pipeline.failed) when nothing is active yet.
        """
        try:
            entry = self.active(pipeline.model)
        except StoreError as exc:
            raise ValueError(str(exc)) from None
        if entry is None:
            raise ValueError(
                f"model {pipeline.model!r} has no active version in the store yet "
                f"(the registry client pulls it; or: edge-agent models pull {pipeline.model})"
            )
        return entry.path, entry.version

    def check(self, model: str, deep: bool = True) -> list[str]:
        """Problems with a model's store (empty when consistent); deep re-hashes the active file and the
        custom-op libraries installed with it."""
        problems = []
        try:
            pointer = self.pointer(model)
        except StoreError as exc:
            return [str(exc)]
        for role in ("active", "previous"):
            version = pointer[role]
            if version is None:
                continue
            try:
                entry = self.installed(model, version)
            except StoreError as exc:
                problems.append(f"{role}: {exc}")
                continue
            if not entry.path.is_file():
                problems.append(f"{role}: {entry.path} is missing")
            elif entry.path.stat().st_size != entry.variant.blob.size:
                problems.append(
                    f"{role}: {entry.path} is {entry.path.stat().st_size} bytes, expected {entry.variant.blob.size}"
                )
            elif deep and role == "active" and file_digest(entry.path) != entry.digest:
                problems.append(f"{role}: {entry.path} does not match its digest {entry.digest}")
            problems += [f"{role}: {why}" for why in customops.damage(entry.path, deep and role == "active")]
        return problems

    # --- writing ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One writer at a time (the daemon and a `models pull` may overlap); released on kill -9 too."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def partial_path(self, digest: str) -> Path:
        return self._partials_dir() / digest.split(":", 1)[-1]

    def _partials_dir(self) -> Path:
        folder = self.root / ".partial"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    @contextlib.contextmanager
    def partials(self) -> Iterator[None]:
        """One download (or clean-up) at a time in the partial files: the store's own lock is not held across
        the network (a stalled pull must not hold up a rollback), yet a `models pull` and the daemon must
        never append to the same partial file. Released on kill -9 too (flock)."""
        fd = os.open(self._partials_dir(), os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def discard_partials(self, keep: set[str], older_than: float = 0.0) -> None:
        """Delete the partial downloads whose digest is not in `keep` and that nothing appended to for
        `older_than` seconds. Call within `partials()`."""
        now = time.time()
        for part in self._partials_dir().iterdir():
            with contextlib.suppress(FileNotFoundError):
                if f"sha256:{part.name}" not in keep and now - part.stat().st_mtime >= older_than:
                    part.unlink()

    def stage(self, model: str) -> Path:
        folder = self.root / model
        folder.mkdir(parents=True, exist_ok=True)
        stage = folder / f".stage-{uuid.uuid4().hex[:12]}"
        stage.mkdir()
        return stage

    def commit(self, model: str, version: str, stage: Path, info: Installed) -> Path:
        """Give a staged, verified version its real name; `info` becomes installed.json."""
        (stage / INSTALLED).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        for path in stage.iterdir():
            fsync_path(path)
        fsync_path(stage)
        target = self.root / model / version
        if target.exists():
            self._discard(target)
        os.replace(stage, target)
        fsync_path(target.parent)
        return target

    def activate(self, model: str, version: str) -> ActiveModel:
        """Make an installed version active (lifting any hold on it); the one active before joins the history."""
        entry = self.installed(model, version)
        current = self.pointer(model)
        held = [h for h in current["held"] if h["version"] != version]
        if current["active"] == version and held == current["held"]:
            return entry
        history = [v for v in current["history"] if v not in (version, current["active"])]
        if current["active"] is not None and current["active"] != version:
            history.append(current["active"])
        self._write_pointer(model, version, history, held)
        return entry

    def rollback(self, model: str, to: str | None = None, *, reason: str) -> ActiveModel:
        """Back to `to`, or else to the newest earlier version on disk that is not held; the version
        left is held with `reason`. Naming a held version lifts its hold (the operator asked for it)."""
        current = self.pointer(model)
        active = current["active"]
        if active is None:
            raise StoreError(f"{model} is not in the store")
        on_disk = self.versions(model)
        if to is None:
            held_now = {h["version"] for h in current["held"]}
            to = next((v for v in reversed(current["history"]) if v in on_disk and v not in held_now), None)
            if to is None:
                raise StoreError(
                    f"{model} has no earlier version to roll back to (active: {active}; "
                    f"on disk: {', '.join(on_disk) or 'none'}; held: {', '.join(sorted(held_now)) or 'none'})"
                )
        elif to == active:
            raise StoreError(f"{model} {to} is already active")
        elif to not in on_disk:
            raise StoreError(f"{model} {to} is not on this device (on disk: {', '.join(on_disk) or 'none'})")
        entry = self.installed(model, to)
        history = current["history"]
        history = history[: history.index(to)] if to in history else history  # what came after `to` is left
        held = _with_hold(current["held"], active, reason)
        self._write_pointer(model, to, history, [h for h in held if h["version"] != to])
        return entry

    def hold(self, model: str, version: str, reason: str) -> None:
        """Hold `version` (refused here, or rolled back) with `reason`; a version never installed may be held."""
        current = self.pointer(model)
        self._write_pointer(model, current["active"], current["history"], _with_hold(current["held"], version, reason))

    def _write_pointer(self, model: str, active: str | None, history: list[str], held: list[HeldVersion]) -> None:
        history = history[-MAX_HISTORY:]
        doc = {
            "active": active,
            "previous": history[-1] if history else None,  # read by agents that knew one previous version
            "history": history,
            "held": held[-MAX_HELD:],
        }
        (self.root / model).mkdir(parents=True, exist_ok=True)
        write_atomic(self.root / model / POINTER, (json.dumps(doc, sort_keys=True) + "\n").encode())

    def collect(self, model: str) -> list[str]:
        """Delete versions beyond keep_versions, keeping the active one, then the newest of its history
        that are not held (what rollbacks go back to), then the newest others; return those deleted."""
        pointer = self.pointer(model)
        held = {h["version"] for h in pointer["held"]}
        on_disk = self.versions(model)
        keep = [pointer["active"]] if pointer["active"] in on_disk else []
        keep += [v for v in reversed(pointer["history"]) if v in on_disk and v not in held and v not in keep]
        keep = keep[: self.keep_versions]
        others = [v for v in reversed(on_disk) if v not in keep]
        room = max(0, self.keep_versions - len(keep))
        doomed = others[room:]
        for version in doomed:
            self._discard(self.root / model / version)
        return doomed

    def _discard(self, folder: Path) -> None:
        # Renamed first so that a crash halfway through rmtree never leaves a half folder under a real name.
        trash = folder.with_name(f".trash-{uuid.uuid4().hex[:12]}")
        os.replace(folder, trash)
        fsync_path(folder.parent)
        shutil.rmtree(trash, ignore_errors=True)

    def recover(self) -> list[Path]:
        """Clear what a crash can leave behind (staging and trash folders, temp pointers)."""
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        for model_dir in self.root.iterdir():
            if not model_dir.is_dir() or model_dir.name.startswith("."):
                continue
            for p in model_dir.iterdir():
                if p.name.startswith((".stage-", ".trash-")):
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
                elif p.name.startswith(".") and p.name.endswith(".tmp"):
                    with contextlib.suppress(OSError):
                        p.unlink()
                    removed.append(p)
        return removed

    def discard_partial(self, digest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.partial_path(digest).unlink()

    def free_bytes(self) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        return shutil.disk_usage(self.root).free


def _held_list(raw: Any) -> list[HeldVersion]:
    """The held list as stored, or the one version an older agent held (a plain string)."""
    if isinstance(raw, str):
        return [{"version": raw, "reason": "rolled back", "since": ""}]
    if not isinstance(raw, list):
        return []
    return [
        {"version": h["version"], "reason": str(h.get("reason", "")), "since": str(h.get("since", ""))}
        for h in raw
        if isinstance(h, dict) and isinstance(h.get("version"), str)
    ]


def _with_hold(held: list[HeldVersion], version: str, reason: str) -> list[HeldVersion]:
    """`held` with `version` held (again) for `reason`, as the newest hold."""
    return [h for h in held if h["version"] != version] + [
        {"version": version, "reason": reason, "since": utc_iso(time.time())}
    ]
