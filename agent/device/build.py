"""One session on one ranked provider, and proof of what it really runs on.

A CUDA or TensorRT session whose libraries are missing quietly becomes a CPU session, so every session
is read back (`get_providers()`, and the graph assignment where the runtime records it) before anyone
reports it as running on a provider.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from agent.device.customops import register
from agent.device.graphcache import GraphCache
from agent.device.providers import CPU, CUDA, OPENVINO, TENSORRT, Candidate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verification:
    """What the session really runs on, read back from it."""

    providers: tuple[str, ...]
    assignment: dict[str, int] | None  # nodes per provider, where the runtime records it (1.24+)

    def share(self, provider: str) -> float | None:
        if not self.assignment:
            return None
        total = sum(self.assignment.values())
        return self.assignment.get(provider, 0) / total if total else None


def provider_options(candidate: Candidate, state_dir: Path, threads: int) -> dict[str, str]:
    """The candidate's options over device defaults: caches under the state dir, threads, device 0."""
    cache = Path(state_dir) / "cache"
    defaults: dict[str, str] = {}
    if candidate.provider == TENSORRT:
        # Building an engine takes minutes on a Jetson: cache it, and the timing cache that speeds rebuilds.
        defaults = {
            "device_id": "0",
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(cache / "tensorrt"),
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": str(cache / "tensorrt"),
        }
    elif candidate.provider == CUDA:
        defaults = {"device_id": "0"}
    elif candidate.provider == OPENVINO:
        defaults = {"device_type": "CPU", "cache_dir": str(cache / "openvino")}
        if candidate.options.get("device_type", "CPU") == "CPU":
            defaults["num_of_threads"] = str(threads)
    return {**defaults, **candidate.options}


OWN_THREADS = frozenset({OPENVINO, CUDA, TENSORRT})  # providers that run a model on threads or a device of their own
# Providers that keep the buffers of a batch's shape until the session is freed (no arena shrinkage): an
# OpenVINO[CPU] PP-OCR session went from 196 to 353 MiB after one batch of 4, 318 trimmed; a fresh one, 191.
KEEPS_BATCH_MEMORY = frozenset({OPENVINO})

LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(threads: int, level: str = "all", libraries: Sequence[Path] = ()) -> ort.SessionOptions:
    """`libraries`: custom-op libraries, already proven by agent.device.customops.session_libraries."""
    options = ort.SessionOptions()
    register(options, libraries)
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = LEVELS[level]
    # Threads spin between one operator and the next (PP-OCRv4 det on 2 cores: 28.4-28.9 ms a run against
    # 29.9-34.1 asleep) and stop when the run returns: spinning on after it cost 20-30 ms of CPU a run at
    # 10 runs/s, taken from capture and MQTT on a device's few cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    # Which nodes run where (1.24+); older runtimes ignore the key and we fall back to get_providers().
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    return options


def build_session(
    model: Path | bytes,
    candidate: Candidate,
    state_dir: Path,
    threads: int,
    *,
    level: str = "all",
    libraries: Sequence[Path] = (),
) -> ort.InferenceSession:
    """One session on the candidate, with the CPU provider behind it for the ops it does not take."""
    return _session(model, candidate, state_dir, threads, level, libraries=libraries)


def build_cached(
    model: Path | bytes,
    candidate: Candidate,
    state_dir: Path,
    threads: int,
    level: str,
    cache: GraphCache | None,
    libraries: Sequence[Path] = (),
) -> tuple[ort.InferenceSession, str]:
    """`build_session` through the optimised model cache, and what the cache did: "hit", "written" or "off".

    A verified cached model is loaded without optimising again; otherwise the session is built from the
    model and writes its optimised graph into the entry for the next start. A cached model that fails to
    load is dropped and the session is built from the model itself. A disk that takes no cache file (full,
    read-only) costs the start its speed, never the session: it is built without `optimized_model_filepath`.
    """
    if cache is None:
        return _session(model, candidate, state_dir, threads, level, libraries=libraries), "off"
    cached = cache.verified()
    if cached is not None:
        try:
            return _session(cached, candidate, state_dir, threads, "disabled", libraries=libraries), "hit"
        except Exception as exc:  # noqa: BLE001 (a bad entry is rebuilt from the model, never fatal)
            log.warning(
                "optimised model cache entry does not load, rebuilding key=%s reason=%s", cache.key, one_line(exc)
            )
            cache.drop()
    staged: Path | None = None
    try:
        staged = cache.staging()
        session = _session(model, candidate, state_dir, threads, level, staged, libraries)
    except BaseException as exc:
        if staged is not None:
            staged.unlink(missing_ok=True)
        if not isinstance(exc, Exception):
            raise
        # onnxruntime fails the whole session when it cannot write the optimised model (a disk without a
        # free block: InvalidProtobuf "Protobuf serialization failed"): built again without the file; a
        # model that fails again fails for its own reasons, raised from here.
        session = _session(model, candidate, state_dir, threads, level, libraries=libraries)
        cache.not_written(one_line(exc))
        return session, "off"
    return session, "written" if cache.keep(staged, _label(model)) else "off"


def _label(model: Path | bytes) -> str:
    return f"{len(model)} bytes" if isinstance(model, bytes) else str(model)


def _session(
    model: Path | bytes,
    candidate: Candidate,
    state_dir: Path,
    threads: int,
    level: str,
    save_to: Path | None = None,
    libraries: Sequence[Path] = (),
) -> ort.InferenceSession:
    opts = provider_options(candidate, state_dir, threads)
    for key in ("trt_engine_cache_path", "cache_dir"):
        if key in opts:
            Path(opts[key]).mkdir(parents=True, exist_ok=True)
    chain: list[tuple[str, dict[str, str]]] = [(candidate.provider, opts)]
    if candidate.provider == TENSORRT and CUDA in ort.get_available_providers():
        chain.append((CUDA, {"device_id": opts.get("device_id", "0")}))
    if candidate.provider != CPU:
        chain.append((CPU, {}))
    # onnxruntime's own pool runs only the nodes a provider with threads or a device of its own leaves to
    # the CPU provider: a pool of `threads` there is threads that wait (OpenVINO, its own pool beside it).
    options = session_options(threads if candidate.provider not in OWN_THREADS else 1, level, libraries)
    if save_to is not None:
        options.optimized_model_filepath = str(save_to)
        # Saving at level `all` warns that the file suits only this hardware: the cache key holds its fingerprint.
        options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    with warnings.catch_warnings():
        # onnxruntime only warns when a provider is not in the build; verify() turns that into a fallback event.
        warnings.filterwarnings("ignore", message="Specified provider", category=UserWarning)
        return ort.InferenceSession(
            source,
            sess_options=options,
            providers=[p for p, _ in chain],
            provider_options=[o for _, o in chain],
        )


def verify(session: ort.InferenceSession) -> Verification:
    """Read back the providers the session kept and, where recorded, how many nodes each runs."""
    providers = tuple(session.get_providers())
    assignment: dict[str, int] | None = None
    getter = getattr(session, "get_provider_graph_assignment_info", None)
    if getter is not None:
        try:
            info = getter()
        except Exception as exc:  # noqa: BLE001 (optional diagnostics must never break a session)
            log.debug("graph assignment info unavailable: %s", exc)
            info = None
        if info:
            assignment = {}
            for sub in info:
                assignment[sub.ep_name] = assignment.get(sub.ep_name, 0) + len(sub.get_nodes())
    return Verification(providers, assignment)


def why_not(candidate: Candidate, check: Verification) -> str | None:
    """None when the session really runs on the candidate; otherwise the reason, in one line."""
    if candidate.provider not in check.providers:
        return (
            f"the session came up without it (runs on {', '.join(check.providers)}): "
            "its libraries are missing or the device is not usable"
        )
    total = sum(check.assignment.values()) if check.assignment else 0
    if check.assignment and total and not check.assignment.get(candidate.provider):
        return f"it took none of the model's {total} nodes"
    return None


def one_line(exc: BaseException) -> str:
    """An exception as one line for an event's reason: onnxruntime's messages span many."""
    text = " ".join(str(exc).split())
    return f"{exc.__class__.__name__}: {text[:300]}" if text else exc.__class__.__name__
