"""Execution-provider choice and session construction.

First slice: CPU sessions only, with the device-friendly options. Issue 3 grows this into ranking,
fallback with events and verification; the signature of `open_session` is the contract callers use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort
import psutil

from agent.events import EventSink, log_event
from agent.profile import RuntimeConfig


@dataclass
class OpenedSession:
    """A session and the provider proven to run it (read back from the session, never assumed)."""

    session: ort.InferenceSession
    provider: str
    providers: tuple[str, ...]
    notes: list[str] = field(default_factory=list)


def thread_count(runtime: RuntimeConfig) -> int:
    if runtime.threads != "auto":
        return int(runtime.threads)
    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


def open_session(
    model: Path | bytes, runtime: RuntimeConfig, state_dir: Path, emit: EventSink = log_event
) -> OpenedSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = thread_count(runtime)
    # Idle threads sleep instead of spinning: devices share their few cores with capture and MQTT.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
    used = tuple(session.get_providers())
    return OpenedSession(session, used[0], used)
