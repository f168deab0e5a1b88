"""Remembering a model that crashes the process while it loads.

Some models take the whole process down on load or on their warm-up run: a provider's native code
segfaults, the OOM killer strikes, a driver hangs until systemd's watchdog kills the service. No
exception handler sees that, so the evidence lives on disk: before loading a new version the daemon
records the attempt (fsync'd), and clears it as soon as the model is loaded and warmed up (the warm-up
runs it on an input shaped like the pipeline's frames) or its load failed with a handled error. A start
that finds an attempt recorded by another process knows that process died in the middle of that load.
A death after it (the model served, or waits for data that has not come: a power cut) is not counted.
After `limit` such deaths in a row with the same version, the version is marked as crashing, and
`should_skip` tells the daemon to start on the previous version, with a reason to publish as an event.

The daemon's side, per model, at start and on every swap:

    guard = CrashGuard(profile.device.state_dir)
    reason = guard.should_skip(model, new_version)
    if reason:                      # publish model.rolled-back with the reason; serve the previous one
        ...
    else:
        guard.begin(model, new_version, previous=old_version)
        ...load and warm up...
        guard.succeeded(model, new_version)  # or guard.abandon(...) after a handled load error
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.util.files import write_atomic
from agent.util.timefmt import utc_iso

log = logging.getLogger(__name__)

FILE_NAME = "crashguard.json"
DEFAULT_LIMIT = 3

# Tells this process's own attempts from those of a process that died: pids repeat (a container's
# agent is pid 1 at every start), a random token does not.
PROCESS_TOKEN = uuid.uuid4().hex


@dataclass(frozen=True)
class Attempt:
    """A load of `model` `version` in progress, or left behind by a process that died."""

    model: str
    version: str
    previous: str | None
    attempts: int  # processes that began this load, the current one included
    pid: int
    process: str
    since: str

    @property
    def mine(self) -> bool:
        return self.process == PROCESS_TOKEN

    @property
    def deaths(self) -> int:
        """Consecutive processes that began this load and died before it ran."""
        return self.attempts - (1 if self.mine else 0)


class CrashGuard:
    """The crash record of every model in one state directory (one file, rewritten atomically)."""

    def __init__(self, state_dir: str | Path, limit: int = DEFAULT_LIMIT) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit!r}")
        self.path = Path(state_dir) / FILE_NAME
        self.limit = limit
        self._lock = threading.Lock()

    # The daemon's calls -------------------------------------------------------------------------

    def should_skip(self, model: str, version: str) -> str | None:
        """Why `version` must not be loaded (it crashed the agent `limit` starts in a row), or None."""
        with self._lock:
            state = self._read()
            entry = state.get(model, {})
            crashed = entry.get("crashed", {}).get(version)
            if crashed:
                return str(crashed["reason"])
            pending = self._pending(model, entry)
            if pending is None or pending.version != version or pending.deaths < self.limit:
                return None
            instead = f"; starting on {pending.previous} instead" if pending.previous else "; starting without it"
            reason = (
                f"model {model} version {version} was loading when the agent died "
                f"{pending.deaths} starts in a row (last began {pending.since}){instead}"
            )
            entry.setdefault("crashed", {})[version] = {
                "reason": reason,
                "at": utc_iso(time.time()),
                "previous": pending.previous,
            }
            entry.pop("pending", None)
            self._write(state)
            log.error("%s", reason)
            return reason

    def begin(self, model: str, version: str, previous: str | None = None) -> Attempt:
        """Record, durably, that this process is about to load `version` of `model`."""
        with self._lock:
            state = self._read()
            entry = state.setdefault(model, {})
            pending = self._pending(model, entry)
            if pending is not None and pending.version == version:
                # The same load again: a dead process's attempt counts; our own retry does not.
                attempts = pending.attempts if pending.mine else pending.attempts + 1
                previous = previous if previous is not None else pending.previous
            else:
                attempts = 1
            attempt = Attempt(model, version, previous, attempts, os.getpid(), PROCESS_TOKEN, utc_iso(time.time()))
            entry["pending"] = {k: v for k, v in asdict(attempt).items() if k != "model"}
            self._write(state)
            if attempt.deaths:
                log.warning(
                    "loading model %s version %s again: %d earlier start(s) died while loading it",
                    model,
                    version,
                    attempt.deaths,
                )
            return attempt

    def succeeded(self, model: str, version: str) -> None:
        """The version loaded and ran: clear the attempt, and any crash mark from an earlier try."""
        self._settle(model, version, forget=True)

    def abandon(self, model: str, version: str) -> None:
        """The load ended without a crash (a handled error, a stop on purpose): not a death to count."""
        self._settle(model, version, forget=False)

    def forget(self, model: str, version: str) -> None:
        """Give a version marked as crashing another chance (an operator deployed it again on purpose)."""
        self._settle(model, version, forget=True)

    # What the record holds (for status, events and tests) -------------------------------------

    def pending(self, model: str) -> Attempt | None:
        with self._lock:
            state = self._read()
        return self._pending(model, state.get(model, {}))

    def crashed(self, model: str) -> dict[str, str]:
        """Versions of `model` marked as crashing, each with its reason."""
        with self._lock:
            state = self._read()
        return {v: str(c["reason"]) for v, c in state.get(model, {}).get("crashed", {}).items()}

    # Storage ------------------------------------------------------------------------------------

    def _settle(self, model: str, version: str, forget: bool) -> None:
        with self._lock:
            state = self._read()
            entry = state.get(model)
            if entry is None:
                return
            changed = False
            if entry.get("pending", {}).get("version") == version:
                entry.pop("pending")
                changed = True
            if forget and version in entry.get("crashed", {}):
                del entry["crashed"][version]
                changed = True
            if not changed:
                return
            for key in [k for k, v in entry.items() if not v]:
                del entry[key]
            if not entry:
                del state[model]
            self._write(state)

    @staticmethod
    def _pending(model: str, entry: dict[str, Any]) -> Attempt | None:
        raw = entry.get("pending")
        if not raw:
            return None
        try:
            return Attempt(
                model=model,
                version=str(raw["version"]),
                previous=raw.get("previous"),
                attempts=int(raw["attempts"]),
                pid=int(raw.get("pid", 0)),
                process=str(raw.get("process", "")),
                since=str(raw.get("since", "")),
            )
        except (KeyError, TypeError, ValueError):
            log.warning("ignoring a malformed crash record for model %s in the state directory", model)
            return None

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            # The file is replaced atomically, so this is damage from outside; start counting afresh.
            log.warning("cannot read %s (%s); crash records start afresh", self.path, exc)
            return {}
        models = data.get("models") if isinstance(data, dict) else None
        return models if isinstance(models, dict) else {}

    def _write(self, models: dict[str, Any]) -> None:
        # The record must survive the very crash it is about: write_atomic fsyncs the file and the folder.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps({"models": models}, indent=1, sort_keys=True).encode())
