"""Autotune: time each usable provider and thread count on this device, keep the fastest, remember it.

What ONNX Go Live/Olive do in the cloud, done on the device itself: the ranking says what should be
fast here; a measurement on the real model, on the real silicon, settles it. Configurations are timed
in turns (one run of each per round), so that a burst of load from another process on a shared CPU
costs every configuration alike instead of ruining one. The choice is cached under the state dir keyed
by model digest, hardware fingerprint and onnxruntime version: any of the three changing means re-tune.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from agent.device.build import build_session, one_line, verify, why_not
from agent.device.hardware import Probe
from agent.device.providers import CPU, OPENVINO, Candidate, core_budget
from agent.transport.events import Event, EventSink, log_event
from agent.util.digests import file_sha256
from agent.util.files import read_small
from agent.util.hashing import sha256_bytes
from agent.util.timefmt import utc_iso

log = logging.getLogger(__name__)

ONNX_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}
# A symbolic dimension other than the batch gets this size: a multiple of 32, which strided CNNs need.
DEFAULT_DIM = 224
CACHE_VERSION = 1
MAX_RECORD_BYTES = 64 * 1024  # a cached choice or verdict, with its trials, is a few KiB

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Trial:
    """One provider and thread count, timed; `verified` is what the session really ran on."""

    label: str
    provider: str
    threads: int
    verified: str | None
    latencies_ms: tuple[float, ...] = ()
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.latencies_ms)

    @property
    def p50_ms(self) -> float:
        return float(np.median(self.latencies_ms)) if self.latencies_ms else float("nan")

    @property
    def p95_ms(self) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]

    @property
    def throughput(self) -> float:
        """Inferences per second, one at a time (what a camera loop gets)."""
        mean = float(np.mean(self.latencies_ms)) if self.latencies_ms else 0.0
        return 1000.0 / mean if mean else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "provider": self.provider,
            "threads": self.threads,
            "verified": self.verified,
            "runs": len(self.latencies_ms),
            "p50_ms": _round(self.p50_ms),
            "p95_ms": _round(self.p95_ms),
            "throughput": _round(self.throughput),
            "error": self.error,
        }


@dataclass(frozen=True)
class Choice:
    label: str
    threads: int
    p50_ms: float
    key: str
    cached: bool
    trials: tuple[dict[str, Any], ...] = ()


def _round(x: float) -> float | None:
    return None if x != x else round(x, 3)  # NaN is not JSON


def synth_inputs(
    session: ort.InferenceSession, dims: dict[str, int] | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """Inputs shaped from the model's signature: symbolic batch 1, other symbolic dims `dims` or 224."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for arg in session.get_inputs():
        shape = []
        for axis, dim in enumerate(arg.shape):
            if isinstance(dim, int) and dim > 0:
                shape.append(dim)
            elif dims and isinstance(dim, str) and dim in dims:
                shape.append(dims[dim])
            else:
                shape.append(1 if axis == 0 else DEFAULT_DIM)
        dtype = ONNX_DTYPES.get(arg.type, np.float32)
        if np.issubdtype(dtype, np.floating):
            out[arg.name] = rng.standard_normal(shape).astype(dtype)
        else:
            out[arg.name] = np.zeros(shape, dtype=dtype)
    return out


def cpu_bound(candidate: Candidate) -> bool:
    """Providers whose speed depends on CPU threads; a GPU provider is timed once (a TensorRT engine
    build per thread count would cost minutes and measure nothing)."""
    if candidate.provider == OPENVINO:
        return candidate.options.get("device_type", "CPU").startswith("CPU")
    return candidate.provider in (
        CPU,
        "XnnpackExecutionProvider",
        "ACLExecutionProvider",
        "ArmNNExecutionProvider",
    )


def thread_options(probe: Probe) -> list[int]:
    """1, half and all of the thread budget: enough to see where adding threads stops paying."""
    cores = core_budget(probe)
    return sorted({1, max(1, cores // 2), cores})


def measure(
    model: Path | bytes,
    configs: Sequence[tuple[Candidate, int]],
    state_dir: Path,
    inputs: dict[str, np.ndarray] | None = None,
    runs: int = 20,
    warmup: int = 3,
    progress: Progress | None = None,
    libraries: Sequence[Path] = (),
) -> list[Trial]:
    """Time each (candidate, threads) warm, in turns; a config that fails or falls back is kept with its reason."""
    sessions: list[tuple[Candidate, int, ort.InferenceSession | None, str | None, str | None]] = []
    total = len(configs) * (warmup + runs)
    done = 0
    for candidate, threads in configs:
        label = f"{candidate.label} x{threads}"
        if progress:
            progress(done, total, f"opening {label}")
        try:
            session = build_session(model, candidate, state_dir, threads, libraries=libraries)
        except Exception as exc:  # noqa: BLE001 (a provider that cannot open is a row with its reason)
            sessions.append((candidate, threads, None, None, f"session creation failed: {one_line(exc)}"))
            done += warmup + runs
            continue
        check = verify(session)
        why = why_not(candidate, check)
        sessions.append((candidate, threads, None if why else session, check.providers[0], why))
        if why:
            done += warmup + runs
    if inputs is None:
        first = next((s for _, _, s, _, _ in sessions if s is not None), None)
        inputs = synth_inputs(first) if first is not None else {}
    latencies: list[list[float]] = [[] for _ in sessions]
    errors: list[str | None] = [s[4] for s in sessions]
    # Warm-up: the first runs allocate, compile and page in weights; they are several times slower.
    for i, (candidate, threads, session, _, _) in enumerate(sessions):
        for _ in range(warmup):
            if session is None or errors[i]:
                break
            try:
                session.run(None, inputs)
            except Exception as exc:  # noqa: BLE001 (a config that fails to run is a row with its reason)
                errors[i] = f"run failed: {one_line(exc)}"
            done += 1
            if progress:
                progress(done, total, f"warming {candidate.label} x{threads}")
    for _ in range(runs):
        for i, (candidate, threads, session, _, _) in enumerate(sessions):
            if session is None or errors[i]:
                continue
            start = time.perf_counter()
            try:
                session.run(None, inputs)
            except Exception as exc:  # noqa: BLE001 (as in the warm-up: the row keeps the reason)
                errors[i] = f"run failed: {one_line(exc)}"
                continue
            latencies[i].append((time.perf_counter() - start) * 1000)
            done += 1
            if progress:
                progress(done, total, f"timing {candidate.label} x{threads}")
    if progress:
        progress(total, total, "done")
    return [
        Trial(
            label=c.label, provider=c.provider, threads=t, verified=v, latencies_ms=tuple(latencies[i]), error=errors[i]
        )
        for i, (c, t, _, v, _) in enumerate(sessions)
    ]


def model_digest(model: Path | bytes) -> str:
    """sha256 of the model bytes: the autotune cache keys on it, as manifests do (a file's is remembered
    while the file stays as it was: agent.util.digests)."""
    return sha256_bytes(model) if isinstance(model, bytes) else file_sha256(model)


def cache_path(state_dir: Path, digest: str, probe: Probe) -> Path:
    version = probe.runtime.version.replace("/", "_")
    return Path(state_dir) / "autotune" / f"{digest[:32]}-{probe.fingerprint()}-ort{version}.json"


def tune(
    model: Path | bytes,
    chain: Sequence[Candidate],
    state_dir: Path,
    probe: Probe,
    threads_options: Sequence[int] | None = None,
    inputs: dict[str, np.ndarray] | None = None,
    emit: EventSink = log_event,
    runs: int = 20,
    warmup: int = 3,
    progress: Progress | None = None,
    libraries: Sequence[Path] = (),
) -> Choice | None:
    """The fastest (candidate, threads) for this model here, from the cache or measured now."""
    digest = model_digest(model)
    path = cache_path(state_dir, digest, probe)
    threads_list = list(threads_options or thread_options(probe))
    labels = [c.label for c in chain]
    cached = _read_cache(path)
    if cached is not None and cached.label in labels and cached.threads in threads_list:
        return cached
    configs = [(c, t) for c in chain for t in (threads_list if cpu_bound(c) else [max(threads_list)])]
    trials = measure(model, configs, state_dir, inputs, runs, warmup, progress, libraries)
    good = [t for t in trials if t.ok]
    for t in trials:
        log.info("autotune %s x%d: %s", t.label, t.threads, f"p50 {t.p50_ms:.2f} ms" if t.ok else t.error)
    if not good:
        log.warning("autotune: no configuration ran; keeping the ranking's order")
        return None
    best = min(good, key=lambda t: t.p50_ms)
    choice = Choice(best.label, best.threads, best.p50_ms, path.stem, False, tuple(t.summary() for t in trials))
    _write_cache(path, choice, digest, probe)
    emit(
        Event(
            "provider.autotuned",
            {
                "provider": best.label,
                "threads": best.threads,
                "p50_ms": _round(best.p50_ms),
                "trials": [t.summary() for t in trials],
            },
        )
    )
    return choice


def _read_cache(path: Path) -> Choice | None:
    try:
        data = json.loads(read_small(path, MAX_RECORD_BYTES))  # a regular file, bounded
        if data.get("version") != CACHE_VERSION:
            return None
        return Choice(
            data["label"], int(data["threads"]), float(data["p50_ms"]), path.stem, True, tuple(data.get("trials", ()))
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(path: Path, choice: Choice, digest: str, probe: Probe) -> None:
    data = {
        "version": CACHE_VERSION,
        "model_sha256": digest,
        "fingerprint": probe.fingerprint(),
        "onnxruntime": probe.runtime.version,
        "measured_at": utc_iso(time.time()),
        **{k: v for k, v in asdict(choice).items() if k not in ("key", "cached")},
    }
    _write_json(path, data)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written whole or not at all: a torn cache file would pin a wrong choice.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---- dynamic batching: does a batch pay here? -------------------------------------------------------

BATCH_GAIN = 0.9  # a batch must cost under 90% per frame of single runs: below that it is noise
BATCH_ROUNDS = 5


@dataclass(frozen=True)
class BatchVerdict:
    """Per-frame cost of a batch of `size` against `size` single runs, on this device (medians); `pays`
    only when the batch won by the margin in every round, so that a burst of load elsewhere cannot turn
    on batching that costs memory (an arena the batch's size) and speed."""

    size: int
    single_ms: float
    batch_ms: float
    pays: bool
    cached: bool = False

    def describe(self) -> str:
        verdict = "pays" if self.pays else "does not pay"
        return (
            f"{verdict}: a batch of {self.size} costs {self.batch_ms:.1f} ms per frame, single runs "
            f"{self.single_ms:.1f} ms ({'cached' if self.cached else 'measured'})"
        )


def batch_cache_path(state_dir: Path, digest: str, probe: Probe, provider: str) -> Path:
    version = probe.runtime.version.replace("/", "_")
    name = f"batch-{digest[:32]}-{probe.fingerprint()}-ort{version}-{provider.removesuffix('ExecutionProvider')}"
    return Path(state_dir) / "autotune" / f"{name}.json"


def judge_batching(
    session: ort.InferenceSession, name: str, example: np.ndarray, size: int, path: Path
) -> BatchVerdict:
    """Time `size` single runs and one batch of `size` in turns, BATCH_ROUNDS times, or read the verdict
    cached at `path`. The batch runs give their arena growth back, so that a batch that does not
    pay leaves no memory behind."""
    try:
        data = json.loads(read_small(path, MAX_RECORD_BYTES))
        if data.get("version") == CACHE_VERSION and int(data["size"]) == size:
            return BatchVerdict(size, float(data["single_ms"]), float(data["batch_ms"]), bool(data["pays"]), True)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    shrink = ort.RunOptions()
    shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    batch = np.concatenate([example] * size, axis=0)
    session.run(None, {name: batch}, shrink)  # the first run of a new shape allocates: not timed
    singles: list[float] = []
    batches: list[float] = []
    for _ in range(BATCH_ROUNDS):
        start = time.perf_counter()
        for _ in range(size):
            session.run(None, {name: example})
        singles.append((time.perf_counter() - start) * 1000 / size)
        start = time.perf_counter()
        session.run(None, {name: batch}, shrink)
        batches.append((time.perf_counter() - start) * 1000 / size)
    pays = all(b < BATCH_GAIN * one for one, b in zip(singles, batches, strict=True))
    verdict = BatchVerdict(size, float(np.median(singles)), float(np.median(batches)), pays)
    _write_json(path, {"version": CACHE_VERSION, "measured_at": utc_iso(time.time()), **asdict(verdict)})
    return verdict
