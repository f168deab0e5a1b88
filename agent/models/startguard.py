"""At start, before any model loads: versions that killed the last starts are rolled back.

The crash guard (agent.models.crashguard) remembers a version whose load or warm-up never ended; the
daemon calls `skip_crashing_versions` before it opens the pipelines, so that a version that kills the
process cannot keep a device in a crash loop. Split from agent.models.updater, which runs later.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.models.crashguard import CrashGuard
from agent.models.store import Store, StoreError
from agent.transport.events import Event, EventSink

if TYPE_CHECKING:
    from agent.config.profile import Profile


def versions_on_trial(profile: Profile) -> Callable[[str, str], bool]:
    """(model, version) -> whether the crash guard still watches that version's load and warm-up: such a
    version warms up before it serves at start, so that a death while it warms counts as one."""
    guard = CrashGuard(profile.device.state_dir)

    def on_trial(model: str, version: str) -> bool:
        attempt = guard.pending(model)
        return attempt is not None and attempt.version == version

    return on_trial


def skip_crashing_versions(store: Store, profile: Profile, emit: EventSink) -> None:
    """At start, before any model loads: a version that killed the last starts is rolled back; a version
    whose load was never confirmed counts this start as one more attempt."""
    guard = CrashGuard(profile.device.state_dir)
    for model in sorted({c.model for c in profile.registry_pipelines}):
        active = store.active(model)
        if active is None:
            continue
        reason = guard.should_skip(model, active.version)
        if reason:
            try:
                restored = store.rollback(model, reason=reason)
            except (StoreError, OSError) as exc:  # nothing older on disk: serve it and say so
                emit(
                    Event(
                        "model.rollback_failed",
                        {
                            "model": model,
                            "version": active.version,
                            "reason": f"{reason}; {exc}",
                            "cause": "crash_guard",
                        },
                    )
                )
                continue
            emit(
                Event(
                    "model.rolled_back",
                    {
                        "model": model,
                        "version": active.version,
                        "to": restored.version,
                        "reason": reason,
                        "cause": "crash_guard",
                    },
                )
            )
            continue
        pending = guard.pending(model)
        if pending is not None and pending.version == active.version:
            guard.begin(model, active.version, previous=pending.previous)
