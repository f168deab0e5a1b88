"""Where the outbox lives: `<state_dir>/outbox/`, or in memory when the disk has no room at all.

An outbox on a disk that is merely full makes room by itself (agent.transport.outbox.box). One that
cannot start even a 16 KiB segment, with nothing of its own left to delete (the disk is full of other
files), would stop the agent; instead it starts in memory: a tmpfs folder (`/dev/shm`), bounded by
MEMORY_BYTES, that survives a restart of the agent but not a reboot. Its `seq` goes on from the disk's, and
health says `memory_only: true`. At the next start with room on the disk the disk outbox takes over,
numbering above what the memory one used; what the memory one had not sent is counted as dropped for
lack of room (`dropped_disk`), so that `seq` never repeats and no gap goes unexplained.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.transport.outbox.box import DIRNAME, DiskFullError, Outbox

if TYPE_CHECKING:
    from agent.config.profile import OutboxConfig

log = logging.getLogger(__name__)

MEMORY_BYTES = 8 * 1024**2  # memory is scarcer than disk on a device; a broker that is up drains it fast
SHM = Path("/dev/shm")


def memory_dir(disk_dir: Path) -> Path:
    """The in-memory folder of the outbox whose disk folder is `disk_dir` (one per state folder)."""
    base = SHM if SHM.is_dir() else Path(tempfile.gettempdir())
    tag = hashlib.sha256(str(disk_dir.resolve()).encode()).hexdigest()[:16]
    return base / f"edge-agent-{tag}" / DIRNAME


def open_outbox(state_dir: str | Path, config: OutboxConfig | None = None) -> Outbox:
    """The outbox of a profile: `<state_dir>/outbox/`, bounded by `mqtt.outbox`; in memory when the disk
    has no room to start it."""
    path = Path(state_dir) / DIRNAME
    bounds: dict[str, Any] = {} if config is None else {"max_bytes": config.max_bytes, "max_age": config.max_age}
    memory = memory_dir(path)
    left: tuple[dict[str, int], int] | None = None
    if memory.is_dir():  # a run on a full disk kept its outbox in memory
        with Outbox(memory, **{**bounds, "max_bytes": MEMORY_BYTES}) as previous:
            left = previous.last_seqs(), previous.depth
    try:
        outbox = Outbox(path, seq_floor=left[0] if left else None, **bounds)
    except DiskFullError as exc:
        log.warning(
            "outbox: no room on the disk for %s (%s); keeping up to %d bytes of messages in memory at %s "
            "instead: lost on a reboot",
            path,
            exc.reason,
            MEMORY_BYTES,
            memory,
        )
        memory_bounds = {**bounds, "max_bytes": min(bounds.get("max_bytes", MEMORY_BYTES), MEMORY_BYTES)}
        return Outbox(memory, seq_floor=exc.seq, memory_only=True, **memory_bounds)
    if left is not None:
        if left[1]:
            outbox.count_lost(left[1])
            log.warning("outbox: %d message(s) kept in memory while the disk was full were not sent; counted", left[1])
        shutil.rmtree(memory.parent, ignore_errors=True)
    return outbox
